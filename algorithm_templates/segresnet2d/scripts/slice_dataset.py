"""Cached volumes -> random 2D training samples.

Order of work per sample, cheapest first: crop the few source slices a sample needs around a
precomputed foreground pixel (with a margin of real context when the sample will be rotated or
scaled, so corners come from the scan, not from padding), apply the geometric augmentation to
those raw intensities (3 channels, not 9), then window them into the input channels and add
intensity augmentation.
Every sample carries its own seed, so the augmentation does not depend on the number of
DataLoader workers or on where a run was resumed, and workers can live across epochs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
from monai import transforms as mt
from torch.utils.data import Dataset, Sampler

from inputs import WindowHU, source_offsets, source_slices, stack_channels
from volumes import DISTILL_TARGET_LEVELS, Volume

AIR_HU = -1024.0  # what CT padding (outside the scan) should look like


def foreground_pixels(volume: Volume) -> dict[int, np.ndarray]:
    """Axial slice index -> (N, 2) in-plane coordinates of its labelled pixels (only slices with any)."""
    label = np.moveaxis(volume.label, -1, 0)  # (D, H, W): a plain view of the slice-major cache
    pixels = {}
    for z in np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1)):
        pixels[int(z)] = np.argwhere(label[z] > 0).astype(np.int32)
    return pixels


def background_count(ratio: float, num_foreground: int) -> int:
    """ceil(ratio x foreground slices), without float noise (1.1 x 100 is 110, not 111)."""
    return math.ceil(round(ratio * num_foreground, 9))


class SliceSampler(Sampler):
    """One epoch = every slice with foreground plus a random share of background-only slices.

    Hemorrhage often spans only 2-3 of 20-70 slices, so sampling slices uniformly would show
    the network almost nothing but background. Yields (volume, slice, sample seed); the order
    and the seeds come from (seed, epoch) alone, the same on every rank.

    Under torchrun an epoch has as many steps per process as one process alone would make:
    the world_size processes share world_size draws of the epoch (each takes every
    world_size-th item), so the optimizer steps and the learning-rate schedule do not depend
    on the number of processes, and each step sees world_size x batch_size samples (the
    paper's setup: batch 32 per GPU on 8 GPUs).
    """

    def __init__(self, foreground: list[dict], num_slices: list[int], background_slice_ratio: float, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.foreground_items = [(v, z) for v, slices in enumerate(foreground) for z in sorted(slices)]
        self.background_items = [(v, z) for v, (slices, depth) in enumerate(zip(foreground, num_slices))
                                 for z in range(depth) if z not in slices]
        self.num_background = len(self.background_items)  # all-background data: every slice
        if self.foreground_items:
            wanted = background_count(background_slice_ratio, len(self.foreground_items))
            self.num_background = min(self.num_background, wanted)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_items(self, draw: int | None = None) -> list[tuple[int, int, int]]:
        """The items of one draw of the epoch; draw 0 (the default) is what a single process trains on."""
        draw = self.epoch * self.world_size if draw is None else draw
        rng = np.random.default_rng([self.seed, draw])
        picked = rng.choice(len(self.background_items), size=self.num_background, replace=False)
        items = self.foreground_items + [self.background_items[i] for i in sorted(picked)]
        order = rng.permutation(len(items))
        seeds = rng.integers(0, 2**31 - 1, size=len(items))
        return [(*items[i], int(s)) for i, s in zip(order, seeds)]

    def __iter__(self):
        draws = range(self.epoch * self.world_size, (self.epoch + 1) * self.world_size)
        items = [item for draw in draws for item in self.epoch_items(draw)]
        return iter(items[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self.foreground_items) + self.num_background


MAX_AUTO_WORKERS = 16


def cgroup_cpu_limit(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The CPU quota of a container (cgroup v2 `cpu.max`, e.g. docker --cpus=4), rounded up; None if unlimited."""
    try:
        quota, period = open(cpu_max).read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def resolve_num_workers(num_workers: int) -> int:
    """num_workers -1: one worker per CPU core this process may use beyond its own (at most 16).

    The cores are the affinity mask capped by a container's CPU quota, shared under torchrun
    by the processes on the node (LOCAL_WORLD_SIZE). A paper-size step on a recent GPU
    consumes ~450 samples/s; one worker makes ~50-100.
    """
    if num_workers >= 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = min(cores, cgroup_cpu_limit() or cores)
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


def crop_start(center: int, size: int, roi: int) -> int:
    """First index of a roi-long window centred on `center` and kept inside [0, size).

    A slice smaller than roi gets a negative start: the slice sits in the middle of the crop.
    """
    if size <= roi:
        return -((roi - size) // 2)
    return int(min(max(center - roi // 2, 0), size - roi))


def affine_margin(roi: int, rotate_deg: float, scale_range: float) -> int:
    """Context pixels per side that a rotation up to rotate_deg and a zoom-out up to 1 + scale_range read."""
    angle = math.radians(min(abs(rotate_deg), 45.0))
    reach = (1.0 + abs(scale_range)) * (math.cos(angle) + math.sin(angle))
    return max(0, math.ceil(roi / 2 * (reach - 1.0)))


def crop_slices(stack: np.ndarray, label: np.ndarray, z_indices: list[int], z: int, start: tuple[int, int],
                size: tuple[int, int], fill: float,
                soft_target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(S, h, w) float32 source slices and (1, h, w) label of the window at `start` (may reach outside
    the slice: that part is `fill`, label 0). Reads only the window's rows of the needed slices.

    With a (D, H, W) soft_target (uint8 levels), the label gets a second channel, its probabilities
    (level / 255, 0 outside the slice): the augmentation then moves it with the label."""
    (y0, x0), (h, w) = start, size
    iy0, ix0 = max(y0, 0), max(x0, 0)
    iy1, ix1 = min(y0 + h, stack.shape[1]), min(x0 + w, stack.shape[2])
    image = np.full((len(z_indices), h, w), fill, np.float32)
    mask = np.zeros((1 if soft_target is None else 2, h, w), np.float32)
    if iy1 > iy0 and ix1 > ix0:
        inside = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
        image[(slice(None), *inside)] = stack[:, iy0:iy1, ix0:ix1][z_indices]
        mask[(0, *inside)] = label[z, iy0:iy1, ix0:ix1]
        if soft_target is not None:
            mask[(1, *inside)] = soft_target[z, iy0:iy1, ix0:ix1] / np.float32(DISTILL_TARGET_LEVELS)
    return image, mask


class WindowChannelsd(mt.MapTransform):
    """(S, h, w) source slices -> input channels, by the function inference uses (inputs.stack_channels)."""

    def __init__(self, key: str, plan: list[tuple[int, int]], windows: list[WindowHU]):
        super().__init__([key])
        self.plan, self.windows = plan, windows

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = stack_channels(torch.as_tensor(out[key]).numpy(), self.plan, self.windows)
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


@dataclass(frozen=True)
class Augmentation:
    """The augment_* keys of configs/hyper_parameters.yaml (units and meaning there), read once."""

    flip_prob: float
    affine_prob: float
    rotate_deg: float
    scale_range: float
    noise_prob: float
    noise_max_std: float
    intensity_prob: float
    intensity_scale: float
    intensity_shift: float
    shuffle_prob: float
    shuffle_holes: int

    @classmethod
    def from_config(cls, config: dict) -> Augmentation:
        keys = {f.name: f"augment_{f.name}" for f in fields(cls)}
        missing = [key for key in keys.values() if key not in config]
        if missing:
            raise KeyError(f"config has no {', '.join(missing)}; restore the key(s) from the template's "
                           "configs/hyper_parameters.yaml")
        return cls(**{name: config[key] for name, key in keys.items()})


def affine_transform(roi_size: tuple[int, int], rotate_deg: float, scale_range: float) -> mt.RandAffined:
    """Rotation + scaling of a context window into a roi-sized crop around its centre (always applied:
    SliceDataset draws whether a sample gets it, so the others skip the resampling)."""
    return mt.RandAffined(
        ["image", "label"],
        prob=1.0,
        spatial_size=list(roi_size),
        rotate_range=math.radians(rotate_deg),
        scale_range=(scale_range,) * 2,  # drawn per axis: zoom and a mild aspect change
        # nearest for the label's channels: exact for class indices, and acceptable for a distillation target
        # (each pixel keeps one of the teacher's probabilities; the teacher's map is smooth already)
        mode=("bilinear", "nearest"),
        padding_mode="zeros",  # zero = the background after the shift (air for CT); rarely reached
    )


def flip_transforms(prob: float) -> mt.Compose:
    keys = ["image", "label"]
    return mt.Compose([mt.RandFlipd(keys, prob=prob, spatial_axis=0), mt.RandFlipd(keys, prob=prob, spatial_axis=1)])


def intensity_transforms(augmentation: Augmentation, roi_size: tuple[int, int]) -> mt.Compose:
    """Noise, intensity scale and shift, and coarse patch shuffle, on the windowed [0, 1] channels."""
    return mt.Compose([
        RandNoised("image", prob=augmentation.noise_prob, max_std=augmentation.noise_max_std),
        mt.RandScaleIntensityd("image", factors=augmentation.intensity_scale, prob=augmentation.intensity_prob),
        mt.RandShiftIntensityd("image", offsets=augmentation.intensity_shift, prob=augmentation.intensity_prob),
        mt.RandCoarseShuffled("image", holes=int(augmentation.shuffle_holes), spatial_size=max(min(roi_size) // 16, 2),
                              prob=augmentation.shuffle_prob),
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
    """Indexed by the (volume, slice, seed) items SliceSampler yields; returns {"image", "label"} tensors.

    "label" is (1, h, w) class indices, or (2, h, w) with the volume's distillation target (crop_slices).

    (It has no integer indices: use it with SliceSampler.)
    """

    def __init__(self, volumes: list[Volume], foreground: list[dict], plan: list[tuple[int, int]],
                 windows: list[WindowHU], roi_size: list[int], foreground_crop_ratio: float,
                 augmentation: Augmentation):
        self.volumes, self.foreground = volumes, foreground
        self.roi = tuple(int(r) for r in roi_size)
        self.foreground_ratio = float(foreground_crop_ratio)
        self.affine_prob = float(augmentation.affine_prob)
        self.margin = tuple(
            affine_margin(r, augmentation.rotate_deg, augmentation.scale_range) if self.affine_prob > 0
            else 0 for r in self.roi)
        self.offsets = source_offsets(plan)
        # Source slices are shifted so that 0 is the background: air for CT, each volume's minimum for
        # z-scored input. Crops reaching past the slice and the affine transform's padding are then 0.
        ct = all(w is not None for w in windows)
        self.backgrounds = [AIR_HU if ct else float(np.min(v.image)) for v in volumes]
        self.affine = affine_transform(self.roi, augmentation.rotate_deg, augmentation.scale_range)
        self.flips = flip_transforms(augmentation.flip_prob)
        self.channels = WindowChannelsd("image", plan, windows)
        self.intensity = intensity_transforms(augmentation, self.roi)
        for transform in self.randomized():
            transform.set_random_state(seed=0)  # one generator per nested transform, reseeded per sample

    def randomized(self) -> tuple[mt.Randomizable, ...]:
        return self.affine, self.flips, self.intensity

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
        rng = np.random.default_rng(seed)
        cy, cx = self.crop_center(rng, v, z, stack.shape[1:])
        box = [crop_start(c, n, r) for c, n, r in zip((cy, cx), stack.shape[1:], self.roi)]
        rotate = rng.random() < self.affine_prob
        margin = self.margin if rotate else (0, 0)
        z_indices = source_slices(z, self.offsets, stack.shape[0])
        background = self.backgrounds[v]
        soft_target = None if volume.soft_target is None else np.moveaxis(volume.soft_target, -1, 0)
        image, mask = crop_slices(stack, np.moveaxis(volume.label, -1, 0), z_indices, z,
                                  (box[0] - margin[0], box[1] - margin[1]),
                                  (self.roi[0] + 2 * margin[0], self.roi[1] + 2 * margin[1]), fill=background,
                                  soft_target=soft_target)
        image -= background
        states = [state for transform in self.randomized() for state in random_states(transform)]
        for state, state_seed in zip(states, rng.integers(2**32, size=len(states))):
            state.seed(state_seed)
        sample = {"image": image, "label": mask}
        if rotate:
            sample = self.affine(sample)  # the context window -> a roi crop around its centre
        sample = self.flips(sample)
        sample["image"] = torch.as_tensor(sample["image"]) + background  # back to HU (or z-scores)
        return self.intensity(self.channels(sample))
