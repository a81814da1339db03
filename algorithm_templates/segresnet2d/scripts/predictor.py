"""Volume -> per-slice network outputs -> class probabilities in the file's own array order."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from inputs import WindowHU, make_channels
from volumes import Volume, from_ras


class SlicePredictor:
    """Runs a 2D network over every axial slice of a volume, in batches of slices."""

    def __init__(self, model: torch.nn.Module, plan: list, windows: list[WindowHU], divisor: int,
                 batch_size: int, device: torch.device, amp: bool = True):
        self.model, self.plan, self.windows, self.divisor = model, plan, windows, divisor
        self.batch_size, self.device = max(int(batch_size), 1), device
        self.amp = amp and device.type == "cuda"

    @torch.inference_mode()
    def predict_slices_last(self, volume: Volume) -> np.ndarray:
        """Softmax probabilities (C, H, W, D), axial axis last like volume.image."""
        self.model.eval()
        height, width, depth = volume.image.shape
        outputs = []
        for start in range(0, depth, self.batch_size):
            batch = np.stack([make_channels(volume.image, z, self.plan, self.windows)
                              for z in range(start, min(start + self.batch_size, depth))])
            x = self._pad(torch.from_numpy(batch).to(self.device))
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = self.model(x)
            probs = torch.softmax(logits.float(), dim=1)[:, :, :height, :width]
            outputs.append(probs.cpu().numpy())
        return np.moveaxis(np.concatenate(outputs, axis=0), 0, -1)  # (D, C, H, W) -> (C, H, W, D)

    def predict(self, volume: Volume) -> np.ndarray:
        """Probabilities (C, X, Y, Z) in the image file's array order and grid."""
        return from_ras(self.predict_slices_last(volume), volume.affine)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad height and width at the far end up to multiples of the network's divisor."""
        pad_h = -x.shape[-2] % self.divisor
        pad_w = -x.shape[-1] % self.divisor
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
