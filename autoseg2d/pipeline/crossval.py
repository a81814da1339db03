"""Stage 4: full cross-validation of the best configurations, scored per case with the challenge metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from autoseg2d.evaluation.metrics import case_metrics, class_case_metrics
from autoseg2d.evaluation.report import cross_validation_table, json_safe
from autoseg2d.pipeline.bundles import bundle_path, configuration_name, describe, generate_bundles, train_bundle
from autoseg2d.pipeline.inference import case_name, foreground, load_inferer, read_labels, read_mask
from autoseg2d.reporting.case_report import lesion_class_names
from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.pipeline.work_queue import run_queue
from autoseg2d.pipeline.workdir import WorkDir

logger = logging.getLogger(__name__)


def validation_cases(run: dict, fold: int) -> list[dict]:
    datalist = json.loads(Path(run["datalist"]).read_text())
    root = Path(run["dataroot"])
    return [{"image": root / e["image"], "label": root / e["label"]} for e in datalist["training"]
            if int(e["fold"]) == fold]


def evaluate_bundle(bundle: Path, run: dict, fold: int) -> list[dict]:
    """Per-case metrics of a fold model on its own validation cases (cached in model/cv_metrics.json)."""
    cache = bundle / "model" / "cv_metrics.json"
    if cache.exists():
        return json.loads(cache.read_text())
    inferer = load_inferer(bundle)
    class_names = lesion_class_names(inferer.config)
    cases = []
    for case in tqdm(validation_cases(run, fold), desc=f"{bundle.parent.name} fold {fold}: predict", unit="case",
                     leave=False, dynamic_ncols=True, disable=None):
        probabilities = inferer.infer(str(case["image"])).numpy()
        if len(class_names) > 1:
            truth, spacing = read_labels(case["label"])
            cases.append(class_case_metrics(probabilities.argmax(0), truth, spacing, class_names,
                                            case_id=case_name(case["image"])))
        else:
            truth, spacing = read_mask(case["label"])
            cases.append(case_metrics(foreground(probabilities), truth, spacing, case_id=case_name(case["image"])))
    write_text_atomic(cache, json.dumps(json_safe(cases), indent=1))
    return cases


def crossval_jobs(configurations: list[dict], runs: int, num_folds: int) -> list[dict]:
    """Every fold of every configuration for `runs` seeds, in training order."""
    return [{"settings": settings, "seed": seed, "fold": fold}
            for settings in configurations for seed in range(runs) for fold in range(num_folds)]


def run_crossval(work: WorkDir, run: dict, configurations: list[dict], runs: int, num_folds: int,
                 selection_folds: tuple = (), storage: str | None = None) -> list[dict]:
    """Train every fold of every configuration for `runs` seeds; return one record per trained bundle.

    selection_folds: the folds the sweep chose the configurations on, marked in the table.
    With a shared storage (--storage) the bundles form one queue that every machine running this
    stage takes from, so N machines train about N times faster; each then gathers every record.
    """
    jobs = crossval_jobs(configurations, runs, num_folds)

    def configuration(job: dict) -> Path:
        return generate_bundles(work, {**job["settings"], "seed": job["seed"]}, num_folds, run)

    def train_and_evaluate(index: int) -> dict:
        job = jobs[index]
        label = f"cv {index + 1}/{len(jobs)} {describe(job['settings'])} run {job['seed']} fold {job['fold']}"
        bundle = bundle_path(configuration(job), job["fold"])
        score = train_bundle(bundle, run, label)
        cases = [_restore_floats(c) for c in evaluate_bundle(bundle, run, job["fold"])]
        return {"variant": f"{job['settings'].get('input_variant')} (run {job['seed']})", "fold": job["fold"],
                "seed": job["seed"], "settings": job["settings"], "bundle": work.relative(bundle),
                "score": score, "cases": cases}

    if storage:
        names = [str(work.relative(bundle_path(work.bundles / configuration_name({**j["settings"], "seed": j["seed"]}),
                                               j["fold"]))) for j in jobs]
        # one machine generates every bundle before any is queued: BundleGen must not run twice on one folder
        run_queue(storage, "crossval", names, lambda index: train_and_evaluate(index)["score"],
                  prepare=lambda: [configuration(job) for job in jobs])
    records = [train_and_evaluate(index) for index in range(len(jobs))]  # trained already: reads the results
    table = cross_validation_table(records, selection_folds)
    write_text_atomic(work.reports / "cross_validation.md", "# Cross-validation\n\n" + table)
    write_text_atomic(work.reports / "cross_validation.json", json.dumps(json_safe(records), indent=1))
    return records


def _restore_floats(case: dict) -> dict:
    """json_safe stores inf/nan as strings; turn them back into floats (in per-class metrics too)."""
    restored = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in case.items()}
    if isinstance(case.get("classes"), dict):
        restored["classes"] = {name: _restore_floats(m) if m else m for name, m in case["classes"].items()}
    return restored
