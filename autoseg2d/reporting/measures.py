"""What a reader measures on a hemorrhage mask: volume, separate bleeds, the ABC/2 estimate, contact with bone or edge.

Arrays are (x, y, z) in RAS order, axial slices last and counted from the feet up, as
:func:`autoseg2d.evaluation.qa.read_ras` gives them; spacing is (x, y, z) in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from autoseg2d.evaluation.metrics import MM3_PER_ML

# Kothari et al. (Stroke 1996): a slice counts fully when its bleed area is at least 75 % of the
# largest slice's, half when 25-75 %, not at all below 25 %.
ABC_FULL_SLICE_FRACTION = 0.75
ABC_HALF_SLICE_FRACTION = 0.25
# Cortical bone is well above 300 HU and fresh blood below 100 HU, so a bleed voxel next to a voxel
# of at least this value lies against the skull (or a calcification).
BONE_HU = 300


def label_bleeds(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected bleeds, with face, edge and corner neighbours joined (as the post-processing counts them)."""
    mask = np.asarray(mask) > 0
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))


def bleed_measures(mask: np.ndarray, spacing_mm: Sequence[float]) -> dict:
    """Volume, number of bleeds and the largest bleed's volume, axial slice range and ABC/2 estimate."""
    voxel_ml = float(np.prod(spacing_mm)) / MM3_PER_ML
    labels, count = label_bleeds(mask)
    result = {"volume_ml": float(np.count_nonzero(labels)) * voxel_ml, "num_bleeds": int(count),
              "largest_bleed_ml": 0.0, "largest_bleed_first_slice": None, "largest_bleed_last_slice": None,
              "abc2_ml": 0.0, "abc_a_mm": 0.0, "abc_b_mm": 0.0, "abc_c_mm": 0.0}
    if count == 0:
        return result
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    slices = np.flatnonzero(largest.any(axis=(0, 1)))
    result.update(largest_bleed_ml=float(sizes.max()) * voxel_ml, largest_bleed_first_slice=int(slices[0]),
                  largest_bleed_last_slice=int(slices[-1]), **abc2(largest, spacing_mm))
    return result


def abc2(bleed: np.ndarray, spacing_mm: Sequence[float]) -> dict:
    """The bedside ABC/2 volume of one bleed, with A, B and C in mm (Kothari et al., Stroke 1996).

    A is the longest diameter on the slice of largest area and B the longest diameter at right
    angles to A on that slice; C is the slice thickness times the slices counted 1, 0.5 or 0 by
    their area relative to that slice. Clinicians compare it with the segmented volume: ABC/2
    assumes an ellipsoid and overestimates irregular bleeds.
    """
    areas = np.count_nonzero(bleed, axis=(0, 1))
    if not areas.any():
        return {"abc2_ml": 0.0, "abc_a_mm": 0.0, "abc_b_mm": 0.0, "abc_c_mm": 0.0}
    a_mm, b_mm = diameters_mm(bleed[..., int(np.argmax(areas))], spacing_mm[:2])
    ratios = areas / areas.max()
    counted = np.where(ratios >= ABC_FULL_SLICE_FRACTION, 1.0, np.where(ratios >= ABC_HALF_SLICE_FRACTION, 0.5, 0.0))
    c_mm = float(counted.sum()) * float(spacing_mm[2])
    return {"abc2_ml": a_mm * b_mm * c_mm / 2 / MM3_PER_ML, "abc_a_mm": a_mm, "abc_b_mm": b_mm, "abc_c_mm": c_mm}


def diameters_mm(region: np.ndarray, spacing_xy: Sequence[float]) -> tuple[float, float]:
    """(A, B): the longest diameter of a 2D region and the longest one at right angles to it, in mm.

    Distances are between pixel centres plus one pixel's width in that direction, so a single
    pixel measures one pixel by one pixel and a digitised disc its true diameter.
    """
    points = np.argwhere(region).astype(float) * np.asarray(spacing_xy, dtype=float)
    hull = _hull_points(points)
    gaps = hull[:, None, :] - hull[None, :, :]
    lengths = np.linalg.norm(gaps, axis=-1)
    i, j = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
    along = gaps[i, j] / lengths[i, j] if lengths[i, j] > 0 else np.array([1.0, 0.0])
    across = np.array([-along[1], along[0]])
    spread = points @ across
    return (float(lengths[i, j]) + _pixel_width(along, spacing_xy),
            float(spread.max() - spread.min()) + _pixel_width(across, spacing_xy))


def _hull_points(points: np.ndarray) -> np.ndarray:
    """The convex hull's corners (the longest chord ends on two of them); all points when they are collinear."""
    try:
        return points[ConvexHull(points).vertices]
    except (QhullError, ValueError):
        return points


def _pixel_width(direction: np.ndarray, spacing_xy: Sequence[float]) -> float:
    return abs(float(direction[0])) * float(spacing_xy[0]) + abs(float(direction[1])) * float(spacing_xy[1])


def touches_scan_edge(mask: np.ndarray) -> bool:
    """True when the mask reaches the first or last row, column or slice: the bleed may go on outside the scan."""
    mask = np.asarray(mask) > 0
    return any(np.take(mask, index, axis=axis).any() for axis in range(mask.ndim) for index in (0, -1))


def touches_skull(mask: np.ndarray, image_hu: np.ndarray, bone_hu: float = BONE_HU) -> bool:
    """True when a mask voxel has an in-plane neighbour of bone density (an extra-axial bleed, or a leak into bone)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return False
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return bool((ndimage.binary_dilation(mask, structure=in_plane) & (np.asarray(image_hu) >= bone_hu)).any())
