"""Held-out accuracy of ensembles that different member selections build from the same cross-validated bundles.

    python benchmarks/member_selection.py --work_dir accuracy_work/work --size 5 --tolerance 0.002

Needs a work dir whose pipeline ran through the crossval stage and whose datalist has labelled
"testing" cases (benchmarks/accuracy.py and the demo write such sets). For each selection,
fold_balanced (--size members), greedy (--size members) and greedy (--tolerance), it takes the
members, chooses post-processing on their out-of-fold cases by the pipeline's rule, and scores
the held-out cases with the four challenge metrics; it also prints greedy's members-vs-accuracy
table (out-of-fold) and the seconds each selection took. Nothing in the work dir is changed,
except that bundles cross-validated before their validation maps were kept get them now.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from accuracy import METRICS, held_out_scores  # noqa: E402
from bench_common import print_machine, write_result  # noqa: E402
from autoseg2d.evaluation.metrics import summarize_metrics  # noqa: E402
from autoseg2d.evaluation.tables import json_safe  # noqa: E402
from autoseg2d.pipeline.ensemble import make_ensemble  # noqa: E402
from autoseg2d.pipeline.predict import EnsemblePredictor  # noqa: E402
from autoseg2d.pipeline.greedy_members import curve_markdown  # noqa: E402
from autoseg2d.run.workdir import WorkDir  # noqa: E402


def selections(size: int, tolerance: float) -> dict[str, dict]:
    return {f"fold_balanced, size {size}": {"selection": "fold_balanced", "tolerance": None},
            f"greedy, size {size}": {"selection": "greedy", "tolerance": None},
            f"greedy, tolerance {tolerance}": {"selection": "greedy", "tolerance": tolerance}}


def markdown(results: dict) -> str:
    header = ["selection", "members (per fold)", "post-processing", *(name for name, _ in METRICS), "select s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results.items():
        values = [f"{entry['summary'][key]:.4f}" if isinstance(entry["summary"][key], float)
                  else str(entry["summary"][key]) for _, key in METRICS]
        lines.append("| " + " | ".join([name, entry["members_per_fold"], entry["steps"], *values,
                                        f"{entry['seconds']:.1f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="a pipeline work dir that finished cross-validation")
    parser.add_argument("--size", type=int, default=5, help="members for fold_balanced and size-greedy")
    parser.add_argument("--tolerance", type=float, default=0.002, help="Dice tolerance for greedy")
    parser.add_argument("--mode", default="mean", choices=("mean", "vote"))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    print_machine()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    work = WorkDir.create(args.work_dir)
    run = work.load_run()
    records = json.loads((work.reports / "cross_validation.json").read_text())
    content = json.loads(Path(run["datalist"]).read_text())
    testing, cases = content["testing"], {"training": content["training"], "dataroot": Path(run["dataroot"])}
    results, curve = {}, None
    for name, options in selections(args.size, args.tolerance).items():
        started = time.time()
        ensemble = make_ensemble(work, records, args.size, args.mode, options["selection"], options["tolerance"],
                                 **cases)
        seconds = time.time() - started
        curve = curve or ensemble.get("greedy")
        scores = held_out_scores(EnsemblePredictor(work, ensemble), testing, cases["dataroot"])
        folds: dict = {}
        for member in ensemble["members"]:
            folds[member["fold"]] = folds.get(member["fold"], 0) + 1
        steps = (ensemble.get("postprocessing") or {}).get("steps", [])
        results[name] = {"summary": summarize_metrics(scores), "seconds": seconds,
                         "members": [m["bundle"] for m in ensemble["members"]],
                         "members_per_fold": ", ".join(f"{f}: {n}" for f, n in sorted(folds.items())),
                         "steps": "; ".join(f"{s['name']} {', '.join(f'{v}' for k, v in s.items() if k != 'name')}"
                                            for s in steps) or "none"}
    figures = {"candidates": len(records), "held_out": len(testing), "results": results, "greedy_curve": curve["curve"]}
    print(json.dumps(json_safe(figures), indent=1))
    print(f"\ngreedy, out-of-fold (before post-processing), {len(records)} candidate bundles:\n"
          + curve_markdown(curve["curve"], curve["per_fold"]))
    print(f"\nheld-out cases: {len(testing)}\n\n" + markdown(results))
    if args.out:
        write_result(args.out, figures)


if __name__ == "__main__":
    main()
