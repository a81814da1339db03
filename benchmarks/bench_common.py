"""What every benchmark script shares: the repository on sys.path, the template and its config, and the writer
that saves a result file with its provenance (the command, commit, machine and library versions that made it)."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
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
    from autoseg2d.run.profiles import default_profile_name, driver_defaults, load_profile

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
    """Print a benchmark's JSON and Markdown; with `out`, also write the JSON there (write_result)."""
    from autoseg2d.evaluation.tables import json_safe

    print(json.dumps(json_safe(results), indent=1))
    print(table)
    if out:
        write_result(out, results)


# Environment variables that change what a benchmark measures; the command records those that are set.
MEASURING_ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
# Libraries whose versions a result file records (those installed).
RECORDED_LIBRARIES = ("torch", "monai", "numpy", "openvino")
# /proc/cpuinfo flags of the CPU features the precision choice depends on.
CPUINFO_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")


def command_line(argv: list[str]) -> str:
    """The command that ran, as a user would type it from the repository root: paths inside the repository made
    relative to it, and the measuring environment variables that were set in front."""
    def relative(arg: str) -> str:
        path = Path(arg)
        if path.is_absolute() and path.resolve().is_relative_to(REPO):
            return str(path.resolve().relative_to(REPO))
        return arg

    env = [f"{name}={shlex.quote(os.environ[name])}" for name in MEASURING_ENVIRONMENT if name in os.environ]
    return " ".join([*env, "python", *(shlex.quote(relative(arg)) for arg in argv)])


def git_commit() -> str:
    """HEAD of the repository, with "-dirty" where tracked files other than results differ from it; "unknown"
    outside a checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    # result files and plots do not change what is measured
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results",
                ":(exclude)benchmarks/plots").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cpuinfo_flags() -> list[str]:
    """Which of CPUINFO_FLAGS the CPU reports (what the hardware has, whatever oneDNN is capped at)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [flag for flag in CPUINFO_FLAGS if flag in flags]


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine_info() -> dict:
    """CPU model, cores, the features the template's precision choice detects (predictor.cpu_bf16_units: AMX and
    AVX-512 bf16 as oneDNN may use them) and AVX2, the oneDNN cap, the load average when the result is written (a
    busy machine's timings are slower and noisier), and the GPU where CUDA has one."""
    import torch
    from predictor import cpu_bf16_units, onednn_cap

    flags = cpuinfo_flags()
    capability = torch.backends.cpu.get_cpu_capability()  # what ATen's kernels use: DEFAULT, AVX2, AVX512
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_features": {**cpu_bf16_units(), "avx2": "avx2" in flags or capability in ("AVX2", "AVX512")},
            "cpuinfo_flags": flags, "onednn_max_cpu_isa": onednn_cap() or "none",
            "load_average_1_5_15_min": [round(load, 2) for load in os.getloadavg()]}  # other work on the machine
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(argv: list[str] | None = None) -> dict:
    """Where a result came from: the command, the commit, the date, the machine and the library versions."""
    return {"command": command_line(sys.argv if argv is None else argv), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "versions": library_versions()}


def print_machine() -> None:
    """One line at a benchmark's start: what it detected, so a log says where its figures come from."""
    machine = machine_info()
    features = ", ".join(f"{name} {found}" for name, found in machine["cpu_features"].items())
    gpu = f"; GPU {machine['gpu']}" if "gpu" in machine else ""
    load = machine["load_average_1_5_15_min"][0]
    print(f"detected: {machine['cpu']}, {machine['cpu_cores']} cores; {features}; oneDNN cap "
          f"{machine['onednn_max_cpu_isa']}{gpu}; load average {load}", flush=True)


def write_result(path: str | Path, figures: dict, argv: list[str] | None = None) -> Path:
    """A benchmark's result file: its figures with a `provenance` block (provenance(argv)), written under a
    temporary name and renamed into place. inf / NaN become strings (strict JSON)."""
    from autoseg2d.atomic_files import write_text_atomic
    from autoseg2d.evaluation.tables import json_safe

    record = {"provenance": provenance(argv), **{k: v for k, v in figures.items() if k != "provenance"}}
    text = json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


def add_held_out_arguments(parser) -> None:
    """--work_dir, --datalist, --dataroot and --out: the benchmarks that score a finished ensemble's held-out cases."""
    parser.add_argument("--work_dir", required=True, help="a pipeline work dir whose ensemble stage ran")
    parser.add_argument("--datalist", required=True, help="datalist with labelled testing cases")
    parser.add_argument("--dataroot", help="folder the datalist's paths are relative to (default: its folder)")
    parser.add_argument("--out", help="also write the JSON here")


def held_out_inputs(args) -> tuple:
    """(work dir, dataroot, testing entries, ensemble.json) named by add_held_out_arguments' options."""
    print_machine()  # these benchmarks start here
    import json

    from autoseg2d.datalist import read_datalist
    from autoseg2d.run.workdir import WorkDir

    work = WorkDir.create(Path(args.work_dir))
    dataroot = Path(args.dataroot or Path(args.datalist).parent)
    return work, dataroot, read_datalist(Path(args.datalist))["testing"], json.loads(work.ensemble_file.read_text())
