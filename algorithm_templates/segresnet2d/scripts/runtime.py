"""Which engine runs the network at inference: PyTorch, or OpenVINO on CPUs where it is installed.

On a 2-core Xeon with AMX, OpenVINO's bf16 ran the paper network 3.2x faster than PyTorch's
bf16 autocast with channels_last on whole 16-slice batches, at the same accuracy; since PyTorch
gets a CPU batch in calls of one 512 x 512 slice, the gap on 2 EPYC cores is 1.1-1.5x
(benchmarks/RESULTS.md). ONNX Runtime
and torch.compile did not beat PyTorch there. OpenVINO is optional (``pip install openvino``):
without it, or on a GPU, PyTorch runs. Converting a network takes a minute or more, so the
converted model is kept next to its checkpoint and converted again only when the checkpoint
is newer. With infer_cpu_int8, an INT8 copy quantized on the bundle's training slices replaces it
where it agrees with the float model (quantize.py).

OpenVINO runs each batch in parts of a few slices over its parallel "streams" (infer_cpu_streams: 0 lets
it pick, as its THROUGHPUT hint does). Small parts bound the memory each member keeps; on the 2-core Xeon,
2 streams of one core each ran the paper network 0.9-1.6x as fast as whole batches on one stream on both
cores, faster in most runs (benchmarks/RESULTS.md), with the same outputs (each slice is computed alone).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from bundle_contract import BundleFiles, save_openvino_model
from quantize import Int8Request, int8_or_float

INFER_RUNTIMES = ("auto", "torch", "openvino")
STREAMS_AUTO = 0  # infer_cpu_streams: OpenVINO picks the streams for the CPU
# Each infer request keeps the memory of the largest part it has run, for the process's life: ~0.08 GiB a
# slice of a 416 x 480 box for the paper network. Whole 16-slice batches kept 1.3 GiB a member, and 18
# members were killed for memory on a 24 GiB machine; parts of 2 slices on 2 streams keep ~0.35 GiB, as fast.
# (A member holds about streams x 2 slices: on many cores, where OpenVINO picks many streams, more.)
SLICES_PER_REQUEST = 2
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


def stream_properties(streams: int, where: str = "the bundle's configs/hyper_parameters.yaml") -> dict[str, str]:
    """OpenVINO compile properties for infer_cpu_streams: 0 (its THROUGHPUT hint picks the streams for this CPU)
    or a number of streams (1: every part on all cores at once, the LATENCY behaviour). `where` names its file."""
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 0:
        raise ValueError(f"infer_cpu_streams {streams!r} in {where} is not a number of streams; set it to 0 "
                         "(OpenVINO picks for this CPU) or e.g. 1 (one stream on all cores)")
    return {"PERFORMANCE_HINT": "THROUGHPUT"} if streams == STREAMS_AUTO else {"NUM_STREAMS": str(streams)}


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

    Height and width stay dynamic, so every head box is one compiled model.
    """

    def __init__(self, model: torch.nn.Module, in_channels: int, cache: Path | None, bf16: bool,
                 int8: Int8Request | None = None, streams=STREAMS_AUTO,
                 slices_per_request: int | None = SLICES_PER_REQUEST):
        import openvino as ov

        properties = stream_properties(streams)  # checked before a conversion that can take a minute
        converted = load_or_convert(model, in_channels, cache)
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}  # INT8 keeps it for its float layers
        properties.update(hint)

        def compile_model(ov_model):
            return StreamedModel(ov.Core().compile_model(ov_model, "CPU", properties), slices_per_request)

        # local, so a float model compiled only to check INT8 (and the memory its check ran in) goes with __init__
        float_model = functools.cache(lambda: compile_model(converted))

        self.precision = "openvino-" + hint["INFERENCE_PRECISION_HINT"]
        self.int8_report, self.compiled = None, None
        if int8 is not None:  # the float model is compiled only where INT8 needs it (its check) or is refused
            self.compiled, self.int8_report = int8_or_float(converted, float_model, compile_model, int8)
            if self.compiled is not None:
                self.precision = "openvino-int8"
        if self.compiled is None:
            self.compiled = float_model()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.float().contiguous().numpy())[0])


def load_or_convert(model: torch.nn.Module, in_channels: int, cache: Path | None):
    """The OpenVINO model from cache (model_openvino.xml/.bin) when it is newer than the checkpoint beside it;
    else converted from the torch model and written there (under temporary names, then renamed)."""
    import openvino as ov

    checkpoint = BundleFiles(cache.parent).model if cache is not None else None
    if cache is not None and cache.is_file() and cache.with_suffix(".bin").is_file() and \
            (checkpoint is None or not checkpoint.exists() or cache.stat().st_mtime >= checkpoint.stat().st_mtime):
        return ov.Core().read_model(str(cache))
    example = torch.zeros(1, in_channels, EXAMPLE_INPUT_PX, EXAMPLE_INPUT_PX)
    with torch.no_grad():
        converted = ov.convert_model(model.eval(), example_input=example,
                                     input=[ov.PartialShape([-1, in_channels, -1, -1])])
    if cache is not None:
        try:
            save_openvino_model(converted, cache)
        except OSError as err:  # a read-only model folder (an exported bundle): convert again next time
            warnings.warn(f"could not keep the OpenVINO model at {cache} ({err}); it is converted on every start")
    return converted
