"""The benchmarks' own arithmetic, where a slip would misstate a figure they print, and their records: every result
file says what made it, and benchmarks/README.md names each one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from compute_floor import distinct_convolutions, paper_network, time_convolution  # noqa: E402


def test_the_floor_counts_each_convolution_of_the_paper_network_once():
    """The floor section times each distinct convolution once and multiplies by how often a pass runs it: its
    FLOPs must add up to the whole network's, with every convolution module counted."""
    model, channels = paper_network()
    layers = distinct_convolutions(model, channels, size=64)
    counted = sum(time_convolution(layer, "fp32", repeats=1)["flops"] for layer in layers)
    with torch.inference_mode(), FlopCounterMode(display=False) as whole:
        model(torch.zeros(1, channels, 64, 64))
    assert counted == pytest.approx(whole.get_total_flops())
    convolutions = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert sum(layer["count"] for layer in layers) == len(convolutions)
    assert len(layers) < len(convolutions)  # the repeated blocks of a level share one timing


def test_the_ensemble_rows_run_in_the_precision_the_template_picks_on_each_device(monkeypatch):
    """A GPU runs the template's amp (fp16), not fp32; a CPU bf16 only where it is native."""
    import predictor
    from ensemble_speed import ensemble_precisions

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ensemble_precisions(cuda, also_fp32=False) == ["fp16"]
    assert ensemble_precisions(cuda, also_fp32=True) == ["fp16", "fp32"]
    monkeypatch.setattr(predictor, "cpu_has_native_bf16", lambda: True)
    assert ensemble_precisions(cpu, also_fp32=True) == ["bf16", "fp32"]
    monkeypatch.setattr(predictor, "cpu_has_native_bf16", lambda: False)
    assert ensemble_precisions(cpu, also_fp32=True) == ["fp32"]
    import ensemble_speed  # the template's config decides: amp off runs fp32 on a GPU

    config = ensemble_speed.template_config()
    monkeypatch.setattr(ensemble_speed, "template_config", lambda: {**config, "amp": False})
    assert ensemble_precisions(cuda, also_fp32=True) == ["fp32"]


def test_the_ensemble_section_refuses_a_device_its_members_would_not_run_on(monkeypatch, tmp_path):
    """InferClass takes the GPU where there is one, so --device cpu there would time the GPU as the CPU."""
    from types import SimpleNamespace

    from ensemble_speed import bench_ensemble

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES"):
        bench_ensemble(SimpleNamespace(), torch.device("cpu"), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before writing a case or a bundle


def test_every_benchmark_command_of_the_gpu_script_parses():
    """gpu_run.sh runs where a user has a GPU, often once: a flag benchmark.py no longer takes would lose that run
    (its loader step once asked for a removed --loader-samples)."""
    import shlex

    from benchmark import argument_parser
    from ensemble_speed import ENSEMBLE_PATHS

    script = (BENCHMARKS / "gpu_run.sh").read_text().replace("\\\n", " ")
    commands = [line.split("benchmarks/benchmark.py", 1)[1] for line in script.splitlines()
                if "benchmarks/benchmark.py" in line and not line.lstrip().startswith("#")]
    assert len(commands) == 4  # the GPU sections, the GPU ensemble, host inference, the 2-CPU ensemble
    for command in commands:
        args = argument_parser().parse_args(shlex.split(command))
        assert set(args.ensemble_paths) <= set(ENSEMBLE_PATHS), command
        assert args.out.startswith("$results/"), command  # every run leaves its result file


def test_a_result_file_records_the_command_commit_machine_and_versions(tmp_path, monkeypatch):
    """write_result's provenance block: the command as typed from the repository root (with the oneDNN cap that
    changes what is measured), the checkout's commit, the CPU features the template detects under that cap, and
    the library versions; written by rename, so no temporary file is left."""
    import subprocess

    from bench_common import write_result

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an AVX2-only CPU: no bf16 units whatever this one has
    out = tmp_path / "result.json"
    write_result(out, {"speed": {"s_per_scan": 12.5, "hd_mm": float("inf")}},
                 argv=[str(BENCHMARKS / "benchmark.py"), "--sections", "infer", "--out", str(out)])
    record = json.loads(out.read_text())
    provenance = record["provenance"]
    assert provenance["command"] == ("ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/benchmark.py --sections infer "
                                     f"--out {out}")
    head = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert provenance["commit"] in (head.stdout.strip(), head.stdout.strip() + "-dirty")
    machine = provenance["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1
    assert machine["cpu_features"]["amx"] is False and machine["cpu_features"]["avx512_bf16"] is False
    assert isinstance(machine["cpu_features"]["avx2"], bool) and machine["onednn_max_cpu_isa"] == "AVX2"
    assert ("gpu" in machine) == torch.cuda.is_available()
    assert {"python", "torch", "monai"} <= set(provenance["versions"])
    assert provenance["versions"]["torch"] == torch.__version__
    assert record["speed"] == {"s_per_scan": 12.5, "hd_mm": "inf"}  # strict JSON
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_benchmark_py_writes_its_result_through_the_writer(tmp_path, monkeypatch, capsys):
    """The cheapest run of the benchmark script (no section) still writes a result file with provenance, and says
    at its start what it detected."""
    import benchmark
    from bench_common import MEASURING_ENVIRONMENT

    for name in MEASURING_ENVIRONMENT:  # set ones are recorded in front of the command (the AVX2-capped CI rerun)
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "empty.json"
    monkeypatch.setattr(sys, "argv", ["benchmarks/benchmark.py", "--sections", "", "--device", "cpu", "--out",
                                      str(out)])
    benchmark.main()
    record = json.loads(out.read_text())
    assert record["provenance"]["command"] == f"python benchmarks/benchmark.py --sections '' --device cpu --out {out}"
    assert record["device"] == "cpu" and "peak_memory" in record
    assert capsys.readouterr().out.startswith("detected: ")


RESULT_FILES = sorted((BENCHMARKS / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULT_FILES, ids=[p.name for p in RESULT_FILES])
def test_every_result_file_carries_its_provenance(path):
    """A figure without the command, commit and machine that made it cannot be checked or rerun. Files from before
    the writer are marked retrofitted (their command and machine as the old RESULTS.md stated them)."""
    provenance = json.loads(path.read_text())["provenance"]
    assert {"command", "commit", "date", "machine", "versions"} <= set(provenance)
    assert len(provenance["commit"].removesuffix("-dirty")) == 40
    assert provenance.get("retrofitted", False) or provenance["machine"]["cpu_features"]


def test_the_benchmarks_readme_names_every_result_file_and_plot_and_only_those():
    """Each claim in benchmarks/README.md points at its result file and plot: none missing, none unnamed."""
    import re

    readme = (BENCHMARKS / "README.md").read_text()
    named = set(re.findall(r"results/([\w.-]+\.json)", readme))
    assert named == {p.name for p in RESULT_FILES}
    plots = set(re.findall(r"plots/([\w.-]+\.png)", readme))
    assert plots and plots == {p.name for p in (BENCHMARKS / "plots").glob("*.png")}


def test_the_plots_are_drawn_from_the_result_files(tmp_path):
    import plot

    written = plot.main(["--out", str(tmp_path)])
    assert {p.name for p in written} == {p.name for p in (BENCHMARKS / "plots").glob("*.png")}
    assert all(p.stat().st_size > 10_000 and p.read_bytes().startswith(b"\x89PNG") for p in written)
