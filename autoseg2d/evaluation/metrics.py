"""Per-case segmentation metrics defined as the INSTANCE 2022 organizers define them, and their mean over cases.

Checked against the organizers' values in ``instance22_metric_vectors.{npz,json}`` (see
``tests/evaluation/test_metrics.py``). Where the organizers' code raises (RVD with an empty
truth) a general tool reports NaN with a note and carries on.

Surfaces are DeepMind's "surfels": points of the voxel-corner lattice whose 2x2x2
neighbourhood is partly inside the mask, weighted by area. MONAI builds these with
``use_subvoxels=True``:

- NSD: ``monai.metrics.compute_surface_dice(..., use_subvoxels=True)``.
- HD: MONAI's ``compute_hausdorff_distance`` has no subvoxel option; it measures between
  centres of boundary voxels and overestimates irregular shapes by up to ~0.6 mm. The
  organizers' HD is the largest surfel distance in either direction, so it is taken as the
  maximum of both distance arrays from ``monai.metrics.utils.get_edge_surface_distance(
  ..., use_subvoxels=True, symmetric=True)`` (the helper behind MONAI's own surface metrics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from monai.metrics.utils import get_edge_surface_distance

NSD_TOLERANCE_MM = 0.42
DICE_SMOOTHING = 1e-5
MM3_PER_ML = 1000.0
RVD_UNDEFINED_NOTE = "truth is empty: RVD is undefined (NaN); the organizers' code raises here"


def validate_mask(mask: np.ndarray, case_id: str, role: str) -> np.ndarray:
    """Return `mask` as bool, refusing anything but exactly {0, 1}.

    The organizers cast to uint8 and count nonzero voxels, so a 0/255 mask or a probability
    map would be scored silently wrong; better to stop and say which file is at fault.
    """
    array = np.asanyarray(mask)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"case {case_id!r}: {role} mask has dtype {array.dtype}; expected a numeric {{0, 1}} mask.")
    values = np.unique(array)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise ValueError(
            f"case {case_id!r}: {role} mask must contain only 0 and 1, found values [{shown}]. "
            "Binarize it first (e.g. mask = (array > 0).astype(np.uint8), or threshold probabilities)."
        )
    return array.astype(bool)


def validate_spacing(spacing_mm: Sequence[float], ndim: int, case_id: str) -> tuple[float, ...]:
    """Spacing as plain floats, one positive finite value per array axis."""
    values = tuple(float(s) for s in spacing_mm)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f"case {case_id!r}: spacing_mm {values} must give {ndim} positive finite values, one per array axis "
            "(read it from the label header: nibabel's img.header.get_zooms())."
        )
    return values


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Organizers' Dice: the 1e-5 smoothing makes two empty masks 1.0 and an empty prediction ~1e-7, never 0."""
    intersection = np.count_nonzero(pred & truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return (2.0 * intersection + DICE_SMOOTHING) / (total + DICE_SMOOTHING)


def relative_volume_difference(pred: np.ndarray, truth: np.ndarray) -> float:
    """|(|P| - |G|) / |G|| on voxel counts; NaN when the truth is empty (undefined, not an error)."""
    true_count = np.count_nonzero(truth)
    if true_count == 0:
        return math.nan
    return abs((np.count_nonzero(pred) - true_count) / true_count)


def normalized_surface_dice(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float = NSD_TOLERANCE_MM
) -> float:
    """Surfel-area weighted surface Dice (distance <= tolerance counts); 0 if one mask is empty, NaN if both."""
    pred_empty, truth_empty = not pred.any(), not truth.any()
    if pred_empty and truth_empty:
        return math.nan
    if pred_empty or truth_empty:
        return 0.0
    nsd = compute_surface_dice(
        _as_batch(pred), _as_batch(truth), [tolerance_mm], include_background=True,
        spacing=list(spacing_mm), use_subvoxels=True,
    )
    return float(nsd.item())


def hausdorff_distance_mm(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Full (100th percentile) symmetric Hausdorff distance between surfels in mm; inf if either mask is empty."""
    if not pred.any() or not truth.any():
        return math.inf
    _, distances, _ = get_edge_surface_distance(
        _as_tensor(pred), _as_tensor(truth), spacing=list(spacing_mm), use_subvoxels=True, symmetric=True
    )
    return float(max(d.max().item() for d in distances))


def volume_ml(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Mask volume in millilitres: the clinically reported quantity for hemorrhage."""
    return np.count_nonzero(mask) * float(np.prod(spacing_mm)) / MM3_PER_ML


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_mm: Sequence[float],
    case_id: str = "case",
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict:
    """All per-case metrics for one {0,1} prediction against its {0,1} truth.

    Keys: dice, rvd, nsd, hd_mm, pred_volume_ml, true_volume_ml, note (why a value is NaN, or "").
    Only array shapes are compared, as the organizers do; the geometry is the truth's.
    """
    pred_shape, truth_shape = np.shape(pred), np.shape(truth)
    if pred_shape != truth_shape:
        raise ValueError(
            f"case {case_id!r}: prediction shape {pred_shape} differs from truth shape {truth_shape}; "
            "predictions must be written in the original voxel grid of the image."
        )
    pred_mask = validate_mask(pred, case_id, "prediction")
    truth_mask = validate_mask(truth, case_id, "truth")
    spacing = validate_spacing(spacing_mm, truth_mask.ndim, case_id)
    rvd = relative_volume_difference(pred_mask, truth_mask)
    return {
        "dice": float(dice_score(pred_mask, truth_mask)),
        "rvd": float(rvd),
        "nsd": normalized_surface_dice(pred_mask, truth_mask, spacing, nsd_tolerance_mm),
        "hd_mm": hausdorff_distance_mm(pred_mask, truth_mask, spacing),
        "pred_volume_ml": float(volume_ml(pred_mask, spacing)),
        "true_volume_ml": float(volume_ml(truth_mask, spacing)),
        "note": RVD_UNDEFINED_NOTE if math.isnan(rvd) else "",
    }


def summarize_metrics(per_case: Sequence[dict]) -> dict:
    """Mean of each metric over cases, as the challenge ranks them.

    HD uses a plain mean, so a single inf case makes it inf (as on the leaderboard);
    ``hd_mm_mean_finite`` shows the rest. RVD and NSD average the cases where they are
    defined; the counts of undefined and infinite cases are reported beside the means.
    """
    if not per_case:
        raise ValueError("summarize_metrics got no cases; pass at least one per-case metrics dict.")
    hd = np.array([c["hd_mm"] for c in per_case], dtype=float)
    rvd = np.array([c["rvd"] for c in per_case], dtype=float)
    nsd = np.array([c["nsd"] for c in per_case], dtype=float)
    return {
        "num_cases": len(per_case),
        "dice_mean": float(np.mean([c["dice"] for c in per_case])),
        "rvd_mean": _mean_where_defined(rvd),
        "nsd_mean": _mean_where_defined(nsd),
        "hd_mm_mean": float(np.mean(hd)),
        "hd_mm_mean_finite": _mean_where_defined(np.where(np.isinf(hd), np.nan, hd)),
        "num_hd_inf": int(np.isinf(hd).sum()),
        "num_rvd_nan": int(np.isnan(rvd).sum()),
        "num_nsd_nan": int(np.isnan(nsd).sum()),
    }


def _mean_where_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def _as_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask))


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask[None, None], dtype=np.float32))


def default_class_names(num_classes: int) -> list[str]:
    """Names for label ids 1..N when the datalist names none."""
    return [f"class_{i}" for i in range(1, num_classes + 1)]


def validate_class_ids(labels: np.ndarray, num_classes: int, case_id: str, role: str) -> np.ndarray:
    """Return `labels` as integers, refusing anything but class ids 0..num_classes."""
    array = np.asanyarray(labels)
    values = np.unique(array)
    if not np.issubdtype(array.dtype, np.number) or not np.isin(values, np.arange(num_classes + 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise ValueError(
            f"case {case_id!r}: {role} holds values [{shown}], not class ids 0..{num_classes}; write one class id "
            "per voxel (argmax of the probabilities), or give the names of all classes (class_names)."
        )
    return array.astype(np.int64)


def class_case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_mm: Sequence[float],
    class_names: Sequence[str],
    case_id: str = "case",
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict:
    """Metrics of a label map with classes 1..N: the case_metrics of the foreground (any class, as the
    challenge merges hemorrhage subtypes) and, under "classes", those of each class by name.

    A class that neither the prediction nor the truth holds is None: there is nothing to score, and
    counting it as Dice 1 would flatter every rare subtype.
    """
    pred_ids = validate_class_ids(pred, len(class_names), case_id, "prediction")
    truth_ids = validate_class_ids(truth, len(class_names), case_id, "truth")
    metrics = case_metrics(pred_ids > 0, truth_ids > 0, spacing_mm, case_id, nsd_tolerance_mm)
    metrics["classes"] = {
        name: case_metrics(pred_ids == i, truth_ids == i, spacing_mm, f"{case_id} {name}", nsd_tolerance_mm)
        if (pred_ids == i).any() or (truth_ids == i).any() else None
        for i, name in enumerate(class_names, 1)
    }
    return metrics


CLASS_MEAN = "mean over classes"
CLASS_SUMMARY_KEYS = ("dice_mean", "rvd_mean", "nsd_mean", "hd_mm_mean", "true_volume_ml_mean",
                      "pred_volume_ml_mean")


def summarize_classes(per_case: Sequence[dict]) -> dict:
    """summarize_metrics per class over the cases that hold it, plus volumes in mL and the mean over classes.

    {} for binary results (no "classes" in the cases); a class no case holds is None.
    """
    names = list(next((c["classes"] for c in per_case if c.get("classes")), {}))
    summaries: dict = {}
    for name in names:
        rows = [c["classes"][name] for c in per_case if c.get("classes", {}).get(name) is not None]
        summaries[name] = None if not rows else {
            **summarize_metrics(rows),
            "true_volume_ml_mean": float(np.mean([r["true_volume_ml"] for r in rows])),
            "pred_volume_ml_mean": float(np.mean([r["pred_volume_ml"] for r in rows])),
        }
    scored = [s for s in summaries.values() if s is not None]
    if scored:
        summaries[CLASS_MEAN] = {key: _mean_where_defined(np.array([s[key] for s in scored], dtype=float))
                                 for key in CLASS_SUMMARY_KEYS}
        summaries[CLASS_MEAN]["num_hd_inf"] = int(sum(s["num_hd_inf"] for s in scored))
    return summaries
