"""What every benchmark script shares: the repository on sys.path, the template and its config."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "algorithm_templates" / "segresnet2d"
sys.path[:0] = [str(REPO), str(TEMPLATE / "scripts")]

SLICE_PX = 512
SCAN_SLICES = 32  # the 512 x 512 x 32 scan, to which the speed benchmarks scale their figures


@functools.cache  # profiles.yaml read once, not on every screened row
def default_ensemble() -> tuple[int, int]:
    """(members, screening members) of the default profile's ensemble: its ensemble_size, and one screening
    member per fold (each fold's first) of the default num_folds."""
    from autoseg2d.pipeline.profiles import default_profile_name, driver_defaults, load_profile

    return int(load_profile(default_profile_name())["ensemble_size"]), int(driver_defaults()["num_folds"])


def kept_slices(share: float, head_slices: int) -> int:
    """How many of a scan's head slices a share of them is, as the screened rows keep them (at least one)."""
    return max(1, round(share * head_slices))


def screened_work(kept_share: float) -> float:
    """The share of the default ensemble's member-slice runs a screened scan does: the screening members on every
    head slice, the others on kept_share of them."""
    members, screening = default_ensemble()
    return (screening + (members - screening) * kept_share) / members


def template_config(**changes) -> dict:
    config = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())
    network = {**config["network"], **changes.pop("network", {})}
    config.update(changes, network=network)
    return config


def paper_inputs(**changes) -> tuple[dict, list, list]:
    """The template's config for the benchmarks' paper-network members (input variant both, and `changes`), its CT
    windows and its channel plan (len(plan) input channels)."""
    from inputs import channel_plan, windows_for

    config = template_config(input_variant="both", **changes)
    windows = windows_for(config["modality"], config["ct_windows_hu"])
    return config, windows, channel_plan(config["input_variant"], len(windows), config["num_adjacent_slices"])


# The challenge metrics a held-out table shows: (column, summarize_metrics key).
HELD_OUT_METRICS = (("Dice", "dice_mean"), ("RVD", "rvd_mean"), ("NSD", "nsd_mean"), ("HD mm", "hd_mm_mean"),
                    ("HD inf", "num_hd_inf"))


def metric_cells(summary: dict, metrics=HELD_OUT_METRICS) -> list[str]:
    """A summarize_metrics summary as Markdown cells: floats to 4 decimals, counts as they are."""
    return [f"{summary[key]:.4f}" if isinstance(summary[key], float) else str(summary[key]) for _, key in metrics]


def paired_difference(values: list[float], reference: list[float], resamples: int = 2000) -> dict:
    """Mean per-case difference values - reference, its 95 % bootstrap interval over cases, and how many cases
    moved each way: a held-out change means something only where the interval leaves 0."""
    difference = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    picks = np.random.default_rng(0).integers(0, len(difference), size=(resamples, len(difference)))
    low, high = np.percentile(difference[picks].mean(axis=1), [2.5, 97.5])
    return {"mean": float(difference.mean()), "ci95": [float(low), float(high)],
            "worse": int((difference < 0).sum()), "better": int((difference > 0).sum())}


def difference_cell(change: dict) -> str:
    """A paired_difference as one Markdown cell: mean [95 % interval], cases worse / better."""
    low, high = change["ci95"]
    return f"{change['mean']:+.4f} [{low:+.4f}, {high:+.4f}], {change['worse']} / {change['better']}"


def publish(results: dict, table: str, out: str | None) -> None:
    """Print a benchmark's JSON and Markdown; with `out`, also write the JSON there."""
    import json

    from autoseg2d.evaluation.report import json_safe

    text = json.dumps(json_safe(results), indent=1)
    print(text)
    print(table)
    if out:
        Path(out).write_text(text + "\n")


def add_held_out_arguments(parser) -> None:
    """--work_dir, --datalist, --dataroot and --out: the benchmarks that score a finished ensemble's held-out cases."""
    parser.add_argument("--work_dir", required=True, help="a pipeline work dir whose ensemble stage ran")
    parser.add_argument("--datalist", required=True, help="datalist with labelled testing cases")
    parser.add_argument("--dataroot", help="folder the datalist's paths are relative to (default: its folder)")
    parser.add_argument("--out", help="also write the JSON here")


def held_out_inputs(args) -> tuple:
    """(work dir, dataroot, testing entries, ensemble.json) named by add_held_out_arguments' options."""
    import json

    from autoseg2d.datalist import read_datalist
    from autoseg2d.pipeline.workdir import WorkDir

    work = WorkDir.create(Path(args.work_dir))
    dataroot = Path(args.dataroot or Path(args.datalist).parent)
    return work, dataroot, read_datalist(Path(args.datalist))["testing"], json.loads(work.ensemble_file.read_text())
