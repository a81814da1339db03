"""Each cross-validated bundle's foreground probabilities on its own validation fold, stored compactly.

Cross-validation already predicts every bundle's validation cases to score it; keeping those
maps lets the ensemble stage choose members and post-processing on out-of-fold predictions
without running any model again. A 512 x 512 x 32 map in float32 is 32 MiB, and 45 bundles x 100
cases would not fit in memory; stored as uint8 (1/255 steps, at most 0.002 off) and
zlib-compressed, mostly air and background, one case takes a few hundred KiB on disk, and a
reader loads one map at a time.

A stored result counts only while it is of the bundle's current model (is_current): a bundle trained
further after cross-validation has a newer model.pt, and its older maps and scores are computed again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg2d.atomic_files import atomic_path
from autoseg2d.templates import bundle_files

LEVELS = 255  # uint8 steps from probability 0 to 1
FOLDER = "cv_probabilities"

logger = logging.getLogger(__name__)


def is_current(bundle: Path, stored: Path) -> bool:
    """Whether `stored`, a result of the bundle's model (a map, cv_metrics.json), is there and at least as new
    as the bundle's model.pt, so it can be reused. An older one is of a model trained further since: it is
    logged and counts as missing, to be computed again. Without a model.pt its existence alone counts."""
    if not stored.is_file():
        return False
    model = bundle_files(bundle).model
    if not model.is_file() or stored.stat().st_mtime_ns >= model.stat().st_mtime_ns:
        return True
    logger.info(f"{stored} is older than {model} (trained further since), so it is computed again")
    return False


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
    return save_levels(foreground_file(bundle, case_id), quantize(1.0 - np.asarray(probabilities)[0]))


def save_levels(target: Path, levels: np.ndarray) -> Path:
    """A uint8 map (quantize) as `target` (.npz, array "foreground"), written then renamed."""
    with atomic_path(target) as temporary:
        with open(temporary, "wb") as stream:  # an open file: numpy would add .npz to the temporary name
            np.savez_compressed(stream, foreground=np.asarray(levels, dtype=np.uint8))
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
    """Whether the bundle holds a current map of the case (is_current)."""
    return is_current(bundle, foreground_file(bundle, case_id))


def check_grid(stored_shape: tuple, case_id: str, label: Path, label_shape: tuple) -> None:
    """Stored maps of a case must lie in its label's grid; ones of an older dataset do not."""
    if tuple(stored_shape) != tuple(label_shape):
        raise ValueError(f"case {case_id!r}: stored probabilities have shape {tuple(stored_shape)}, its label "
                         f"{label} {tuple(label_shape)}; delete the bundles' model/{FOLDER} folders to predict "
                         "them again")


def above_half(levels: np.ndarray) -> np.ndarray:
    """Where stored levels stand for a probability above 0.5: a member's lesion mask (argmax of [1 - p, p]).

    255 is odd, so no level is 0.5 itself; an exact tie (argmax: background) is stored as level 128 and
    counts as lesion here, one of the voxels within 1/510 of 0.5 that the rounding can move.
    """
    return 2 * np.asarray(levels).astype(np.int16) > LEVELS


def mean_foreground(bundles: Sequence[Path], case_id: str, vote: bool = False) -> np.ndarray:
    """The bundles' stored maps of one case averaged, as probabilities (float32, one map read at a time).

    vote: the fraction of bundles whose map is above 0.5, as the vote ensemble combines its members.
    The maps are rounded to 1/255 (what that changes downstream: ensemble.out_of_fold_cases).
    """
    total = None
    for bundle in bundles:
        levels = load_foreground(bundle, case_id)
        counted = np.where(above_half(levels), LEVELS, 0) if vote else levels.astype(np.int32)
        total = counted if total is None else total + counted
    return total.astype(np.float32) / (LEVELS * len(bundles))
