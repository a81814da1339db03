"""Volume -> per-slice network outputs -> class probabilities in the file's own array order.

Speed comes from batching slices, inference mode, the channels_last memory layout (the
layout oneDNN and cuDNN convolutions prefer) and reduced precision where the hardware does
it natively: AMP on CUDA, bf16 autocast on CPUs with AMX or AVX-512 bf16. On other CPUs
bf16 is emulated and slower than fp32 (measured: benchmarks/RESULTS.md), so fp32 is kept.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from inputs import WindowHU, make_channels
from volumes import Volume, from_ras

# Flip test-time augmentation: the identity plus mirrors along height, width and both.
TTA_FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (-2,), (-1,), (-2, -1))


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AMX tiles or AVX-512 bf16), as PyTorch detects it."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:  # detection is best effort; fp32 is always correct
        return False


def autocast_dtype(device: torch.device, amp: bool, cpu_bf16: bool) -> torch.dtype | None:
    """The reduced precision to run inference in, or None for fp32."""
    if device.type == "cuda":
        return torch.float16 if amp else None
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


class SlicePredictor:
    """Runs a 2D network over every axial slice of a volume, in batches of slices.

    The model is switched to channels_last in place (the trainer's model too, which trains
    faster that way); weights and checkpoints are unaffected.
    """

    def __init__(self, model: torch.nn.Module, plan: list, windows: list[WindowHU], divisor: int,
                 batch_size: int, device: torch.device, amp: bool = True, cpu_bf16: bool = True,
                 tta: bool = False):
        self.model = model.to(memory_format=torch.channels_last)
        self.plan, self.windows, self.divisor = plan, windows, divisor
        self.batch_size, self.device = max(int(batch_size), 1), device
        self.dtype = autocast_dtype(device, amp, cpu_bf16)
        self.flips = TTA_FLIP_DIMS if tta else TTA_FLIP_DIMS[:1]

    @property
    def precision(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "")

    @torch.inference_mode()
    def predict_slices_last(self, volume: Volume) -> np.ndarray:
        """Softmax probabilities (C, H, W, D), axial axis last like volume.image."""
        self.model.eval()
        height, width, depth = volume.image.shape
        outputs = []
        for start in range(0, depth, self.batch_size):
            batch = np.stack([make_channels(volume.image, z, self.plan, self.windows)
                              for z in range(start, min(start + self.batch_size, depth))])
            x = self._pad(torch.from_numpy(batch)).to(self.device, memory_format=torch.channels_last)
            probs = self._probabilities(x)[:, :, :height, :width]
            outputs.append(probs.cpu().numpy())
        return np.moveaxis(np.concatenate(outputs, axis=0), 0, -1)  # (D, C, H, W) -> (C, H, W, D)

    def predict(self, volume: Volume) -> np.ndarray:
        """Probabilities (C, X, Y, Z) in the image file's array order and grid."""
        return from_ras(self.predict_slices_last(volume), volume.affine)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the network, averaged over the flipped copies when TTA is on."""
        total = None
        for dims in self.flips:
            flipped = torch.flip(x, dims) if dims else x
            with self._autocast():
                logits = self.model(flipped)
            probs = torch.softmax(logits.float(), dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return total / len(self.flips)

    def _autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad height and width at the far end up to multiples of the network's divisor."""
        pad_h = -x.shape[-2] % self.divisor
        pad_w = -x.shape[-1] % self.divisor
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
