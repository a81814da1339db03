"""Each cross-validated bundle's foreground probabilities on its own validation fold, stored compactly.

Cross-validation already predicts every bundle's validation cases to score it; keeping those
maps lets the ensemble stage choose members on out-of-fold predictions without running any
model again. A 512 x 512 x 32 map in float32 is 32 MiB, and 45 bundles x 100 cases would not
fit in memory; stored as uint8 (1/255 steps, at most 0.002 off) and zlib-compressed, mostly air
and background, one case takes a few hundred KiB on disk, and a reader loads one map at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg2d.atomic_files import atomic_path
from autoseg2d.templates import bundle_files

LEVELS = 255  # uint8 steps from probability 0 to 1
FOLDER = "cv_probabilities"


def probabilities_folder(bundle: Path) -> Path:
    """Where a bundle keeps its validation cases' maps: beside its checkpoint and cv_metrics.json."""
    return bundle_files(bundle).ckpt_path / FOLDER


def foreground_file(bundle: Path, case_id: str) -> Path:
    return probabilities_folder(bundle) / f"{case_id}.npz"


def quantize(probability: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] as uint8 levels 0..255 (rounded to the nearest)."""
    return np.rint(np.clip(np.asarray(probability, dtype=np.float32), 0, 1) * LEVELS).astype(np.uint8)


def store_foreground(bundle: Path, case_id: str, probabilities: np.ndarray) -> Path:
    """Store 1 - P(background) of class probabilities (C, X, Y, Z): P(lesion) for binary output,
    "any hemorrhage" for several classes."""
    target = foreground_file(bundle, case_id)
    with atomic_path(target) as temporary:
        with open(temporary, "wb") as stream:  # an open file: numpy would add .npz to the temporary name
            np.savez_compressed(stream, foreground=quantize(1.0 - np.asarray(probabilities)[0]))
    return target


def load_foreground(bundle: Path, case_id: str) -> np.ndarray:
    """The stored uint8 map (levels of 1/255) of one validation case."""
    path = foreground_file(bundle, case_id)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stored validation probabilities of case {case_id!r} for this bundle; "
                                "a bundle holds only its own validation fold's cases")
    with np.load(path) as stored:
        return stored["foreground"]


def has_foreground(bundle: Path, case_id: str) -> bool:
    return foreground_file(bundle, case_id).is_file()
