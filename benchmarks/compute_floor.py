"""The floor section of benchmark.py: what the default ensemble's convolutions cost on this CPU, layer by layer.

The paper network (variant both) is run once at 512 x 512 with a hook on every convolution; torch's
FlopCounterMode counts their FLOPs (it counts no elementwise operations: batch norm and ReLU are left
out, as OpenVINO folds them into the convolutions). Each distinct convolution is then timed alone in
PyTorch (oneDNN, channels_last, a bf16 copy on bf16 input where the CPU has native bf16 units, and
fp32) on batches of 2 slices, the parts OpenVINO runs. Per 18-member 512 x 512 x 32 scan this gives
- at the best convolution: every FLOP at the fastest throughput any of them reached here, an empirical
  reference for what these cores do on this network's layers (not a hardware limit), unscreened and
  screened at each --ensemble-screen-share;
- PyTorch's convolutions: each at its own measured throughput, an estimate of what the PyTorch path's
  convolutions take (OpenVINO's kernels beat it on the 32-channel layers).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_common import SCAN_SLICES, SLICE_PX, default_ensemble, kept_slices, paper_inputs, screened_work
from network import NetworkSettings, build_network  # noqa: E402  (after bench_common's sys.path)
from predictor import cpu_has_native_bf16  # noqa: E402
from runtime import SLICES_PER_REQUEST  # noqa: E402

CONVOLUTIONS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def paper_network() -> tuple[torch.nn.Module, int]:
    """The default config's network with random weights, and its input channels (variant both)."""
    config, _, plan = paper_inputs()
    return build_network(NetworkSettings.from_config(config), len(plan)).eval(), len(plan)


def convolution_key(module: torch.nn.Module, height: int, width: int) -> tuple:
    """Everything that sets a convolution's cost: two calls with the same key are timed once."""
    return (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, getattr(module, "output_padding", None),
            module.bias is not None, height, width)


def distinct_convolutions(model: torch.nn.Module, channels: int, size: int = SLICE_PX) -> list[dict]:
    """Each distinct convolution of one size x size pass: the module, its input size, how often it runs."""
    calls: dict[tuple, dict] = {}

    def record(module, inputs, _output):
        height, width = inputs[0].shape[-2:]
        key = convolution_key(module, height, width)
        calls.setdefault(key, {"module": module, "size": (height, width), "count": 0})["count"] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, CONVOLUTIONS)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, channels, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return list(calls.values())


def time_convolution(layer: dict, precision: str, repeats: int) -> dict:
    """FLOPs per slice and the throughput of one convolution alone, on a batch of SLICES_PER_REQUEST slices,
    its weights and input already in the precision (as in a network run in it)."""
    dtype = PRECISIONS[precision]
    module = copy.deepcopy(layer["module"]).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(SLICES_PER_REQUEST, module.in_channels, *layer["size"], dtype=dtype)
    x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            module(x)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            module(x)
            seconds.append(time.perf_counter() - started)
    flops = counter.get_total_flops() / SLICES_PER_REQUEST
    per_slice_s = statistics.median(seconds) / SLICES_PER_REQUEST
    name = (f"{type(module).__name__} {module.in_channels}->{module.out_channels} k{module.kernel_size[0]} "
            f"s{module.stride[0]}")
    return {"precision": precision, "layer": f"{name} at {layer['size'][0]}x{layer['size'][1]}",
            "per_pass": layer["count"], "gflop_per_slice": round(flops * layer["count"] / 1e9, 2),
            "gflop_per_s": round(flops / per_slice_s / 1e9, 1), "flops": flops * layer["count"],
            "seconds": per_slice_s * layer["count"]}


def bench_floor(args, device: torch.device) -> list[dict]:
    """Per precision: the convolutions' rows (where the time goes) and a summary row for the 18-member scan."""
    if device.type != "cpu":
        raise SystemExit("the floor section measures CPU kernels; run it with --device cpu")
    model, channels = paper_network()
    layers = distinct_convolutions(model, channels)
    members, _ = default_ensemble()
    slices = members * SCAN_SLICES
    rows = []
    for precision in (["bf16"] if cpu_has_native_bf16() else []) + ["fp32"]:
        for layer in layers:  # a whole untimed round first: 4-5 % faster after it than after the counted call alone
            time_convolution(layer, precision, repeats=1)
        timed = [time_convolution(layer, precision, repeats=args.floor_repeats) for layer in layers]
        flops, seconds = sum(t["flops"] for t in timed), sum(t["seconds"] for t in timed)
        best = max(timed, key=lambda t: t["gflop_per_s"])
        at_best = flops * slices / (best["gflop_per_s"] * 1e9)
        summary = {"precision": precision, "layer": "whole network (its convolutions)",
                   "gflop_per_slice": round(flops / 1e9, 1), "gflop_per_s": round(flops / seconds / 1e9, 1),
                   "best_gflop_per_s": best["gflop_per_s"], "best_layer": best["layer"],
                   "tflop_per_scan_18_members": round(flops * slices / 1e12, 1),
                   "at_best_convolution_s_per_scan_18_members": round(at_best, 1),
                   "pytorch_convolutions_s_per_scan_18_members": round(seconds * slices, 1)}
        for share in args.ensemble_screen_share:  # kept as the ensemble section's screened rows keep them
            kept = kept_slices(share, SCAN_SLICES) / SCAN_SLICES
            summary[f"at_best_convolution_screened_{share:g}_s"] = round(at_best * screened_work(kept), 1)
        rows += [{k: v for k, v in t.items() if k not in ("flops", "seconds")} for t in timed] + [summary]
        for row in rows[-len(timed) - 1:]:
            print("floor", row, flush=True)
    return rows
