"""Held-out accuracy on hard synthetic head CT: the ensemble a user gets.

    python benchmarks/accuracy.py                        # 24 cases at 128 px, 6 held out, --profile cpu
    python benchmarks/accuracy.py --num_normal_test 2 --out benchmarks/results/accuracy_cpu.json

Generates the cases with autoseg2d.synthetic.hard (small bleeds, four kinds, hyperdense
mimics, partial volume, varying noise), runs the whole pipeline (`run_autoseg.py` stages,
timed), then predicts the held-out cases with the pipeline's ensemble (its members and
post-processing, as `predict` runs them). Prints JSON and Markdown. Accuracy comes from the
held-out cases only; the cross-validation table is printed for context.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_common import print_machine, write_result  # noqa: E402
from autoseg2d.datalist import read_datalist  # noqa: E402
from autoseg2d.evaluation.metrics import case_metrics, summarize_metrics  # noqa: E402
from autoseg2d.evaluation.tables import json_safe  # noqa: E402
from autoseg2d.pipeline.predict import EnsemblePredictor  # noqa: E402
from autoseg2d.run.inference import read_mask  # noqa: E402
from autoseg2d.pipeline.runner import run_pipeline  # noqa: E402
from autoseg2d.run.workdir import WorkDir  # noqa: E402
from autoseg2d.synthetic.hard import write_hard_dataset  # noqa: E402

METRICS = (("Dice", "dice_mean"), ("RVD", "rvd_mean"), ("NSD", "nsd_mean"), ("HD mm", "hd_mm_mean"),
           ("HD mm (finite)", "hd_mm_mean_finite"), ("HD inf", "num_hd_inf"))


def held_out_scores(predictor: EnsemblePredictor, testing: list[dict], dataroot: Path) -> list[dict]:
    """Challenge metrics of each held-out case's final mask (post-processing included)."""
    scores = []
    for entry in testing:
        truth, spacing = read_mask(dataroot / entry["label"])
        mask, *_ = predictor.predict(dataroot / entry["image"], spacing)  # as predict does (screen included)
        scores.append(case_metrics((mask > 0).astype("uint8"), truth, spacing, case_id=entry["image"]))
    return scores


def markdown(results: dict) -> str:
    header = ["ensemble", "members (per fold)", "post-processing", *(name for name, _ in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    entry = results["now"]  # the key earlier result files also hold "previous" beside
    values = [f"{entry['summary'][key]:.4f}" if isinstance(entry["summary"][key], float)
              else str(entry["summary"][key]) for _, key in METRICS]
    lines.append("| " + " | ".join(["now", entry["members_per_fold"], entry["steps"], *values]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="accuracy_work")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--num_train", type=int, default=18)
    parser.add_argument("--num_test", type=int, default=6)
    parser.add_argument("--num_normal_test", type=int, default=0, help="held-out scans without hemorrhage")
    parser.add_argument("--size_px", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="continue an earlier run in --work_dir (wall time "
                        "then counts only what was left)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    print_machine()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    root = Path(args.work_dir).resolve()
    if root.exists() and not args.keep:
        shutil.rmtree(root)
    data = root / "data"
    datalist = write_hard_dataset(data, num_train=args.num_train, num_test=args.num_test, num_folds=5,
                                  size_px=args.size_px, seed=args.seed, num_normal_test=args.num_normal_test)
    started = time.time()
    run_pipeline(str(datalist), str(data), str(root / "work"), profile=args.profile)
    pipeline_minutes = (time.time() - started) / 60

    work = WorkDir.create(root / "work")
    testing = read_datalist(datalist)["testing"]
    ensemble = json.loads(work.ensemble_file.read_text())
    results = {"pipeline_minutes": round(pipeline_minutes, 2), "profile": args.profile,
               "cases": {"train": args.num_train, "held_out": args.num_test, "normal_held_out": args.num_normal_test,
                         "size_px": args.size_px, "slices": [nib.load(str(data / e["image"])).shape[2]
                                                             for e in testing]},
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__}}
    scores = held_out_scores(EnsemblePredictor(work, ensemble), testing, data)
    folds = {}
    for member in ensemble["members"]:
        folds[member["fold"]] = folds.get(member["fold"], 0) + 1
    steps = (ensemble.get("postprocessing") or {}).get("steps", [])
    results["now"] = {"summary": summarize_metrics(scores), "cases": scores,
                      "members_per_fold": ", ".join(f"{f}: {n}" for f, n in sorted(folds.items())),
                      "steps": "; ".join(f"{s['name']} {', '.join(f'{v}' for k, v in s.items() if k != 'name')}"
                                         for s in steps) or "none"}
    text = json.dumps(json_safe(results), indent=1)
    print(text)
    print((work.reports / "cross_validation.md").read_text())
    print(f"held-out cases: {args.num_test} ({args.num_normal_test} without hemorrhage); pipeline "
          f"{pipeline_minutes:.1f} min with --profile {args.profile}\n")
    print(markdown(results))
    if args.out:
        write_result(args.out, results)


if __name__ == "__main__":
    main()
