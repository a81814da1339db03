"""Decoded volumes -> random 2D training samples: input channels, a crop around foreground, augmentation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai import transforms as mt
from torch.utils.data import Dataset

from inputs import WindowHU, make_channels
from volumes import Volume

# RandCropByPosNegLabeld warns on every background-only slice; those are sampled on purpose.
warnings.filterwarnings("ignore", message=".*unable to generate class balanced samples.*")
warnings.filterwarnings("ignore", message="Num foregrounds 0.*")


def epoch_slices(volumes: list[Volume], background_slice_ratio: float, rng: np.random.Generator) -> list[tuple]:
    """Every slice with foreground, plus a random share of background-only slices.

    Hemorrhage often spans only 2-3 of 20-70 slices, so sampling slices uniformly would
    show the network almost nothing but background.
    """
    foreground, background = [], []
    for v_index, volume in enumerate(volumes):
        has_label = volume.label.reshape(-1, volume.num_slices).any(axis=0)
        for z in range(volume.num_slices):
            (foreground if has_label[z] else background).append((v_index, z))
    if not foreground:
        return background
    num_background = min(len(background), math.ceil(background_slice_ratio * len(foreground)))
    picked = rng.choice(len(background), size=num_background, replace=False) if num_background else []
    items = foreground + [background[i] for i in sorted(picked)]
    return [items[i] for i in rng.permutation(len(items))]


def training_transforms(config: dict) -> mt.Compose:
    roi = [int(r) for r in config["roi_size"]]
    keys = ["image", "label"]
    ratio = float(config["foreground_crop_ratio"])
    flip, affine = config["augment_flip_prob"], config["augment_affine_prob"]
    intensity = config["augment_intensity_prob"]
    return mt.Compose(
        [
            mt.SpatialPadd(keys, spatial_size=roi, mode="constant"),
            mt.RandCropByPosNegLabeld(keys, "label", spatial_size=roi, pos=ratio, neg=1.0 - ratio, num_samples=1),
            mt.RandFlipd(keys, prob=flip, spatial_axis=0),
            mt.RandFlipd(keys, prob=flip, spatial_axis=1),
            mt.RandAffined(
                keys,
                prob=affine,
                rotate_range=math.radians(config["augment_rotate_deg"]),
                scale_range=(config["augment_scale_range"],) * 2,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            mt.RandGaussianNoised("image", prob=config["augment_noise_prob"], std=0.05),
            mt.RandScaleIntensityd("image", factors=0.1, prob=intensity),
            mt.RandShiftIntensityd("image", offsets=0.1, prob=intensity),
            mt.RandCoarseShuffled(
                "image", holes=4, spatial_size=max(roi[0] // 16, 2), prob=config["augment_shuffle_prob"]),
            mt.EnsureTyped(keys, track_meta=False),
        ]
    )


class SliceDataset(Dataset):
    """One item per (volume, axial slice); channels are built on the fly from the cached volume."""

    def __init__(self, volumes: list[Volume], items: list[tuple], plan: list, windows: list[WindowHU], transform):
        self.volumes, self.items, self.plan, self.windows, self.transform = volumes, items, plan, windows, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        v_index, z = self.items[index]
        volume = self.volumes[v_index]
        sample = {
            "image": torch.from_numpy(make_channels(volume.image, z, self.plan, self.windows)),
            "label": torch.from_numpy(volume.label[None, :, :, z].astype(np.float32)),
        }
        out = self.transform(sample)
        return out[0] if isinstance(out, list) else out
