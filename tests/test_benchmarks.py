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
