"""The benchmarks' own arithmetic, where a slip would misstate a figure they print."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
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
    """gpu_run.sh runs once, on a lent machine, with no second try: a flag benchmark.py no longer takes would lose
    that run (its loader step asked for a removed --loader-samples for months)."""
    import shlex

    from benchmark import argument_parser
    from ensemble_speed import ENSEMBLE_PATHS

    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh").read_text().replace("\\\n", " ")
    commands = [line.split("benchmarks/benchmark.py", 1)[1].split(">")[0] for line in script.splitlines()
                if "benchmarks/benchmark.py" in line and not line.lstrip().startswith("#")]
    assert len(commands) == 3  # the GPU sections, the GPU ensemble, the 2-CPU ensemble
    for command in commands:
        args = argument_parser().parse_args(shlex.split(command.replace("$RES", "/tmp")))
        assert set(args.ensemble_paths) <= set(ENSEMBLE_PATHS), command
