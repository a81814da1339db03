"""Volume -> per-slice network outputs -> class probabilities in the file's own array order.

Speed comes from batching slices, inference mode, the channels_last memory layout (the
layout oneDNN and cuDNN convolutions prefer) and, with amp, reduced precision where the hardware
does it natively: fp16 on CUDA, bf16 autocast on CPUs with AMX or AVX-512 bf16. On other CPUs
bf16 is emulated and slower than fp32 (benchmarks/RESULTS.md), so fp32 is kept there.
On CPUs, OpenVINO can run the network instead (runtime.py), in the same precision.

With skip_air_slices, CT slices without head tissue are not run at all: they are background.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from inputs import WindowHU, make_channels
from volumes import Volume, from_ras

# Flip test-time augmentation: the identity plus mirrors along height, width and both.
TTA_FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (-2,), (-1,), (-2, -1))
# PyTorch on a CPU gets a batch in calls of at most this many pixels, or one slice (a 512 x 512 slice; 16 of
# 128 x 128): likely because a call's activations then stay closer to cache, it ran much faster than whole
# batches, with outputs equal in a probe (they may differ in the last bits, as batch_slices() says; figures in
# benchmarks/RESULTS.md). A GPU takes the whole batch; OpenVINO cuts its own parts.
TORCH_CPU_PIXELS_PER_CALL = 512 * 512
# A CT slice holds head tissue where a voxel is above this: halfway between air (-1000 HU) and fat (-100 HU), so
# noise in the air does not count and the thinnest skin does. Not a setting: any value between the two skips
# the same slices of a scan in HU.
HEAD_TISSUE_HU = -500.0


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AMX tiles or AVX-512 bf16), as PyTorch detects it."""
    return any(cpu_bf16_units().values())


def cpu_bf16_units() -> dict[str, bool]:
    """Which bf16 units PyTorch finds on this CPU and oneDNN may use: {"amx": ..., "avx512_bf16": ...}."""
    found = {}
    for unit, name in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, name, None)
        try:
            found[unit] = bool(check()) if check is not None else False
        except RuntimeError:  # detection is best effort; fp32 is always correct
            found[unit] = False
        found[unit] = found[unit] and onednn_allows(UNIT_ISA_MASKS[unit])
    return found


# oneDNN's ISA bit masks (its dnnl_cpu_isa_t). ONEDNN_MAX_CPU_ISA caps what oneDNN (in PyTorch and in
# OpenVINO) may use whatever the CPU has; under a cap below a unit, bf16 is emulated and ~10x slower.
ONEDNN_ISA_MASKS = {"SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F,
                    "AVX512_CORE": 0x27, "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7,
                    "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF, "AVX10_1_512_AMX": 0xFEF,
                    "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF, "AVX512_CORE_AMX_FP16": 0x1FEF}
UNIT_ISA_MASKS = {"amx": ONEDNN_ISA_MASKS["AVX512_CORE_AMX"], "avx512_bf16": ONEDNN_ISA_MASKS["AVX512_CORE_BF16"]}


def onednn_cap() -> str:
    """The ISA cap oneDNN reads, ONEDNN_MAX_CPU_ISA or its old name DNNL_MAX_CPU_ISA ("" where unset)."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def onednn_allows(unit_mask: int) -> bool:
    """False where the oneDNN cap is below that ISA."""
    mask = ONEDNN_ISA_MASKS.get(onednn_cap())  # unset, DEFAULT, ALL or unknown: no cap
    return mask is None or mask & unit_mask == unit_mask


def inference_device() -> torch.device:
    """Where a bundle's inference runs: the GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The reduced precision amp runs inference in on `device` (fp16 on CUDA, bf16 on a CPU with native bf16),
    or None for fp32."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


@dataclass
class SliceBatch:
    """Input channels of some axial slices, each whole, padded to the network's divisor."""

    slices: list[int]  # axial indices, not necessarily consecutive
    x: torch.Tensor  # (len(slices), C, padded height, padded width) float32


class SlicePredictor:
    """Runs a 2D network over every axial slice of a volume, in batches of slices.

    The model is switched to channels_last in place (the trainer's model too, which trains
    faster that way); weights and checkpoints are unaffected. amp and tta have no defaults
    here: callers pass the config's amp and infer_tta.
    """

    def __init__(self, model: torch.nn.Module, plan: list, windows: list[WindowHU], divisor: int,
                 batch_size: int, device: torch.device, amp: bool, tta: bool,
                 skip_air_slices: bool = False, network: Callable | None = None):
        self.model = model.to(memory_format=torch.channels_last)
        self.network = network  # another engine's compiled copy of the model (runtime.py), or None: the model
        self.plan, self.windows, self.divisor = plan, windows, divisor
        self.batch_size, self.device = max(int(batch_size), 1), device
        self.dtype = autocast_dtype(device, amp)
        self.flips = TTA_FLIP_DIMS if tta else TTA_FLIP_DIMS[:1]
        self.pixels_per_call = TORCH_CPU_PIXELS_PER_CALL if device.type == "cpu" else None  # None: whole batches
        self.skip_air_slices = skip_air_slices and all(w is not None for w in windows)  # HU: CT only

    @property
    def precision(self) -> str:
        if self.network is not None:
            return getattr(self.network, "precision", "other runtime")
        return "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "")

    @property
    def batch_key(self) -> tuple:
        """Predictors with equal keys cut a volume into the same batches (batch_slices), so an ensemble runs
        its members on the same batches, whatever channels each builds in them."""
        return self.divisor, self.batch_size, self.skip_air_slices

    @property
    def input_key(self) -> tuple:
        """Predictors with equal keys build the same batches, channels included, so those are built once for all."""
        return tuple(self.plan), tuple(self.windows), self.batch_key

    def batches(self, volume: Volume) -> Iterator[SliceBatch]:
        """The network inputs for a volume: slices in batches, as batch_slices() groups them."""
        for slices in self.batch_slices(volume):
            yield self.make_batch(volume.image, slices)

    def batch_slices(self, volume: Volume, only: Collection[int] | None = None) -> Iterator[list[int]]:
        """The axial slices of each batch, in order; with skip_air_slices, slices without head tissue are left out.

        With `only`, just those slices, packed into full batches: a slice's input does not depend on the slices
        beside it, nor its answer (per slice in eval mode; up to the last bits where PyTorch picks other kernels
        for another batch size).
        """
        depth = volume.image.shape[2]
        wanted = set(range(depth)) if only is None else set(only) & set(range(depth))
        if self.skip_air_slices:
            wanted &= set(np.flatnonzero((volume.image > HEAD_TISSUE_HU).any(axis=(0, 1))).tolist())
        ordered = sorted(wanted)
        for start in range(0, len(ordered), self.batch_size):
            yield ordered[start:start + self.batch_size]

    def make_batch(self, image: np.ndarray, slices: list[int]) -> SliceBatch:
        """Windowed channels of whole slices; the padding to the divisor is zero, like air."""
        x = torch.from_numpy(np.stack([make_channels(image, z, self.plan, self.windows) for z in slices]))
        pad_h, pad_w = -image.shape[0] % self.divisor, -image.shape[1] % self.divisor
        return SliceBatch(slices, F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)

    @torch.inference_mode()
    def batch_probabilities(self, batch: SliceBatch) -> np.ndarray:
        """Softmax probabilities (N, C, padded H, padded W) of one batch."""
        self.model.eval()
        x = batch.x.to(self.device, memory_format=torch.channels_last)
        return self._probabilities(x).cpu().numpy()

    def predict_slices_last(self, volume: Volume) -> np.ndarray:
        """Softmax probabilities (C, H, W, D), axial axis last like volume.image."""
        return predict_together([self], volume)[0]

    def predict(self, volume: Volume) -> np.ndarray:
        """Probabilities (C, X, Y, Z) in the image file's array order and grid."""
        return from_ras(self.predict_slices_last(volume), volume.affine)

    def num_classes(self) -> int:
        """Output classes, from a pass over one blank input (needed only for a volume without any head)."""
        blank = torch.zeros(1, len(self.plan), self.divisor, self.divisor)
        return self.batch_probabilities(SliceBatch([0], blank)).shape[1]

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the network, averaged over the flipped copies when TTA is on."""
        total = None
        for dims in self.flips:
            flipped = torch.flip(x, dims) if dims else x
            if self.network is not None:
                logits = self.network(flipped)
            else:
                parts = flipped.split(self._slices_per_call(flipped))
                with self._autocast():
                    logits = torch.cat([self.model(part) for part in parts])
            probs = torch.softmax(logits.float(), dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return total / len(self.flips)

    def _slices_per_call(self, x: torch.Tensor) -> int:
        if self.pixels_per_call is None:
            return len(x)
        return max(1, self.pixels_per_call // (x.shape[-2] * x.shape[-1]))

    def _autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)


def background(num_classes: int, shape: Sequence[int]) -> np.ndarray:
    """Probabilities (C, H, W, D) that say 'background' everywhere: what skipped air-only slices get."""
    output = np.zeros((num_classes, *shape), dtype=np.float32)
    output[0] = 1.0
    return output


def paste(output: np.ndarray, slices: list[int], values: np.ndarray) -> None:
    """Write a batch's (N, C, padded H, padded W) values into output (C, H, W, D); the padding is dropped."""
    height, width = output.shape[1:3]
    output[..., slices] = np.moveaxis(values[:, :, :height, :width], 0, -1)


def predict_together(predictors: Sequence[SlicePredictor], volume: Volume, vote: bool = False,
                     keep_masks: bool = False, only: Collection[int] | None = None
                     ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Several models over one volume on the same batches: each box is cut once, and windowed once per input
    variant among them (models of one variant share their channels).

    Returns the sum over models of their probabilities (with vote, of their one-hot argmax),
    (C, H, W, D), and with keep_masks each model's argmax class mask (H, W, D) uint8. With `only`,
    just those axial slices are run, on the inputs a whole pass gives them (SlicePredictor.batch_slices);
    every other slice is background.
    """
    lead = predictors[0]
    unlike = [index for index, p in enumerate(predictors) if p.batch_key != lead.batch_key]
    if unlike:
        raise ValueError(f"predictors {unlike} cut a volume into other batches than predictor 0 (divisor, batch "
                         "size or skipping of air-only slices differ); predict them in a group of their own")
    total, masks = None, [np.zeros(volume.image.shape, np.uint8) for _ in predictors] if keep_masks else []
    for slices in lead.batch_slices(volume, only):
        inputs, batch_total = {}, None  # input_key -> SliceBatch: one windowing per variant
        for index, predictor in enumerate(predictors):
            if predictor.input_key not in inputs:
                inputs[predictor.input_key] = predictor.make_batch(volume.image, slices)
            batch = inputs[predictor.input_key]
            probabilities = predictor.batch_probabilities(batch)
            if vote or keep_masks:
                labels = probabilities.argmax(1)
                if keep_masks:
                    paste(masks[index][None], slices, labels[:, None].astype(np.uint8))
                if vote:
                    probabilities = np.moveaxis(np.eye(probabilities.shape[1], dtype=np.float32)[labels], -1, 1)
            batch_total = probabilities if batch_total is None else batch_total + probabilities
        if total is None:
            total = background(batch_total.shape[1], volume.image.shape) * len(predictors)
        paste(total, slices, batch_total)
    if total is None:  # no slice holds any head tissue (or none of `only` does)
        total = background(lead.num_classes(), volume.image.shape) * len(predictors)
    return total, masks
