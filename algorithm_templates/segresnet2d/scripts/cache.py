"""The slice cache: each training volume is read and reoriented once, then served slice by slice.

Volumes are stored slice-major (axial slice = one contiguous block) and shown to the rest of
the code as the usual (R, A, S) views, so building one sample reads a few contiguous blocks
instead of striding through the whole volume. The cache lives in memory, or in memory-mapped
.npy files for data that does not fit: DataLoader workers then share the pages the OS keeps.

The cache holds int16 HU, not windowed channels: windowing a sample costs a few per cent of
its augmentation (benchmarks/RESULTS.md) while three float windows would take 6x the memory
(9 float32 channels: 18x), and one cache then serves every input variant.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from bundle_contract import atomic_path
from volumes import Volume, case_name, describe_files, distill_target_path, load_volume, read_distill_target


def slice_major(array: np.ndarray) -> np.ndarray:
    """The same (H, W, D) array, stored so that array[..., z] is contiguous in memory."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(array, -1, 0)), 0, -1)


def cache_key(image_path: str | Path, label_path: str | Path | None, modality: str) -> str:
    """Case name + a digest of the source files' paths, sizes and modification times.

    An edited or replaced file gets a new key, so a stale cache entry is never read.
    """
    parts = [modality.lower()]
    for path in (image_path, label_path):
        if path is not None:
            parts += file_parts(path)
    return f"{case_name(image_path)}-{digest(parts)}"


def file_parts(path: str | Path) -> list[str]:
    stat = os.stat(path)
    return [str(Path(path).resolve()), str(stat.st_size), str(stat.st_mtime_ns)]


def digest(parts: list[str]) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def cached_volume(image_path: str | Path, label_path: str | Path | None, modality: str,
                  cache_dir: str | Path | None = None) -> Volume:
    """load_volume, kept in memory (cache_dir None) or memory-mapped from cache_dir.

    Files are written under a temporary name and renamed, so processes sharing the folder
    (several DDP ranks, or folds) never read a half-written entry.
    """
    if cache_dir is None:
        volume = load_volume(image_path, label_path, modality)
        label = None if volume.label is None else slice_major(volume.label)
        return Volume(volume.name, slice_major(volume.image), label, volume.affine, volume.source)
    folder = Path(cache_dir)
    key = cache_key(image_path, label_path, modality)
    names = {part: folder / f"{key}.{part}.npy" for part in ("image", "label", "affine")}
    if label_path is None:
        del names["label"]
    if not all(path.is_file() for path in names.values()):
        _write_entry(load_volume(image_path, label_path, modality), names)
    arrays = {part: np.load(path, mmap_mode="r") for part, path in names.items()}
    label = np.moveaxis(arrays["label"], 0, -1) if "label" in arrays else None
    return Volume(case_name(image_path), np.moveaxis(arrays["image"], 0, -1), label, np.array(arrays["affine"]),
                  describe_files(image_path, label_path))


def _write_entry(volume: Volume, names: dict[str, Path]) -> None:
    arrays = {"image": volume.image, "label": volume.label, "affine": volume.affine}
    names["image"].parent.mkdir(parents=True, exist_ok=True)
    for part, path in names.items():
        data = arrays[part] if part == "affine" else np.moveaxis(arrays[part], -1, 0)
        with atomic_path(path) as temporary, open(temporary, "wb") as f:
            np.save(f, np.ascontiguousarray(data))


def cached_distill_target(folder: str | Path, volume: Volume, cache_dir: str | Path | None = None) -> np.ndarray:
    """read_distill_target in the volume's slice-major layout, kept in memory (cache_dir None) or memory-mapped
    from cache_dir, keyed by the target file and the volume's grid."""
    path = distill_target_path(folder, volume.name)
    if cache_dir is None or not path.is_file():  # a missing file: read_distill_target says what to do
        return slice_major(read_distill_target(folder, volume))
    key = digest([*file_parts(path), volume.source, str(volume.label.shape), str(np.asarray(volume.affine).tolist())])
    entry = Path(cache_dir) / f"{volume.name}-{key}.distill.npy"
    if not entry.is_file():
        entry.parent.mkdir(parents=True, exist_ok=True)
        levels = np.moveaxis(read_distill_target(folder, volume), -1, 0)
        with atomic_path(entry) as temporary, open(temporary, "wb") as f:
            np.save(f, np.ascontiguousarray(levels))
    return np.moveaxis(np.load(entry, mmap_mode="r"), 0, -1)
