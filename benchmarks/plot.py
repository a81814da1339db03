"""The curves of benchmarks/README.md, drawn from the result files into benchmarks/plots/*.png.

    python benchmarks/plot.py                  # every plot, into benchmarks/plots/

Each plot reads only result files (benchmarks/results/*.json) and names them in its caption, so a rerun
of a benchmark followed by this script redraws its curve.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
PLOTS = BENCHMARKS / "plots"
GOAL_S = 180  # the CPU goal the README measures against: an 18-member scan within 3 minutes on 2 cores


def read(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def machine(name: str) -> str:
    """A result file's CPU as its provenance names it, with its bf16 units."""
    recorded = read(name)["provenance"]["machine"]
    units = [unit for unit, found in recorded.get("cpu_features", {}).items() if found and unit != "avx2"]
    return f"{recorded.get('cpu', recorded.get('as_stated'))} ({', '.join(units) or 'no bf16 units'})"


def caption(fig, *names: str) -> None:
    text = "from " + ", ".join(f"results/{n}" for n in names)
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(text, 150)), fontsize=7, color="0.4")


def ensemble_dice_vs_members(out: Path) -> Path:
    """Out-of-fold Dice of greedy's members-per-fold curve, and the held-out Dice of each selection, per data set."""
    sets = {"hard synthetic CT": ("member_selection_hard_size5.json", "member_selection_hard_size10.json"),
            "easy synthetic CT": ("member_selection_cpu_size6.json", "member_selection_cpu_size9.json")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (title, names) in zip(axes, sets.items()):
        runs = [read(name) for name in names]
        curve = runs[0]["greedy_curve"]
        members = [point["members"] for point in curve]
        ax.plot(members, [point["dice"] for point in curve], "o-", label="out of fold, greedy order (before "
                "post-processing)")
        ax.plot(members, [point["dice_by_score"] for point in curve], "s--", mfc="none",
                label="out of fold, best validation score first")
        held = {}
        for run in runs:
            for selection, entry in run["results"].items():
                held[selection] = (len(entry["members"]), entry["summary"]["dice_mean"])
        for marker, kind in (("^", "fold_balanced"), ("v", "greedy")):
            points = [value for selection, value in held.items() if selection.startswith(kind)]
            ax.plot(*zip(*points), marker, ms=9, ls="none", label=f"held out, {kind}")
        title += f"\n{runs[0]['candidates']} candidate bundles, {runs[0]['held_out']} held-out cases"
        ax.set(title=title, xlabel="ensemble members", ylabel="mean Dice", xticks=members)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    caption(fig, *(name for names in sets.values() for name in names))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, out / "ensemble_dice_vs_members.png")


def seconds_vs_kept_share(out: Path) -> Path:
    """Seconds per 18-member 512 x 512 x 32 scan against the share of head slices the later members run on
    (screening): OpenVINO and the every-FLOP-at-the-best-convolution reference from one run, PyTorch from another."""
    floor_run, torch_run = "cpu_2core_epyc_floor.json", "cpu_2core_epyc_ensemble.json"
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for precision, color in (("bf16", "tab:blue"), ("fp32", "tab:red")):
        for run_name, path, style, label in ((floor_run, "new_openvino", "o-", "OpenVINO"),
                                             (torch_run, "new_torch", "s:", "PyTorch (other run)")):
            rows = [r for r in read(run_name)["ensemble"]
                    if r["path"] == f"{path}_later_members_on_kept_slices" and r["precision"] == precision]
            if not rows:
                continue
            points = sorted([(r["kept_slices"] / r["head_slices"], r["s_per_512x512x32_scan_18_members_screened"])
                             for r in rows] + [(1.0, rows[0]["s_per_512x512x32_scan_18_members_unscreened"])])
            ax.plot(*zip(*points), style, color=color, label=f"{label}, {precision}")
        summary = next(r for r in read(floor_run)["floor"] if r["precision"] == precision and "best_layer" in r)
        shares = sorted(float(k.split("_")[-2]) for k in summary if k.startswith("at_best_convolution_screened_"))
        ax.plot(shares + [1.0], [summary[f"at_best_convolution_screened_{s}_s"] for s in shares]
                + [summary["at_best_convolution_s_per_scan_18_members"]], "--", color=color, alpha=0.5,
                label=f"every FLOP at the best convolution's speed, {precision}")
    ax.axhline(GOAL_S, color="0.5", lw=0.8)
    ax.text(0.02, GOAL_S + 5, "3 minutes", fontsize=8, color="0.4")
    ax.set(xlabel="share of head slices the 13 later members run on (1 = unscreened)",
           ylabel="s per 18-member 512 x 512 x 32 scan", xlim=(0, 1.05), ylim=(0, None),
           title=f"{machine(floor_run)}, random-weight paper members")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    caption(fig, floor_run, torch_run)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, out / "seconds_vs_kept_share.png")


def screening_share_vs_threshold(out: Path) -> Path:
    """The share of head slices the later members still ran, against ensemble_screen_below, for trained members
    of two strengths; the held-out masks changed by no voxel at any point."""
    sets = {"hard synthetic members": "screening_hard_below{}.json", "demo members": "screening_demo_below{}.json"}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = []
    for label, pattern in sets.items():
        points, changed = [(0.0, 1.0)], 0
        for path in sorted(RESULTS.glob(pattern.format("*"))):
            run = read(path.name)
            names.append(path.name)
            row = next(v for k, v in run["rows"].items() if k.startswith("screen: each fold"))
            points.append((run["below"], row["later_members_ran_share"]))
            changed += row["voxels_changed"]
            dice = run["rows"]["every member"]["summary"]["dice_mean"]
        ax.plot(*zip(*sorted(points)), "o-", label=f"{label} (held-out Dice {dice:.2f}); voxels changed: {changed}")
    ax.set(xlabel="ensemble_screen_below (0 = no screening)", ylabel="share of head slices the later members ran",
           ylim=(0, 1.05), title="Screening: each fold's first member screens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    caption(fig, *names)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save(fig, out / "screening_share_vs_threshold.png")


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.tmp.png")  # renamed into place: a reader never sees half a PNG
    fig.savefig(staging, dpi=110)
    plt.close(fig)
    staging.replace(path)
    return path


PLOTTERS = (ensemble_dice_vs_members, seconds_vs_kept_share, screening_share_vs_threshold)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PLOTS, help="folder for the PNGs")
    args = parser.parse_args(argv)
    written = [plot(args.out) for plot in PLOTTERS]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
