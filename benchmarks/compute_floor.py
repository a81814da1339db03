"""The floor section of benchmark.py: how fast any runtime could run the default ensemble on this machine.

The paper network (variant both) is run once at 512 x 512 with a hook on every convolution, which is where
its FLOPs are (torch's FlopCounterMode counts them). Each distinct convolution (kind, channels, kernel,
stride, input size) is then timed alone in PyTorch (oneDNN, channels_last) on batches of 2 slices, the
parts OpenVINO runs, in bf16 where the CPU has native bf16 units and in fp32. Two floors per 18-member
512 x 512 x 32 scan follow:
- layer by layer: every convolution at the throughput it reached alone (batch norm, ReLU and the data
  movement between layers counted as free);
- at the best: every FLOP at the fastest throughput any of them reached.
A runtime near the first has little left to gain; only less work (fewer pixels, slices or members) goes
below the second. Both are also given for the screened scan (5 members on every slice, 13 on a share).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_common import SLICE_PX, template_config
from ensemble_speed import DEFAULT_ENSEMBLE_MEMBERS, SCREENING_MEMBERS
from inputs import channel_plan, windows_for  # noqa: E402  (after bench_common's sys.path)
from network import NetworkSettings, build_network  # noqa: E402
from predictor import cpu_has_native_bf16  # noqa: E402
from runtime import SLICES_PER_REQUEST  # noqa: E402

SCAN_SLICES = 32
CONVOLUTIONS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)


def paper_network() -> tuple[torch.nn.Module, int]:
    """The default config's network with random weights, and its input channels (variant both)."""
    config = template_config(input_variant="both")
    windows = windows_for(config["modality"], config["ct_windows_hu"])
    channels = len(channel_plan(config["input_variant"], len(windows), config["num_adjacent_slices"]))
    return build_network(NetworkSettings.from_config(config), channels).eval(), channels


def distinct_convolutions(model: torch.nn.Module, channels: int, size: int = SLICE_PX) -> list[dict]:
    """Each distinct convolution of one size x size pass: the module, its input shape, how often it runs."""
    calls: dict[tuple, dict] = {}

    def record(module, inputs, _output):
        height, width = inputs[0].shape[-2:]
        key = (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
               height, width)
        calls.setdefault(key, {"module": module, "key": key, "count": 0})["count"] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, CONVOLUTIONS)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, channels, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return list(calls.values())


def time_convolution(layer: dict, precision: str, repeats: int) -> dict:
    """FLOPs per slice and the throughput of one convolution alone, on a batch of SLICES_PER_REQUEST slices."""
    kind, c_in, c_out, kernel, stride, height, width = layer["key"]
    module = copy.deepcopy(layer["module"]).to(memory_format=torch.channels_last)
    x = torch.randn(SLICES_PER_REQUEST, c_in, height, width).to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with FlopCounterMode(display=False) as counter:
            module(x)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            module(x)
            seconds.append(time.perf_counter() - started)
    flops = counter.get_total_flops() / SLICES_PER_REQUEST
    per_slice_s = statistics.median(seconds) / SLICES_PER_REQUEST
    return {"precision": precision, "layer": f"{kind} {c_in}->{c_out} k{kernel[0]} s{stride[0]} at {height}x{width}",
            "per_pass": layer["count"], "gflop_per_slice": round(flops * layer["count"] / 1e9, 2),
            "gflop_per_s": round(flops / per_slice_s / 1e9, 1), "flops": flops * layer["count"],
            "seconds": per_slice_s * layer["count"]}


def bench_floor(args, device: torch.device) -> list[dict]:
    """Per precision: the convolutions' rows (where the time goes) and a summary row with both floors."""
    if device.type != "cpu":
        raise SystemExit("the floor section measures CPU kernels; run it with --device cpu")
    model, channels = paper_network()
    layers = distinct_convolutions(model, channels)
    precisions = (["bf16"] if cpu_has_native_bf16() else []) + ["fp32"]
    slices = DEFAULT_ENSEMBLE_MEMBERS * SCAN_SLICES
    rows = []
    for precision in precisions:
        for layer in layers:  # one call each first: oneDNN picks its kernels
            time_convolution(layer, precision, repeats=1)
        timed = [time_convolution(layer, precision, repeats=args.floor_repeats) for layer in layers]
        flops, seconds = sum(t["flops"] for t in timed), sum(t["seconds"] for t in timed)
        best = max(timed, key=lambda t: t["gflop_per_s"])
        summary = {"precision": precision, "layer": "whole network (convolutions)",
                   "gflop_per_slice": round(flops / 1e9, 1), "gflop_per_s": round(flops / seconds / 1e9, 1),
                   "best_gflop_per_s": best["gflop_per_s"], "best_layer": best["layer"],
                   "tflop_per_scan_18_members": round(flops * slices / 1e12, 1),
                   "floor_layer_by_layer_s_per_scan_18_members": round(seconds * slices, 1),
                   "floor_at_best_s_per_scan_18_members": round(flops * slices / (best["gflop_per_s"] * 1e9), 1)}
        later = DEFAULT_ENSEMBLE_MEMBERS - SCREENING_MEMBERS
        for share in args.ensemble_screen_share:  # 5 screening members on every slice, 13 on the share
            work = (SCREENING_MEMBERS + later * share) / DEFAULT_ENSEMBLE_MEMBERS
            summary[f"floor_at_best_screened_{share:g}_s"] = round(summary["floor_at_best_s_per_scan_18_members"]
                                                                   * work, 1)
        rows += [{k: v for k, v in t.items() if k not in ("flops", "seconds")} for t in timed] + [summary]
        for row in rows[-len(timed) - 1:]:
            print("floor", row, flush=True)
    return rows
