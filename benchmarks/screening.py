"""Ensemble screening: held-out accuracy and the work the members do, every member on every slice vs screened.

    python benchmarks/screening.py --work_dir accuracy_work/work --datalist accuracy_work/data/datalist.json

Needs a work dir whose ensemble stage ran and a datalist with labelled "testing" cases
(benchmarks/accuracy.py writes such a pair from the hard synthetic generator). The members are the
ensemble's plus, with --all_bundles, every other trained bundle of the work dir (sweep trials of
other input variants), copied to a scratch folder with this repository's template scripts
(precision_accuracy.upgraded_copy). Each held-out case is predicted by every configuration in turn, so
drifting machine speed hits them alike: "every member" (no screen), the product's screen (each
fold's first member screens, ensemble_screen_below) and a harsher one (only the first
--stress_members screen). Printed as JSON and Markdown: the four challenge metrics with the
ensemble's post-processing, voxels and cases whose final mask differs from every member's, the
share of head slices the later members still ran, seconds per case, and what that share means
for the default ensemble (bench_common.screened_work; the paper's 18 members, 5 screening).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

# bench_common first: it puts the repository and the template's scripts on sys.path
from bench_common import (HELD_OUT_METRICS, add_held_out_arguments, default_ensemble, held_out_inputs, metric_cells,
                          publish, screened_work)
from autoseg2d.evaluation.metrics import case_metrics, summarize_metrics  # noqa: E402
from autoseg2d.pipeline.ensemble import screening_members  # noqa: E402
from autoseg2d.pipeline.predict import EnsemblePredictor  # noqa: E402
from autoseg2d.run.inference import load_inferer, read_mask  # noqa: E402
from autoseg2d.run.profiles import default_profile_name, load_profile  # noqa: E402
from autoseg2d.run.workdir import WorkDir  # noqa: E402
from autoseg2d.templates import BUNDLE_CONFIG  # noqa: E402
from precision_accuracy import upgraded_copy  # noqa: E402
from predictor import cpu_bf16_units  # noqa: E402


def members_of(work: WorkDir, ensemble: dict, all_bundles: bool) -> list[dict]:
    """The ensemble's members, then (all_bundles) the work dir's other trained bundles, by fold."""
    members = [dict(m) for m in ensemble["members"]]
    if all_bundles:
        known = {work.absolute(m["bundle"]) for m in members}
        for model in sorted(work.root.glob("bundles/*/segresnet2d_*/model/model.pt")):
            bundle = model.parents[1]
            if bundle not in known:
                fold = yaml.safe_load((bundle / BUNDLE_CONFIG).read_text())["fold"]
                members.append({"bundle": str(bundle), "fold": int(fold)})
    return members


def predictor_of(work: WorkDir, ensemble: dict, members: list[dict], scratch: Path) -> EnsemblePredictor:
    predictor = EnsemblePredictor.__new__(EnsemblePredictor)
    predictor.bundles = [work.absolute(m["bundle"]) for m in members]
    predictor.members = [load_inferer(upgraded_copy(bundle, scratch / f"member_{i}", {}))
                         for i, bundle in enumerate(predictor.bundles)]
    predictor.mode, predictor.postprocessing = ensemble["mode"], ensemble.get("postprocessing")
    predictor.screen = None
    return predictor


def head_slices(predictor: EnsemblePredictor, image: Path) -> int:
    """Slices with head tissue: the ones any member runs on."""
    member = predictor.members[0]
    return sum(len(slices) for slices in member.predictor.batch_slices(member.read(str(image))[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_arguments(parser)
    parser.add_argument("--all_bundles", action="store_true", help="every trained bundle of the work dir is a member")
    parser.add_argument("--below", type=float, default=load_profile(default_profile_name())["ensemble_screen_below"],
                        help="ensemble_screen_below (default: the default profile's)")
    parser.add_argument("--stress_members", type=int, default=2, help="screening members of the harsher screen")
    args = parser.parse_args()
    work, dataroot, testing, ensemble = held_out_inputs(args)
    members = members_of(work, ensemble, args.all_bundles)
    stress = {"members": list(range(args.stress_members)), "below": args.below}
    screens = {"every member": None,
               "screen: each fold's first": {"members": screening_members(members), "below": args.below},
               f"screen: first {args.stress_members}": stress}
    rows = {name: {"scores": [], "seconds": [], "skipped": [], "changed": [], "screen": screen}
            for name, screen in screens.items()}
    with tempfile.TemporaryDirectory() as scratch:
        predictor = predictor_of(work, ensemble, members, Path(scratch))
        heads = []
        for entry in testing:
            truth, spacing = read_mask(dataroot / entry["label"])
            heads.append(head_slices(predictor, dataroot / entry["image"]))
            reference = None
            for name, row in rows.items():
                predictor.screen = row["screen"]
                started = time.perf_counter()
                mask, _, skipped, _ = predictor.predict(dataroot / entry["image"], spacing)
                row["seconds"].append(time.perf_counter() - started)
                reference = mask if reference is None else reference
                row["changed"].append(int(np.count_nonzero((mask > 0) != (reference > 0))))
                row["skipped"].append(skipped)
                row["scores"].append(case_metrics((mask > 0).astype("uint8"), truth, spacing, case_id=entry["image"]))
            print(entry["image"], {name: (row["skipped"][-1], row["changed"][-1]) for name, row in rows.items()},
                  flush=True)
    results = {"cpu_bf16_units": cpu_bf16_units(), "members": len(members),
               "members_per_fold": {str(f): sum(m["fold"] == f for m in members)
                                    for f in sorted({m["fold"] for m in members})},
               "held_out_cases": len(testing), "head_slices": heads, "below": args.below,
               "postprocessing": [s["name"] for s in (ensemble.get("postprocessing") or {}).get("steps", [])],
               "rows": {}}
    for name, row in rows.items():
        screening = len(row["screen"]["members"]) if row["screen"] else len(members)
        later = len(members) - screening
        kept = 1.0 - sum(row["skipped"]) / max(sum(heads), 1) if later else 1.0
        results["rows"][name] = {
            "screening_members": screening, "summary": summarize_metrics(row["scores"]), "cases": row["scores"],
            "later_members_ran_share": round(kept, 4), "s_per_case": round(float(np.mean(row["seconds"])), 2),
            "member_slice_runs_share": round((screening + later * kept) / len(members), 4),
            "paper_work_share": round(screened_work(kept), 4),
            "voxels_changed": int(sum(row["changed"])), "cases_changed": int(sum(c > 0 for c in row["changed"]))}
    publish(results, markdown(results), args.out)


def markdown(results: dict) -> str:
    header = ["members", "screening", *(name for name, _ in HELD_OUT_METRICS), "cases / voxels changed",
              "later members ran (share of head slices)", "member-slice runs", "s per case",
              "{}-member work ({} screening)".format(*default_ensemble())]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["rows"].items():
        values = metric_cells(entry["summary"])
        changed = f"{entry['cases_changed']} / {entry['voxels_changed']}"
        cells = [name, str(entry["screening_members"]), *values, changed,
                 f"{entry['later_members_ran_share']:.3f}", f"{entry['member_slice_runs_share']:.3f}",
                 f"{entry['s_per_case']:.2f}", f"{entry['paper_work_share']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
