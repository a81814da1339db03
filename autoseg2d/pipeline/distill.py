"""Stage 6/7: one student network distilled from the ensemble (profile key `distill`).

The ensemble's answer costs all its members per scan; the student is one network of the template's
architecture trained to predict what the ensemble predicts (the template's distill_targets and
distill_weight keys: its soft targets beside the labels).

- Teacher maps: every training case's ensemble probability of any lesion, out of fold: only the members
  validated on its fold (none trained on it) predict it, read from the maps cross-validation stored
  (fold_probabilities); the members run only for a case without them. Always their mean probability, also
  for a vote ensemble: a soft target is a probability.
- Fold students: the best cross-validated configuration trained once more per fold with those targets. Their
  out-of-fold predictions choose the student's post-processing and never-empty rule, as the ensemble's were
  chosen (ensemble.make_ensemble), and score it beside the members (reports/student_cross_validation.md).
  Their fold scores lean optimistic: a fold-k student's targets on the other folds come from members that
  trained on fold k's labels (never a prediction of a fold-k case).
- The student: the same configuration trained on every training case (the template's fold -1), stored as
  student/student.json in ensemble.json's form with one member, so that predict, the report and the export
  run it as they run the ensemble.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
import nibabel as nib
import numpy as np
import yaml

from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.datalist import case_name
from autoseg2d.evaluation.tables import cross_validation_table, json_safe
from autoseg2d.run.bundles import bundle_path, configuration_name, describe, generate_bundles, train_bundle
from autoseg2d.pipeline.crossval import run_crossval, validation_cases
from autoseg2d.pipeline.ensemble import make_ensemble
from autoseg2d.run.eta import NO_CLOCK, RunClock
from autoseg2d.run.fold_probabilities import check_grid, has_foreground, mean_foreground, quantize, save_levels
from autoseg2d.pipeline.predict import EnsemblePredictor, ensemble_identity
from autoseg2d.run.work_queue import run_queue
from autoseg2d.run.workdir import WorkDir, WorkDirError
from autoseg2d.templates import ALGO_NAME, BUNDLE_CONFIG, bundle_config
from autoseg2d.run.context import RunContext

logger = logging.getLogger(__name__)

STUDENT, ENSEMBLE = "student", "ensemble"
MODELS = (STUDENT, ENSEMBLE)
ALL_CASES_FOLD = -1  # the template's fold that trains on every training case and validates on none
STUDENT_REPORT = "student_cross_validation"  # reports/<this>.md and .json
STUDENT_VARIANT = "student"  # its rows in that table
# The student trains this many times its members' budget: matching an ensemble's probabilities takes longer
# than matching labels (Beyer et al., CVPR 2022: distillation keeps gaining from long schedules); on the hard
# synthetic benchmark the members' budget left the student below the ensemble (benchmarks/RESULTS.md, "The
# student").
BUDGET_FACTOR = 2


def teacher_folder(work: WorkDir, ensemble: dict) -> Path:
    """The teacher maps of one ensemble: named by its identity, so that the students trained on them (their
    configuration holds the folder) are trained again when the ensemble changes."""
    return work.student_file.parent / f"teacher-{ensemble_identity(ensemble)[:10]}"


def write_teacher_maps(work: WorkDir, ensemble: dict, *, training: Sequence[dict], dataroot: Path) -> Path:
    """Each training case's out-of-fold ensemble probability of any lesion, as <case>.npz (the template's
    distill_targets format: uint8 levels of 1/255 in the image file's grid); maps written before are kept.
    Returns the folder."""
    folder = teacher_folder(work, ensemble)
    predictor = EnsemblePredictor(work, {**ensemble, "mode": "mean", "screen": None})
    member_folds = [m["fold"] for m in ensemble["members"]]
    written = stored = 0
    for fold in sorted({int(e["fold"]) for e in training}):
        indices = [i for i, f in enumerate(member_folds) if f == fold]
        if not indices:
            raise WorkDirError(f"distill: fold {fold} has no member in {work.relative(work.ensemble_file)}, so its "
                               "cases have no out-of-fold teacher map (the ensemble was built from other records "
                               "or folds); delete that file and rerun from the ensemble stage")
        bundles = [predictor.bundles[i] for i in indices]
        for case in validation_cases(fold, training=training, dataroot=dataroot):
            case_id = case_name(case["image"])
            target = folder / f"{case_id}.npz"
            if target.is_file():
                continue
            if all(has_foreground(bundle, case_id) for bundle in bundles):
                foreground = mean_foreground(bundles, case_id)
                stored += 1
            else:
                probabilities = predictor.probabilities(case["image"], [predictor.members[i] for i in indices])
                foreground = 1.0 - probabilities[0]
            check_grid(foreground.shape, case_id, case["label"], nib.load(str(case["label"])).shape[:3])
            save_levels(target, quantize(foreground))
            written += 1
    logger.info(f"distill: {written} teacher maps written ({stored} from the members' stored cross-validation maps, "
                f"{written - stored} by running them), in {work.relative(folder)}")
    return folder


def student_settings(work: WorkDir, records: Sequence[dict], teacher: Path) -> dict:
    """The best configuration with the teacher's maps as soft targets, trained for BUDGET_FACTOR times its
    members' budget (num_epochs, and num_steps where the members had one), read from a member's filled config."""
    best = best_configuration(records)
    member = next(r for r in records if {k: v for k, v in r["settings"].items() if k != "seed"} == best)
    config = bundle_config(work.absolute(member["bundle"]))
    budget = {"num_epochs": int(config["num_epochs"]) * BUDGET_FACTOR}
    if int(config["num_steps"]) > 0:
        budget["num_steps"] = int(config["num_steps"]) * BUDGET_FACTOR
    return {**best, **budget, "distill_targets": str(teacher)}


def best_configuration(records: Sequence[dict]) -> dict:
    """The cross-validated configuration with the highest mean validation Dice over its folds and seeds."""
    scores: dict = {}
    for record in records:
        scores.setdefault(configuration_name({k: v for k, v in record["settings"].items() if k != "seed"}),
                          (record["settings"], []))[1].append(float(record["score"]))
    settings, _ = max(scores.values(), key=lambda item: float(np.mean(item[1])))
    return {k: v for k, v in settings.items() if k != "seed"}


def all_cases_path(configuration: Path) -> Path:
    return configuration / f"{ALGO_NAME}_all"


def all_cases_bundle(configuration: Path) -> Path:
    """The configuration's fold-0 bundle copied (without its training) as a fold -1 bundle, made once (by one
    of several machines sharing the work dir: each copies into its own folder, the first rename wins)."""
    bundle = all_cases_path(configuration)
    if (bundle / BUNDLE_CONFIG).is_file():
        return bundle
    staging = configuration / f".{bundle.name}.{socket.gethostname()}-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle_path(configuration, 0), staging,
                    ignore=shutil.ignore_patterns("model", "cache", "__pycache__", ".training.lock"))
    config_file = staging / BUNDLE_CONFIG
    text = config_file.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    config = yaml.safe_load(text)
    config.update(fold=ALL_CASES_FOLD, bundle_root=str(bundle.resolve()))
    config_file.write_text(header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    try:
        staging.rename(bundle)
    except OSError:  # another machine's copy is in place
        shutil.rmtree(staging, ignore_errors=True)
        if not (bundle / BUNDLE_CONFIG).is_file():
            raise
    return bundle


def student_member(work: WorkDir, bundle: Path, settings: dict, fold_records: Sequence[dict]) -> dict:
    """ensemble.json's member entry of the student; its score (it validates on nothing) is its fold students'
    mean validation Dice."""
    return {"bundle": work.relative(bundle), "score": float(np.mean([r["score"] for r in fold_records])),
            "fold": ALL_CASES_FOLD, "seed": 0, "variant": f"{settings.get('input_variant')} (student)",
            "rank_in_fold": 1, "reason": "distilled from the ensemble, trained on every training case; score: its "
            "fold students' mean validation Dice"}


def distill(context: RunContext, ensemble: dict, records: Sequence[dict], clock: RunClock = NO_CLOCK) -> dict:
    """Teacher maps, fold students, the post-processing chosen on their out-of-fold predictions and the student
    trained on every case; stored in student/student.json (kept while it is of the same ensemble)."""
    work, teacher = context.work, ensemble_identity(ensemble)
    settings = student_settings(work, records, teacher_folder(work, ensemble))
    if work.student_file.exists():
        student = json.loads(work.student_file.read_text())
        if (student.get("teacher"), student.get("settings")) == (teacher, json_safe(settings)):
            logger.info(f"distill: reusing {work.relative(work.student_file)}")
            return student
        logger.info(f"distill: {work.relative(work.student_file)} is of another ensemble or student settings: "
                    "done again")
    write_teacher_maps(work, ensemble, training=context.training, dataroot=context.dataroot)
    configuration = work.bundles / configuration_name({**settings, "seed": 0})
    fold_records, _ = run_crossval(context, [settings], seeds=1, clock=clock, stage="distill", report=None,
                                   then=[all_cases_path(configuration)])
    for record in fold_records:
        record["variant"] = STUDENT_VARIANT
    table = "# Cross-validation: the student beside the ensemble's members\n\n" + cross_validation_table(
        [*records, *fold_records], tuple(context.profile["sweep_folds"]))
    write_text_atomic(work.reports / f"{STUDENT_REPORT}.md", table)
    write_text_atomic(work.reports / f"{STUDENT_REPORT}.json", json.dumps(json_safe(fold_records), indent=1))
    print(table, flush=True)
    folds = len({r["fold"] for r in fold_records})
    logger.info(f"distill: the student's post-processing, chosen on its {folds} fold students' out-of-fold "
                "predictions as the ensemble stage chooses (its 'ensemble:' lines follow)")
    chosen = make_ensemble(work, fold_records, folds, "mean", training=context.training, dataroot=context.dataroot)
    bundle = all_cases_bundle(generate_bundles(context, {**settings, "seed": 0}))

    def train(index: int = 0) -> float:
        with clock.training("distill", bundle):
            train_bundle(bundle, f"student {describe(settings)} on every case", datalist=context.datalist,
                         dataroot=context.dataroot)
        return 0.0  # validated on nothing

    if context.storage:  # one machine trains it, the others wait for it
        run_queue(context.storage, "distill", [work.relative(bundle)], train)
    train()  # trained already where the queue ran it
    student = {"model": STUDENT, "mode": "mean", "selection": "distilled", "teacher": teacher, "settings": settings,
               "members": [student_member(work, bundle, settings, fold_records)],
               "postprocessing": chosen["postprocessing"],
               "screen": None, "fold_students": chosen["members"]}
    write_text_atomic(work.student_file, json.dumps(json_safe(student), indent=1))
    logger.info(f"distill: the student is {work.relative(work.student_file)}")
    return student


def load_model(work: WorkDir, model: str | None = None) -> dict:
    """The finished model to predict with: `model` student or ensemble; None: the student where the work dir has
    one (a student exists only where the run was asked to distil one: that user wants its speed), else the
    ensemble."""
    if model not in (None, *MODELS):
        raise ValueError(f"--model {model!r}: choose {' or '.join(MODELS)} (default: the student where the work dir"
                         " has one)")
    if model != ENSEMBLE and work.student_file.exists():
        student = json.loads(work.student_file.read_text())
        if work.ensemble_file.exists() and student.get("teacher") != ensemble_identity(
                json.loads(work.ensemble_file.read_text())):
            raise WorkDirError(f"{work.relative(work.student_file)} was distilled from another ensemble than "
                               f"{work.relative(work.ensemble_file)} (rebuilt since): run the distill stage again "
                               "(a profile with distill: true), or predict with --model ensemble")
        return student
    if model == STUDENT:
        raise WorkDirError(f"{work.root} has no student ({work.relative(work.student_file)} is missing): run the"
                           " pipeline there with a profile whose distill is true, or predict with --model ensemble")
    if not work.ensemble_file.exists():
        raise WorkDirError(f"no ensemble in {work.root}: run the pipeline there first (it ends with ensemble.json)")
    return json.loads(work.ensemble_file.read_text())


def describe_model(model: dict) -> str:
    """'the student (one network distilled from the ensemble)' or 'the ensemble of N members'."""
    if model.get("model") == STUDENT:
        return "the student (one network distilled from the ensemble)"
    return f"the ensemble of {len(model['members'])} members"
