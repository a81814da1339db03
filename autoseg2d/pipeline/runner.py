"""The whole pipeline, stage by stage; every stage skips what a previous run finished.

check -> analyze (DataAnalyzer) -> sweep (BundleGen + Optuna) -> crossval -> ensemble -> distill -> predict

The check stage resolves the run context (context.py); every later stage is a function of that
context and of what the earlier ones handed on (StageOutputs), registered in order in STAGES.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from autoseg2d import run_log
from autoseg2d.dicom.predict import predict_dicom
from autoseg2d.pipeline.analyze import analyze, settings_for_slice_thickness
from autoseg2d.run.bundles import (TrainingStopped, bundle_path, describe, generate_bundles, is_trained,
                                   train_bundle)
from autoseg2d.run.context import RunContext, resolve_context
from autoseg2d.pipeline.crossval import run_crossval
from autoseg2d.run.eta import NO_CLOCK, RunClock, planned_trainings
from autoseg2d.pipeline.distill import BUDGET_FACTOR, ENSEMBLE, STUDENT, describe_model, distill, load_model
from autoseg2d.pipeline.ensemble import build_ensemble
from autoseg2d.pipeline.predict import EnsemblePredictor, predict_images
from autoseg2d.run.profiles import first_trial_params
from autoseg2d.pipeline.sweep import best_per_variant, run_sweep
from autoseg2d.run.workdir import DEFAULT_WORK_DIR, WorkDir
from autoseg2d.reporting.geometry import SpacingRange

logger = logging.getLogger(__name__)

OUTPUT_KEYS = ("cross_validation", "ensemble", "student", "predictions", "log")


@dataclass
class StageOutputs:
    """What the stages hand on to the later ones; `summary` is what run_pipeline returns."""

    summary: dict
    base_settings: dict = field(default_factory=dict)  # the profile's train_overrides, data-derived settings, seed 0
    configurations: list[dict] = field(default_factory=list)  # the sweep's best, to cross-validate
    records: list[dict] = field(default_factory=list)  # one per cross-validated bundle
    cross_validation_table: str = ""  # reports/cross_validation.md
    ensemble: dict = field(default_factory=dict)  # ensemble/ensemble.json
    clock: RunClock = NO_CLOCK  # the trainings left and their time, for the console's estimate


def analyze_stage(context: RunContext, outputs: StageOutputs) -> None:
    analyze(context.work, context.datalist, context.dataroot)
    overrides = context.profile["train_overrides"]
    outputs.base_settings = {**overrides, **settings_for_slice_thickness(context.work.datastats, overrides),
                             "seed": 0}


def train_trial_fold(context: RunContext, base_settings: dict, params: dict, fold: int,
                     on_validation: Callable[[int, float, int], bool], clock: RunClock = NO_CLOCK) -> float:
    """One fold of a trial: the bundles of the run's base settings with the trial's parameters, trained
    until done or pruned (then the bundle can be continued by a later trial with the same parameters)."""
    bundle = bundle_path(generate_bundles(context, {**base_settings, **params}), fold)
    try:
        with clock.training("sweep", bundle):
            return train_bundle(bundle, f"trial {describe(params)} fold {fold}",
                                datalist=context.datalist, dataroot=context.dataroot, on_validation=on_validation)
    except TrainingStopped:
        raise optuna.TrialPruned() from None


def sweep_stage(context: RunContext, outputs: StageOutputs) -> None:
    profile, clock = context.profile, outputs.clock
    clock.start()
    study = run_sweep(context.sweep_storage, profile["search_space"], profile["sweep_trials"],
                      list(profile["sweep_folds"]),
                      functools.partial(train_trial_fold, context, outputs.base_settings, clock=clock),
                      single_owner=context.storage is None, first_params=first_trial_params(profile),
                      on_trial_start=lambda trials_left: clock.plan("sweep", trials_left * len(profile["sweep_folds"])))
    clock.plan("sweep", 0)
    outputs.configurations = [{**outputs.base_settings, **params}
                              for params in best_per_variant(study, profile["cv_top_variants"])]
    outputs.summary["configurations"] = outputs.configurations


def crossval_stage(context: RunContext, outputs: StageOutputs) -> None:
    outputs.records, outputs.cross_validation_table = run_crossval(
        context, outputs.configurations, seeds=context.profile["cv_runs"],
        selection_folds=tuple(context.profile["sweep_folds"]), clock=outputs.clock)
    print(outputs.cross_validation_table, flush=True)
    outputs.summary["cross_validation"] = str(context.work.reports / "cross_validation.md")


def ensemble_stage(context: RunContext, outputs: StageOutputs) -> None:
    profile = context.profile
    outputs.ensemble = build_ensemble(context.work, outputs.records, profile["ensemble_size"], profile["ensemble_mode"],
                                      profile["ensemble_selection"], profile["ensemble_tolerance"], context.storage,
                                      profile["ensemble_screen_below"], training=context.training,
                                      dataroot=context.dataroot)
    outputs.summary["ensemble"] = str(context.work.ensemble_file)


def distill_stage(context: RunContext, outputs: StageOutputs) -> None:
    if not context.profile["distill"]:
        logger.info("distill: off (the profile's distill is false)")
        return
    distill(context, outputs.ensemble, outputs.records, clock=outputs.clock)
    outputs.summary["student"] = str(context.work.student_file)


def predict_stage(context: RunContext, outputs: StageOutputs) -> None:
    testing = [context.dataroot / e["image"] for e in context.testing]
    if testing:
        model = load_model(context.work, STUDENT if context.profile["distill"] else ENSEMBLE)
        logger.info(f"predict: with {describe_model(model)}")
        predict_images(EnsemblePredictor(context.work, model), testing, context.work.predictions,
                       training_spacing=SpacingRange.from_datastats(context.work.datastats))
        outputs.summary["predictions"] = str(context.work.predictions)
    else:
        logger.info("predict: the datalist has no 'testing' images")


# Every stage after check, in order; check itself is resolve_context (the stages need what it settles).
STAGES: dict[str, Callable[[RunContext, StageOutputs], None]] = {
    "analyze": analyze_stage, "sweep": sweep_stage, "crossval": crossval_stage, "ensemble": ensemble_stage,
    "distill": distill_stage, "predict": predict_stage,
}
STAGE_NAMES = ("check", *STAGES)


def _announce(name: str) -> None:
    run_log.route_library_loggers()  # a library imported by the previous stage may print by itself
    logger.info(f"=== stage {STAGE_NAMES.index(name) + 1}/{len(STAGE_NAMES)}: {name} ===")


def run_pipeline(datalist: str | None = None, dataroot: str | None = None, work_dir: str = DEFAULT_WORK_DIR,
                 profile: str | None = None, modality: str | None = None, num_folds: int | None = None,
                 storage: str | None = None, skip_bad: bool = False, until: str = "predict") -> dict:
    """Run the stages up to `until`; rerunning continues where the last run stopped."""
    if until not in STAGE_NAMES:
        raise ValueError(f"until='{until}' is not a stage; choose one of {', '.join(STAGE_NAMES)}")
    started = time.time()
    _announce("check")
    context = resolve_context(work_dir, datalist, dataroot, profile, modality, num_folds, storage, skip_bad)
    log_file = run_log.attach_file(context.work.root / run_log.LOG_FILE_NAME)
    logger.info(f"log: {log_file} (details and other libraries' messages; --debug shows them here too)")
    outputs = StageOutputs(summary={"work_dir": str(context.work.root), "num_folds": context.num_folds,
                                    "profile": context.profile_name, "log": str(log_file)},
                           clock=RunClock(planned_trainings(context.profile, context.num_folds), is_trained,
                                          enabled=context.storage is None,  # other machines' trainings: unseen
                                          cost={"distill": BUDGET_FACTOR}))
    for name in STAGE_NAMES[1:STAGE_NAMES.index(until) + 1]:
        _announce(name)
        STAGES[name](context, outputs)
    if until == STAGE_NAMES[-1]:
        # the cross-validation table was printed by its stage; the end names where it is
        print(f"\npipeline finished in {(time.time() - started) / 60:.1f} min; "
              f"outputs in {context.work.root}:\n"
              + "".join(f"  {key}: {value}\n" for key, value in outputs.summary.items() if key in OUTPUT_KEYS),
              flush=True)
    return outputs.summary


def predict(input: str, output: str, work_dir: str = DEFAULT_WORK_DIR, dicom_seg: bool = False,
            allow_empty: bool = False, model: str | None = None) -> list[dict]:
    """Apply a finished model to every NIfTI file in `input`, or to the DICOM CT series there (one series'
    slices, or one folder per series); masks go to `output` under the same names (<series folder>.nii.gz for
    DICOM) beside report.csv, report.json and qa/ pictures. --dicom_seg also writes <series folder>.seg.dcm.
    --allow_empty switches the never-empty rescue off (screening data with normal scans): a case the model
    finds nothing in stays empty, flagged "would be rescued" in the report. --model student | ensemble: the
    student distilled from the ensemble (the default where the work dir has one) or the ensemble."""
    work = WorkDir.create(work_dir)
    chosen = load_model(work, model)
    run_log.attach_file(work.root / run_log.LOG_FILE_NAME)
    logger.info(f"predict: with {describe_model(chosen)}")
    input_dir = Path(str(input))
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input} is not a folder; give the folder of NIfTI scans or DICOM series")
    images = sorted(p for p in input_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if images and dicom_seg:
        raise ValueError(f"--dicom_seg needs DICOM input, but {input} holds NIfTI files; a SEG must reference the"
                         " DICOM slices it was drawn on")
    predictor = EnsemblePredictor(work, chosen, never_empty=not allow_empty)
    spacing = SpacingRange.from_datastats(work.datastats)  # what the members were trained on, where known
    if images:
        return predict_images(predictor, images, Path(output), training_spacing=spacing)
    return predict_dicom(predictor, input_dir, Path(str(output)), dicom_seg, training_spacing=spacing)
