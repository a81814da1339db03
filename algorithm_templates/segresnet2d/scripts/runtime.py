"""Which engine runs the network at inference: PyTorch, or OpenVINO on CPUs where it is installed.

OpenVINO ran the paper network faster than PyTorch on the CPUs measured, at the same accuracy
(benchmarks/RESULTS.md); ONNX Runtime and torch.compile did not beat PyTorch there. OpenVINO is
optional (``pip install openvino``): without it, or on a GPU, PyTorch runs. Converting a network
takes a minute or more, so the converted model is kept next to its checkpoint, marked with the
checkpoint's sha256, and converted again when the checkpoint's content differs (not its file time,
which a copy, an unzip or a restore from backup resets).

OpenVINO runs each batch in parts of a few slices over the parallel "streams" its THROUGHPUT hint
picks for the CPU (no setting: that was the fastest choice measured). Small parts bound the memory
each member keeps, with the same outputs (each slice is computed alone).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from bundle_contract import BundleFiles, checkpoint_sha256, save_openvino_model

INFER_RUNTIMES = ("auto", "torch", "openvino")
# OpenVINO picks the number of streams (parallel infer requests) for this CPU.
COMPILE_PROPERTIES = {"PERFORMANCE_HINT": "THROUGHPUT"}
# Each infer request keeps the memory of the largest part it has run, for the process's life: whole batches
# made an 18-member ensemble run out of memory where parts of 2 slices fit, as fast (benchmarks/RESULTS.md).
# A member holds about streams x 2 slices: on many cores, where OpenVINO picks many streams, more.
SLICES_PER_REQUEST = 2
# Where a kept conversion records the checkpoint it was made from (the model's rt_info).
CHECKPOINT_KEY = ["segresnet2d", "checkpoint_sha256"]
EXAMPLE_INPUT_PX = 64  # the size of the example slice that conversion traces; any multiple of the divisor works


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_runtime(name: str, device: torch.device) -> str:
    """auto: OpenVINO on a CPU where it is installed, PyTorch everywhere else."""
    if name not in INFER_RUNTIMES:
        raise ValueError(f"infer_cpu_runtime '{name}' is unknown; choose one of {', '.join(INFER_RUNTIMES)}")
    if name == "auto":
        return "openvino" if device.type == "cpu" and openvino_installed() else "torch"
    if name == "openvino" and device.type != "cpu":
        raise ValueError(f"infer_cpu_runtime is openvino but inference runs on {device}; OpenVINO is used on CPUs "
                         "only here: set infer_cpu_runtime to auto or torch")
    if name == "openvino" and not openvino_installed():
        raise ValueError("infer_cpu_runtime is openvino but the openvino package is not installed: "
                         "pip install openvino, or set infer_cpu_runtime to auto or torch")
    return name


class StreamedModel:
    """A compiled OpenVINO model called on a batch (N, C, H, W) -> [logits]: the batch runs in parts of at most
    `slices_per_request` slices (None: the whole batch), one per stream at a time, each request taking the
    next part once its previous one is copied out."""

    def __init__(self, compiled, slices_per_request: int | None = SLICES_PER_REQUEST):
        self.compiled, self.slices_per_request = compiled, slices_per_request
        count = max(int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")), 1)
        self.requests = [compiled.create_infer_request() for _ in range(count)]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        if len(x) == 0:
            raise ValueError("an empty batch has no slices to run")
        part = self.slices_per_request or len(x)
        starts = range(0, len(x), part)
        outputs: list = [None] * len(starts)
        running: list[int] = []  # parts started, oldest first; part i runs on request i % len(requests)
        try:
            for index, start in enumerate(starts):
                if len(running) == len(self.requests):
                    self._collect(running.pop(0), outputs)
                self.requests[index % len(self.requests)].start_async({0: x[start:start + part]})
                running.append(index)
            while running:
                self._collect(running.pop(0), outputs)
        except BaseException:
            for index in running:  # leave no request busy, so the next call can start them
                try:
                    self.requests[index % len(self.requests)].wait()
                except Exception:  # the first error is the one raised
                    pass
            raise
        return [np.concatenate(outputs) if len(outputs) > 1 else outputs[0]]

    def _collect(self, index: int, outputs: list) -> None:
        request = self.requests[index % len(self.requests)]
        request.wait()
        outputs[index] = request.get_output_tensor(0).data.copy()  # the request reuses this buffer next part

    @property
    def streams(self) -> int:
        return len(self.requests)


class OpenVINONetwork:
    """The network compiled by OpenVINO for this CPU, called like the torch model: (N, C, H, W) -> logits.

    Height and width stay dynamic, so slices of any size run on one compiled model.
    """

    def __init__(self, model: torch.nn.Module, in_channels: int, cache: Path | None, bf16: bool):
        import openvino as ov

        precision = "bf16" if bf16 else "f32"
        properties = {**COMPILE_PROPERTIES, "INFERENCE_PRECISION_HINT": precision}
        converted = load_or_convert(model, in_channels, cache)
        self.compiled = StreamedModel(ov.Core().compile_model(converted, "CPU", properties))
        self.precision = "openvino-" + precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.float().contiguous().numpy())[0])


def load_or_convert(model: torch.nn.Module, in_channels: int, cache: Path | None):
    """The OpenVINO model kept at cache (model_openvino.xml/.bin) when it was converted from the checkpoint beside
    it (the same sha256); else converted from the torch model and written there (under temporary names, then
    renamed), marked with that checkpoint's sha256."""
    import openvino as ov

    digest = checkpoint_sha256(BundleFiles(cache.parent).model) if cache is not None else None
    kept = read_kept(cache, digest)
    if kept is not None:
        return kept
    example = torch.zeros(1, in_channels, EXAMPLE_INPUT_PX, EXAMPLE_INPUT_PX)
    with torch.no_grad():
        converted = ov.convert_model(model.eval(), example_input=example,
                                     input=[ov.PartialShape([-1, in_channels, -1, -1])])
    if digest is not None:
        converted.set_rt_info(digest, CHECKPOINT_KEY)
    if cache is not None:
        try:
            save_openvino_model(converted, cache)
        except OSError as err:  # a read-only model folder (an exported bundle): convert again next time
            warnings.warn(f"could not keep the OpenVINO model at {cache} ({err}); it is converted on every start")
    return converted


def read_kept(cache: Path | None, digest: str | None):
    """The kept conversion at cache if it records the checkpoint sha256 `digest`, else None (none kept, one from
    another checkpoint or from before conversions were marked, or no checkpoint to check it against)."""
    import openvino as ov

    if cache is None or digest is None or not (cache.is_file() and cache.with_suffix(".bin").is_file()):
        return None
    kept = ov.Core().read_model(str(cache))
    made_from = kept.get_rt_info(CHECKPOINT_KEY).astype(str) if kept.has_rt_info(CHECKPOINT_KEY) else None
    return kept if made_from == digest else None
