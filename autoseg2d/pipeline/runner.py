"""The whole pipeline, stage by stage; every stage skips what a previous run finished.

check -> analyze (DataAnalyzer) -> sweep (BundleGen + Optuna) -> crossval -> ensemble -> predict
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import optuna

from autoseg2d.check import check_inputs
from autoseg2d.atomic_files import write_json_atomic
from autoseg2d.datalist import ensure_folds, resolve_datalist, validate_folds
from autoseg2d.dicom.predict import predict_dicom
from autoseg2d.pipeline.analyze import analyze, settings_for_slice_thickness
from autoseg2d.pipeline.bundles import TrainingStopped, bundle_path, describe, generate_bundles, train_bundle
from autoseg2d.pipeline.crossval import run_crossval
from autoseg2d.pipeline.ensemble import EnsemblePredictor, build_ensemble, predict_images
from autoseg2d.pipeline.profiles import load_profile
from autoseg2d.pipeline.sweep import best_per_variant, run_sweep
from autoseg2d.pipeline.workdir import WorkDir, WorkDirError, file_sha256

logger = logging.getLogger(__name__)

STAGES = ("check", "analyze", "sweep", "crossval", "ensemble", "predict")
DEFAULT_NUM_FOLDS = 5
OUTPUT_KEYS = ("cross_validation", "ensemble", "predictions")


def _stage(name: str) -> None:
    logger.info(f"=== stage {STAGES.index(name) + 1}/{len(STAGES)}: {name} ===")


def prepare_datalist(work: WorkDir, datalist: Path, dataroot: Path, num_folds: int | None) -> tuple[Path, int]:
    """The datalist to use: the user's own when it has folds, else a copy in the work dir with folds added."""
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        return datalist, num_folds  # the check stage reports what is wrong with the file
    if not isinstance(content, dict) or all("fold" in e for e in content.get("training", [])):
        return datalist, num_folds
    with_folds = ensure_folds(content, num_folds or DEFAULT_NUM_FOLDS, seed=0, dataroot=str(dataroot))
    target = work.root / f"{datalist.stem}_with_folds.json"
    write_json_atomic(with_folds, target)
    logger.info(f"{datalist.name} has no folds: split into {num_folds or DEFAULT_NUM_FOLDS} in {target}")
    return target, validate_folds(with_folds)


def run_pipeline(datalist: str | None = None, dataroot: str | None = None, work_dir: str = "work",
                 profile: str | None = None, modality: str | None = None, num_folds: int | None = None,
                 storage: str | None = None, skip_bad: bool = False, until: str = "predict") -> dict:
    """Run the stages up to `until`; rerunning continues where the last run stopped."""
    if until not in STAGES:
        raise ValueError(f"until='{until}' is not a stage; choose one of {', '.join(STAGES)}")
    started = time.time()
    work = WorkDir.create(work_dir)
    previous = json.loads(work.run_file.read_text()) if work.run_file.exists() else {}
    if (datalist is None or dataroot is None) and not previous:
        raise WorkDirError("give --datalist and --dataroot (or a --work_dir that has run before)")
    datalist = datalist or str(work.absolute(previous["datalist"]))
    dataroot = dataroot or str(work.absolute(previous["dataroot"]))
    profile = profile or previous.get("profile", "gpu")
    modality = modality or previous.get("modality", "ct")
    num_folds = num_folds or previous.get("num_folds")
    datalist_path, dataroot_path = resolve_datalist(datalist).resolve(), Path(str(dataroot)).resolve()
    settings = load_profile(profile)
    profile_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    # Before anything is written: a rerun must not mix results made under other settings.
    work.check_same_run({"modality": modality, "profile": profile, "profile_sha256": profile_sha256,
                         **({"num_folds": num_folds} if num_folds else {}),
                         **({"datalist_sha256": file_sha256(datalist_path)} if datalist_path.is_file() else {})})

    _stage("check")
    used_datalist, folds = prepare_datalist(work, datalist_path, dataroot_path, num_folds)
    report = check_inputs(str(used_datalist), str(dataroot_path), modality=modality, num_folds=folds,
                          work_dir=str(work.root), skip_bad=skip_bad, config_overrides=settings["train_overrides"])
    folds = report.get("num_folds") or folds
    if report["cleaned_datalist"]:
        used_datalist = Path(report["cleaned_datalist"])
        logger.info(f"check: {len(report['skipped'])} bad cases left out; using {work.relative(used_datalist)}")
    work.record_run(datalist_path, dataroot_path, modality, profile, profile_sha256=profile_sha256, num_folds=folds,
                    used_datalist_sha256=file_sha256(used_datalist))
    run = {"datalist": used_datalist, "dataroot": dataroot_path, "modality": modality,
           "class_names": report.get("class_names", [])}
    summary: dict = {"work_dir": str(work.root), "num_folds": folds, "profile": profile}
    if until == "check":
        return summary

    _stage("analyze")
    analyze(work, used_datalist, dataroot_path)
    slice_thickness = settings_for_slice_thickness(work.datastats, settings["train_overrides"])
    if until == "analyze":
        return summary

    _stage("sweep")
    base = {**settings["train_overrides"], **slice_thickness, "seed": 0}

    def train_fold(params: dict, fold: int, report) -> float:
        configuration = generate_bundles(work, {**base, **params}, folds, run)
        try:
            return train_bundle(bundle_path(configuration, fold), run, f"trial {describe(params)} fold {fold}", report)
        except TrainingStopped:
            raise optuna.TrialPruned() from None

    study = run_sweep(storage or work.sweep_storage_url, settings["search_space"], settings["sweep_trials"],
                      list(settings["sweep_folds"]), train_fold, single_owner=storage is None)
    configurations = [{**base, **params} for params in best_per_variant(study, settings["cv_top_variants"])]
    summary["configurations"] = configurations
    if until == "sweep":
        return summary

    _stage("crossval")
    records = run_crossval(work, run, configurations, settings["cv_runs"], folds,
                           selection_folds=tuple(settings["sweep_folds"]), storage=storage)
    table = (work.reports / "cross_validation.md").read_text()
    print(table, flush=True)
    summary["cross_validation"] = str(work.reports / "cross_validation.md")
    if until == "crossval":
        return summary

    _stage("ensemble")
    ensemble = build_ensemble(work, run, records, settings["ensemble_size"], settings["ensemble_mode"])
    summary["ensemble"] = str(work.ensemble_file)
    if until == "ensemble":
        return summary

    _stage("predict")
    testing = [dataroot_path / e["image"] for e in json.loads(used_datalist.read_text()).get("testing", [])]
    if testing:
        predict_images(EnsemblePredictor(work, ensemble), testing, work.predictions)
        summary["predictions"] = str(work.predictions)
    else:
        logger.info("predict: the datalist has no 'testing' images")
    print(f"\n{table}\npipeline finished in {(time.time() - started) / 60:.1f} min; outputs in {work.root}:\n"
          + "".join(f"  {key}: {value}\n" for key, value in summary.items() if key in OUTPUT_KEYS), flush=True)
    return summary


def predict(input: str, output: str, work_dir: str = "work", dicom_seg: bool = False) -> list[dict]:
    """Apply a finished ensemble to every NIfTI file in `input`, or to the DICOM CT series there (one series'
    slices, or one folder per series); masks go to `output` under the same names (<series folder>.nii.gz for
    DICOM) beside report.csv, report.json and qa/ pictures. --dicom_seg also writes <series folder>.seg.dcm."""
    work = WorkDir.create(work_dir)
    if not work.ensemble_file.exists():
        raise WorkDirError(f"no ensemble in {work.root}: run the pipeline there first (it ends with ensemble.json)")
    input_dir = Path(str(input))
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input} is not a folder; give the folder of NIfTI scans or DICOM series")
    images = sorted(p for p in input_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if images and dicom_seg:
        raise ValueError(f"--dicom_seg needs DICOM input, but {input} holds NIfTI files; a SEG must reference the"
                         " DICOM slices it was drawn on")
    predictor = EnsemblePredictor(work, json.loads(work.ensemble_file.read_text()))
    if images:
        return predict_images(predictor, images, Path(output))
    return predict_dicom(predictor, input_dir, Path(str(output)), dicom_seg)
