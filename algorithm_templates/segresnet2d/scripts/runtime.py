"""Which engine runs the network at inference: PyTorch, or OpenVINO on CPUs where it is installed.

On a 2-core Xeon with AMX, OpenVINO's bf16 ran the paper network 3.2x faster than PyTorch's
bf16 autocast with channels_last, at the same accuracy (benchmarks/RESULTS.md); ONNX Runtime
and torch.compile did not beat PyTorch there. OpenVINO is optional (``pip install openvino``):
without it, or on a GPU, PyTorch runs. Converting a network takes a minute or more, so the
converted model is kept next to its checkpoint and converted again only when the checkpoint
is newer. With infer_cpu_int8, an INT8 copy quantized on the bundle's training slices replaces it
where it agrees with the float model (quantize.py).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import torch

from bundle_contract import BundleFiles, save_openvino_model
from quantize import Int8Request, int8_or_float

INFER_RUNTIMES = ("auto", "torch", "openvino")
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


class OpenVINONetwork:
    """The network compiled by OpenVINO for this CPU, called like the torch model: (N, C, H, W) -> logits.

    Height and width stay dynamic, so every head box is one compiled model.
    """

    def __init__(self, model: torch.nn.Module, in_channels: int, cache: Path | None, bf16: bool,
                 int8: Int8Request | None = None):
        import openvino as ov

        converted = load_or_convert(model, in_channels, cache)
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}  # INT8 keeps it for its float layers

        def compile_model(ov_model):
            return ov.Core().compile_model(ov_model, "CPU", hint)

        self._float = functools.cache(lambda: compile_model(converted))

        self.precision = "openvino-" + hint["INFERENCE_PRECISION_HINT"]
        self.int8_report, self.compiled = None, None
        if int8 is not None:  # the float model is compiled only where INT8 needs it (its check) or is refused
            self.compiled, self.int8_report = int8_or_float(converted, self._float, compile_model, int8)
            if self.compiled is not None:
                self.precision = "openvino-int8"
        if self.compiled is None:
            self.compiled = self._float()

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
