"""The three input variants: which (CT window, slice offset) pair feeds each input channel.

(a) ``slices``:  3 adjacent slices at the first window       -> 3 channels
(b) ``windows``: the centre slice at every window            -> 3 channels
(c) ``both``:    every window at every adjacent slice        -> 9 channels
Slices beyond the first or last are replicated (edge padding along the axial axis).
"""

from __future__ import annotations

import numpy as np

WindowHU = tuple[float, float] | None  # None: intensities are already normalised (non-CT)


def _slices_plan(num_windows: int, offsets: list[int]) -> list[tuple[int, int]]:
    return [(0, offset) for offset in offsets]


def _windows_plan(num_windows: int, offsets: list[int]) -> list[tuple[int, int]]:
    return [(w, 0) for w in range(num_windows)]


def _both_plan(num_windows: int, offsets: list[int]) -> list[tuple[int, int]]:
    return [(w, offset) for w in range(num_windows) for offset in offsets]


INPUT_VARIANTS = {"slices": _slices_plan, "windows": _windows_plan, "both": _both_plan}


def slice_offsets(num_adjacent_slices: int) -> list[int]:
    if num_adjacent_slices < 1 or num_adjacent_slices % 2 == 0:
        raise ValueError(f"num_adjacent_slices must be an odd number >= 1, got {num_adjacent_slices}")
    half = num_adjacent_slices // 2
    return list(range(-half, half + 1))


def channel_plan(variant: str, num_windows: int, num_adjacent_slices: int) -> list[tuple[int, int]]:
    """List of (window index, slice offset), one per input channel."""
    if variant not in INPUT_VARIANTS:
        raise ValueError(f"input_variant '{variant}' is unknown; choose one of {', '.join(INPUT_VARIANTS)}")
    return INPUT_VARIANTS[variant](max(num_windows, 1), slice_offsets(num_adjacent_slices))


def windows_for(modality: str, ct_windows_hu: list) -> list[WindowHU]:
    """CT uses the configured HU windows; other modalities one identity 'window' (already z-scored)."""
    if str(modality).lower() != "ct":
        return [None]
    windows = [tuple(map(float, w)) for w in ct_windows_hu]
    for low, high in windows:
        if not high > low:
            raise ValueError(f"ct_windows_hu entry [{low}, {high}] must have high > low (Hounsfield units)")
    return windows


def apply_window(values: np.ndarray, window: WindowHU) -> np.ndarray:
    """Map [low, high] HU linearly to [0, 1], clipping outside."""
    if window is None:
        return values.astype(np.float32, copy=False)
    low, high = window
    return np.clip((values.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def source_offsets(plan: list[tuple[int, int]]) -> list[int]:
    """The distinct slice offsets a plan reads, in order: the source slices of one input."""
    return sorted({offset for _, offset in plan})


def source_slices(z: int, offsets: list[int], num_slices: int) -> list[int]:
    """Axial indices at the offsets around slice z; beyond the first or last slice the edge slice repeats."""
    return [min(max(z + offset, 0), num_slices - 1) for offset in offsets]


def stack_channels(sources: np.ndarray, plan: list[tuple[int, int]], windows: list[WindowHU]) -> np.ndarray:
    """(S, H, W) source slices, one per `source_offsets(plan)`, -> (C, H, W) float32 input channels.

    Channel i is window w_i of the source slice at offset o_i. Training (after augmenting the raw
    source slices) and inference both build their inputs here, so the two cannot drift apart.
    """
    offsets = source_offsets(plan)
    return np.stack([apply_window(sources[offsets.index(offset)], windows[w]) for w, offset in plan], axis=0)


def make_channels(volume: np.ndarray, z: int, plan: list[tuple[int, int]], windows: list[WindowHU]) -> np.ndarray:
    """(H, W, D) volume -> (C, H, W) float32 input for axial slice z."""
    indices = source_slices(z, source_offsets(plan), volume.shape[-1])
    return stack_channels(np.moveaxis(volume[..., indices], -1, 0), plan, windows)
