"""Stage 4/7: full cross-validation of the best configurations, scored per case with the challenge metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from tqdm import tqdm

from autoseg2d.datalist import case_name
from autoseg2d.evaluation.metrics import case_metrics, class_case_metrics
from autoseg2d.evaluation.tables import cross_validation_table, from_json_safe, json_safe
from autoseg2d.run.eta import NO_CLOCK, RunClock
from autoseg2d.run.bundles import bundle_path, configuration_name, describe, generate_bundles, train_bundle
from autoseg2d.run.fold_probabilities import is_current, store_foreground
from autoseg2d.run.inference import foreground, load_inferer, read_labels, read_mask
from autoseg2d.reporting.case_report import lesion_class_names
from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.run.work_queue import run_queue
from autoseg2d.templates import bundle_files
from autoseg2d.run.context import RunContext

logger = logging.getLogger(__name__)

LABELS = {"crossval": "cv", "distill": "student"}  # a training's console line starts with its stage's word
CASE_TEXT = ("case_id", "note")  # the text of a case's metrics (cv_metrics.json), never read back as floats


def validation_cases(fold: int, *, training: Sequence[dict], dataroot: Path) -> list[dict]:
    """The training entries of `fold` (those its bundle validated on), with absolute image and label paths."""
    return [{"image": dataroot / e["image"], "label": dataroot / e["label"]} for e in training
            if int(e["fold"]) == fold]


def evaluate_bundle(bundle: Path, fold: int, validation: list[dict]) -> list[dict]:
    """Per-case metrics of a fold model on its own validation cases, {image, label} each (cached beside its
    checkpoints while they are of its current model, fold_probabilities.is_current)."""
    cache = bundle_files(bundle).cv_metrics
    if is_current(bundle, cache):
        return json.loads(cache.read_text())
    inferer = load_inferer(bundle)
    class_names = lesion_class_names(inferer.config)
    cases = []
    for case in tqdm(validation, desc=f"{bundle.parent.name} fold {fold}: predict", unit="case",
                     leave=False, dynamic_ncols=True, disable=None):
        probabilities = inferer.infer(str(case["image"])).numpy()
        store_foreground(bundle, case_name(case["image"]), probabilities)  # for greedy member selection
        if len(class_names) > 1:
            truth, spacing = read_labels(case["label"])
            cases.append(class_case_metrics(probabilities.argmax(0), truth, spacing, class_names,
                                            case_id=case_name(case["image"])))
        else:
            truth, spacing = read_mask(case["label"])
            cases.append(case_metrics(foreground(probabilities), truth, spacing, case_id=case_name(case["image"])))
    write_text_atomic(cache, json.dumps(json_safe(cases), indent=1))
    return cases


def crossval_jobs(configurations: list[dict], seeds: int, num_folds: int) -> list[dict]:
    """Every fold of every configuration for `seeds` seeds, in training order."""
    return [{"settings": settings, "seed": seed, "fold": fold}
            for settings in configurations for seed in range(seeds) for fold in range(num_folds)]


def run_crossval(context: RunContext, configurations: list[dict], *, seeds: int, selection_folds: tuple = (),
                 clock: RunClock = NO_CLOCK, stage: str = "crossval", report: str | None = "cross_validation",
                 then: Sequence[Path] = ()) -> tuple[list[dict], str]:
    """Train every fold of every configuration for `seeds` seeds; return one record per trained bundle and
    the cross-validation table (reports/<report>.md, also written with the records as .json; None: not written).

    selection_folds: the folds the sweep chose the configurations on, marked in the table. `stage` names the
    trainings for the run's clock and the shared queue (the distill stage cross-validates its students too);
    `then`: bundles the stage trains after these, counted by the clock from the start.
    With a shared storage (--storage) the bundles form one queue that every machine running this
    stage takes from, so N machines train about N times faster; each then gathers every record.
    """
    work = context.work
    jobs = crossval_jobs(configurations, seeds, context.num_folds)

    def configuration(job: dict) -> Path:
        return generate_bundles(context, {**job["settings"], "seed": job["seed"]})

    def job_bundle(job: dict) -> Path:  # before generation: its folder is named by its settings
        return bundle_path(work.bundles / configuration_name({**job["settings"], "seed": job["seed"]}), job["fold"])

    def train_and_evaluate(index: int) -> dict:
        job = jobs[index]
        label = (f"{LABELS.get(stage, stage)} {index + 1}/{len(jobs)} {describe(job['settings'])} run {job['seed']} "
                 f"fold {job['fold']}")
        bundle = bundle_path(configuration(job), job["fold"])
        with clock.training(stage, bundle):
            score = train_bundle(bundle, label, datalist=context.datalist, dataroot=context.dataroot)
        validation = validation_cases(job["fold"], training=context.training, dataroot=context.dataroot)
        cases = [from_json_safe(c, CASE_TEXT) for c in evaluate_bundle(bundle, job["fold"], validation)]
        return {"variant": f"{job['settings'].get('input_variant')} (run {job['seed']})", "fold": job["fold"],
                "seed": job["seed"], "settings": job["settings"], "bundle": work.relative(bundle),
                "score": score, "cases": cases}

    clock.plan_bundles(stage, [*(job_bundle(job) for job in jobs), *then])
    if context.storage:
        names = [str(work.relative(job_bundle(job))) for job in jobs]
        # one machine generates every bundle before any is queued: BundleGen must not run twice on one folder
        run_queue(context.storage, stage, names, lambda index: train_and_evaluate(index)["score"],
                  prepare=lambda: [configuration(job) for job in jobs])
    records = [train_and_evaluate(index) for index in range(len(jobs))]  # trained already: reads the results
    table = "# Cross-validation\n\n" + cross_validation_table(records, selection_folds)
    if report:
        write_text_atomic(work.reports / f"{report}.md", table)
        write_text_atomic(work.reports / f"{report}.json", json.dumps(json_safe(records), indent=1))
    return records, table
