"""Held-out accuracy of the distilled student beside the ensemble and its best member, and what each cost to train.

    python benchmarks/accuracy.py --profile benchmarks/profiles/cpu_distill.yaml --work_dir accuracy_work
    python benchmarks/student_accuracy.py --work_dir accuracy_work/work --datalist accuracy_work/data/datalist.json
    python benchmarks/fresh_cases.py --out fresh --num_cases 60 --seed 1
    python benchmarks/student_accuracy.py --work_dir accuracy_work/work --datalist fresh/datalist.json

Each model predicts every labelled testing case as `predict` does (post-processing and never-empty rule
included): the ensemble (ensemble.json), the student (student/student.json, its post-processing chosen on its
fold students' out-of-fold predictions) and the ensemble's best member by validation Dice (chosen without the
held-out cases; with the ensemble's post-processing). Differences are paired per case, with a 95 % bootstrap
interval. Training minutes are the trainers' own epoch times summed from each bundle's training log: every
bundle the sweep and cross-validation trained (the ensemble's cost) and the student's fold students and the
student (the extra cost of distilling).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import nibabel as nib
import yaml

from bench_common import (HELD_OUT_METRICS, add_held_out_arguments, difference_cell, held_out_inputs, metric_cells,
                          paired_difference, publish)
from autoseg2d.evaluation.metrics import case_metrics, summarize_metrics  # noqa: E402
from autoseg2d.pipeline.distill import load_model  # noqa: E402
from autoseg2d.run.inference import read_mask  # noqa: E402
from autoseg2d.pipeline.predict import EnsemblePredictor  # noqa: E402
from autoseg2d.templates import BUNDLE_CONFIG, bundle_files  # noqa: E402


def best_member(ensemble: dict) -> dict:
    """The ensemble's member of highest validation Dice, alone, with the ensemble's post-processing."""
    member = max(ensemble["members"], key=lambda m: float(m["score"]))
    return {**ensemble, "members": [member], "screen": None}


def scores_of(predictor: EnsemblePredictor, testing: list[dict], dataroot: Path) -> tuple[list[dict], float]:
    """Per-case challenge metrics of the final masks, and the mean seconds per case."""
    scores, seconds = [], 0.0
    for entry in testing:
        truth, spacing = read_mask(dataroot / entry["label"])
        started = time.perf_counter()
        mask, *_ = predictor.predict(dataroot / entry["image"], spacing)
        seconds += time.perf_counter() - started
        scores.append(case_metrics((mask > 0).astype("uint8"), truth, spacing, case_id=entry["image"]))
    return scores, seconds / max(len(testing), 1)


def training_minutes(work_bundles: Path) -> dict:
    """Minutes of training summed from every trained bundle's log: the ensemble's bundles and the student's."""
    minutes = {"ensemble": 0.0, "student": 0.0}
    for config_file in sorted(work_bundles.glob(f"*/*/{BUNDLE_CONFIG}")):
        bundle = config_file.parents[1]
        log = bundle_files(bundle).training_log
        if not log.is_file():
            continue
        seconds = sum(float(row["epoch_time_s"]) for row in csv.DictReader(log.open()))
        student = bool(yaml.safe_load(config_file.read_text()).get("distill_targets"))
        minutes["student" if student else "ensemble"] += seconds / 60
    return {key: round(value, 1) for key, value in minutes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_arguments(parser)
    args = parser.parse_args()
    work, dataroot, testing, ensemble = held_out_inputs(args)
    models = {"ensemble": ensemble, "student": load_model(work, "student"), "best member": best_member(ensemble)}
    results = {"held_out_cases": len(testing), "size_px": nib.load(str(dataroot / testing[0]["image"])).shape[0],
               "training_minutes": training_minutes(work.bundles), "models": {}}
    for name, model in models.items():
        scores, seconds = scores_of(EnsemblePredictor(work, model), testing, dataroot)
        results["models"][name] = {"members": len(model["members"]), "summary": summarize_metrics(scores),
                                   "seconds_per_case": round(seconds, 2), "cases": scores}
        print(name, metric_cells(results["models"][name]["summary"]), flush=True)
    dice = {name: [case["dice"] for case in entry["cases"]] for name, entry in results["models"].items()}
    results["student_minus"] = {other: paired_difference(dice["student"], dice[other])
                                for other in ("ensemble", "best member")}
    header = ["model", "networks", *(name for name, _ in HELD_OUT_METRICS), "s per case", "student Dice minus this"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["models"].items():
        change = difference_cell(results["student_minus"][name]) if name in results["student_minus"] else ""
        lines.append("| " + " | ".join([name, str(entry["members"]), *metric_cells(entry["summary"]),
                                        f"{entry['seconds_per_case']:.2f}", change]) + " |")
    minutes = results["training_minutes"]
    lines.append(f"\nTraining: ensemble {minutes['ensemble']} min (every sweep and cross-validation training), "
                 f"student {minutes['student']} min more (its fold students and itself); {len(testing)} cases.")
    publish(results, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
