"""Cached volumes -> random 2D training samples.

Order of work per sample, cheapest first: crop the few source slices a sample needs around a
precomputed foreground pixel, apply the geometric augmentation to those raw intensities (3
channels, not 9), then window them into the input channels and add intensity augmentation.
Every sample carries its own seed, so the augmentation does not depend on the number of
DataLoader workers or on where a run was resumed, and workers can live across epochs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from monai import transforms as mt
from torch.utils.data import Dataset, Sampler

from inputs import WindowHU, apply_window
from volumes import Volume

AIR_HU = -1024.0  # what CT padding (outside the scan, or rotated in) should look like


def foreground_pixels(volume: Volume) -> dict[int, np.ndarray]:
    """Axial slice index -> (N, 2) in-plane coordinates of its labelled pixels (only slices with any)."""
    label = np.moveaxis(volume.label, -1, 0)  # (D, H, W): a plain view of the slice-major cache
    pixels = {}
    for z in np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1)):
        pixels[int(z)] = np.argwhere(label[z] > 0).astype(np.int32)
    return pixels


class SliceSampler(Sampler):
    """One epoch = every slice with foreground plus a random share of background-only slices.

    Hemorrhage often spans only 2-3 of 20-70 slices, so sampling slices uniformly would show
    the network almost nothing but background. Yields (volume, slice, sample seed); the order
    and the seeds come from (seed, epoch) alone, the same on every rank, and each rank takes
    every world_size-th item (short ranks repeat items: DDP needs equal step counts).
    """

    def __init__(self, foreground: list[dict], num_slices: list[int], background_slice_ratio: float, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.foreground_items = [(v, z) for v, slices in enumerate(foreground) for z in sorted(slices)]
        self.background_items = [(v, z) for v, (slices, depth) in enumerate(zip(foreground, num_slices))
                                 for z in range(depth) if z not in slices]
        self.ratio, self.seed, self.rank, self.world_size = background_slice_ratio, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_items(self) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        background = self.background_items
        if self.foreground_items:
            count = min(len(background), math.ceil(self.ratio * len(self.foreground_items)))
            picked = rng.choice(len(background), size=count, replace=False) if count else []
            items = self.foreground_items + [background[i] for i in sorted(picked)]
        else:
            items = list(background)
        order = rng.permutation(len(items))
        seeds = rng.integers(0, 2**31 - 1, size=len(items))
        return [(*items[i], int(s)) for i, s in zip(order, seeds)]

    def __iter__(self):
        items = self.epoch_items()
        per_rank = -(-len(items) // self.world_size)
        items = (items * self.world_size)[: per_rank * self.world_size]
        return iter(items[self.rank::self.world_size])

    def __len__(self) -> int:
        total = len(self.foreground_items) + (
            min(len(self.background_items), math.ceil(self.ratio * len(self.foreground_items)))
            if self.foreground_items else len(self.background_items))
        return -(-total // self.world_size)


MAX_AUTO_WORKERS = 16


def resolve_num_workers(num_workers: int) -> int:
    """num_workers -1: one worker per CPU core this process may use beyond its own (at most 16).

    Under torchrun the cores are shared by the processes on the node (LOCAL_WORLD_SIZE).
    A paper-size step on a recent GPU consumes ~450 samples/s; one worker makes ~50-100.
    """
    if num_workers >= 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


def crop_start(center: int, size: int, roi: int) -> int:
    """First index of a roi-long window centred on `center`, shifted to stay inside [0, size)."""
    return int(min(max(center - roi // 2, 0), max(size - roi, 0)))


def crop_slices(stack: np.ndarray, label: np.ndarray, z_indices: list[int], z: int, start: tuple[int, int],
                roi: tuple[int, int], fill: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, roi, roi) float32 source slices and (1, roi, roi) label; slices smaller than roi are padded centred."""
    h, w = stack.shape[1:]
    (y0, x0), (rh, rw) = start, roi
    y1, x1 = min(y0 + rh, h), min(x0 + rw, w)
    py, px = (rh - (y1 - y0)) // 2, (rw - (x1 - x0)) // 2
    image = np.full((len(z_indices), rh, rw), fill, np.float32)
    image[:, py:py + y1 - y0, px:px + x1 - x0] = stack[:, y0:y1, x0:x1][z_indices]
    mask = np.zeros((1, rh, rw), np.float32)
    mask[0, py:py + y1 - y0, px:px + x1 - x0] = label[z, y0:y1, x0:x1]
    return image, mask


class WindowChannelsd(mt.MapTransform):
    """Source slices (offset by `shift`) -> input channels: channel i = window w_i of source slice s_i."""

    def __init__(self, key: str, sources: list[int], windows: list[WindowHU], shift: float):
        super().__init__([key])
        self.sources, self.windows, self.shift = sources, windows, shift

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            values = torch.as_tensor(out[key]).numpy() + self.shift
            out[key] = np.stack([apply_window(values[s], w) for s, w in zip(self.sources, self.windows)])
        return out


class RandNoised(mt.RandomizableTransform, mt.MapTransform):
    """Gaussian noise with a standard deviation drawn from [0, max_std]: MONAI's RandGaussianNoised
    semantics, drawn in float32 by torch (3x faster than NumPy's legacy float64 normal)."""

    def __init__(self, key: str, prob: float, max_std: float):
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, [key])
        self.max_std = max_std

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        std = self.R.uniform(0, self.max_std)
        generator = torch.Generator().manual_seed(int(self.R.randint(0, 2**31 - 1)))
        out = dict(data)
        for key in self.key_iterator(out):
            image = torch.as_tensor(out[key])
            out[key] = image + std * torch.randn(image.shape, generator=generator, dtype=image.dtype)
        return out


def geometric_transforms(config: dict) -> mt.Compose:
    """Flips on both in-plane axes and rotation + scaling, on the cropped source slices and the label."""
    keys = ["image", "label"]
    flip = config["augment_flip_prob"]
    return mt.Compose([
        mt.RandFlipd(keys, prob=flip, spatial_axis=0),
        mt.RandFlipd(keys, prob=flip, spatial_axis=1),
        mt.RandAffined(
            keys,
            prob=config["augment_affine_prob"],
            rotate_range=math.radians(config["augment_rotate_deg"]),
            scale_range=(config["augment_scale_range"],) * 2,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",  # zero = the fill value after the shift, i.e. air for CT
        ),
    ])


def intensity_transforms(config: dict) -> mt.Compose:
    """Noise, intensity scale and shift, and coarse patch shuffle, on the windowed [0, 1] channels."""
    intensity = config["augment_intensity_prob"]
    roi = [int(r) for r in config["roi_size"]]
    return mt.Compose([
        RandNoised("image", prob=config["augment_noise_prob"], max_std=0.05),
        mt.RandScaleIntensityd("image", factors=0.1, prob=intensity),
        mt.RandShiftIntensityd("image", offsets=0.1, prob=intensity),
        mt.RandCoarseShuffled(
            "image", holes=4, spatial_size=max(roi[0] // 16, 2), prob=config["augment_shuffle_prob"]),
        mt.EnsureTyped(["image", "label"], track_meta=False, dtype=torch.float32),
    ])


def random_states(transform: mt.Transform) -> list[np.random.RandomState]:
    """Every RandomState a (nested) MONAI transform draws from, in a fixed order.

    Looked up on every sample: MONAI's DataLoader replaces them in each worker (set_rnd).
    Reseeding them in place costs microseconds, where set_random_state builds a new
    RandomState per transform (~0.2 ms each, ~3 ms per sample here).
    """
    states, seen = [], set()

    def visit(node: mt.Transform) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, mt.Randomizable) and all(node.R is not r for r in states):
            states.append(node.R)
        children = node.transforms if isinstance(node, mt.Compose) else list(vars(node).values())
        for child in children:
            if isinstance(child, mt.Transform):
                visit(child)

    visit(transform)
    return states


class SliceDataset(Dataset):
    """Indexed by the (volume, slice, seed) items SliceSampler yields; returns {"image", "label"} tensors."""

    def __init__(self, volumes: list[Volume], foreground: list[dict], plan: list[tuple[int, int]],
                 windows: list[WindowHU], config: dict):
        self.volumes, self.foreground = volumes, foreground
        self.roi = tuple(int(r) for r in config["roi_size"])
        self.foreground_ratio = float(config["foreground_crop_ratio"])
        self.offsets = sorted({offset for _, offset in plan})
        # Source slices are shifted so that 0 is air (CT) or the mean (z-scored input): the affine
        # transform pads with 0, and crops of small slices are padded with the same value.
        self.shift = AIR_HU if all(w is not None for w in windows) else 0.0
        sources = [self.offsets.index(offset) for _, offset in plan]
        self.geometric = geometric_transforms(config)
        self.channels = WindowChannelsd("image", sources, [windows[w] for w, _ in plan], self.shift)
        self.intensity = intensity_transforms(config)
        for transform in (self.geometric, self.intensity):
            transform.set_random_state(seed=0)  # one generator per nested transform, reseeded per sample

    def __len__(self) -> int:
        return sum(v.num_slices for v in self.volumes)

    def crop_center(self, rng: np.random.Generator, v: int, z: int, shape: tuple[int, int]) -> tuple[int, int]:
        """A labelled pixel with probability foreground_crop_ratio (if the slice has any), else any pixel."""
        pixels = self.foreground[v].get(z)
        if pixels is not None and rng.random() < self.foreground_ratio:
            return tuple(pixels[rng.integers(len(pixels))])
        return int(rng.integers(shape[0])), int(rng.integers(shape[1]))

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        v, z, seed = item
        volume = self.volumes[v]
        stack = np.moveaxis(volume.image, -1, 0)  # (D, H, W)
        label = np.moveaxis(volume.label, -1, 0)
        rng = np.random.default_rng(seed)
        shape = stack.shape[1:]
        cy, cx = self.crop_center(rng, v, z, shape)
        start = (crop_start(cy, shape[0], self.roi[0]), crop_start(cx, shape[1], self.roi[1]))
        z_indices = [min(max(z + offset, 0), stack.shape[0] - 1) for offset in self.offsets]
        image, mask = crop_slices(stack, label, z_indices, z, start, self.roi, fill=self.shift)
        image -= self.shift
        states = random_states(self.geometric) + random_states(self.intensity)
        for state, state_seed in zip(states, rng.integers(2**32, size=len(states))):
            state.seed(state_seed)
        sample = self.geometric({"image": image, "label": mask})
        return self.intensity(self.channels(sample))
