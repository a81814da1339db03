"""Post-processing of a hemorrhage probability map, kept only where cross-validation shows it helps.

Two candidate steps, applied in this order:

- ``remove_small_components``: drop connected components smaller than a volume in mL
  (specks of noise cost Dice and, far from the lesion, blow up HD).
- ``keep_nonempty``: if nothing passes the threshold, keep the most probable connected
  component of ``prob > floor``. An empty prediction makes HD inf, and one inf case makes
  the challenge's mean HD inf.

Cleaning comes first so the rescue can also catch a mask that cleaning emptied. The choice
is a plain dict (JSON-serializable) stored with the ensemble and replayed by
:func:`apply_postprocessing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg2d.evaluation.metrics import MM3_PER_ML, dice_score, validate_mask, validate_spacing

PROBABILITY_THRESHOLD = 0.5
MIN_VOLUME_ML_CANDIDATES = (0.01, 0.05, 0.1, 0.5)
FLOOR_CANDIDATES = (0.1, 0.2, 0.3)
DICE_TOLERANCE = 1e-4
SELECTION_RULE = (
    "Steps are tried in order (remove_small_components, then keep_nonempty), each over its parameter grid, "
    "on top of the steps already kept. A parameter value qualifies when, over all cross-validation cases, "
    "the number of inf-HD cases does not rise and either mean Dice rises by more than 1e-4, or the number "
    "of inf-HD cases falls and mean Dice drops by at most 1e-4. The qualifying value with the highest mean "
    "Dice (then fewest inf-HD cases, then first in the grid) is kept; if none qualifies the step is left out."
)


def binarize(prob: np.ndarray, threshold: float = PROBABILITY_THRESHOLD) -> np.ndarray:
    """``prob > threshold``: the same voxels as argmax over (background, lesion) probabilities."""
    return np.asarray(prob) > threshold


def remove_small_components(mask: np.ndarray, spacing_mm: Sequence[float], min_volume_ml: float) -> np.ndarray:
    """Keep only connected components (face, edge or corner neighbours) of at least `min_volume_ml`."""
    labels, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if count == 0:
        return mask.astype(bool)
    voxel_ml = float(np.prod(spacing_mm)) / MM3_PER_ML
    volumes_ml = np.bincount(labels.ravel()) * voxel_ml
    keep = volumes_ml >= min_volume_ml
    keep[0] = False
    return keep[labels]


def keep_nonempty(mask: np.ndarray, prob: np.ndarray, floor: float) -> np.ndarray:
    """An empty `mask` becomes the connected component of ``prob > floor`` with the highest probability.

    A non-empty mask is returned unchanged; with nothing above the floor the mask stays empty.
    """
    if mask.any():
        return mask.astype(bool)
    above = np.asarray(prob) > floor
    labels, count = ndimage.label(above, structure=ndimage.generate_binary_structure(above.ndim, above.ndim))
    if count == 0:
        return above
    peaks = ndimage.maximum(prob, labels, index=np.arange(1, count + 1))
    return labels == int(np.argmax(peaks)) + 1


def _remove_small_step(mask, prob, spacing_mm, min_volume_ml):
    return remove_small_components(mask, spacing_mm, min_volume_ml)


def _keep_nonempty_step(mask, prob, spacing_mm, floor):
    return keep_nonempty(mask, prob, floor)


POSTPROCESSING_STEPS = {
    "remove_small_components": _remove_small_step,
    "keep_nonempty": _keep_nonempty_step,
}


def apply_postprocessing(prob: np.ndarray, spacing_mm: Sequence[float], choice: dict) -> np.ndarray:
    """Threshold `prob` and apply the steps in `choice` (from :func:`choose_postprocessing`); returns uint8 {0,1}."""
    if "threshold" not in choice or "steps" not in choice:
        raise ValueError(
            f"post-processing choice needs keys 'threshold' and 'steps', got {sorted(choice)}; "
            "pass the dict returned by choose_postprocessing."
        )
    mask = binarize(prob, choice["threshold"])
    for step in choice["steps"]:
        mask = _run_step(step, mask, prob, spacing_mm)
    return mask.astype(np.uint8)


def choose_postprocessing(
    cases: Sequence[dict],
    min_volume_ml_candidates: Sequence[float] = MIN_VOLUME_ML_CANDIDATES,
    floor_candidates: Sequence[float] = FLOOR_CANDIDATES,
) -> dict:
    """Pick post-processing steps on cross-validation cases by the rule in :data:`SELECTION_RULE`.

    Each case is a dict with ``prob`` (lesion probability map), ``truth`` ({0,1} mask) and
    ``spacing_mm``, in the truth's voxel grid. Only mean Dice and the number of inf-HD cases
    (HD is inf exactly when the prediction or the truth is empty) are needed, so no surface
    distances are computed. Returns ``threshold``, ``steps`` (what
    :func:`apply_postprocessing` replays), ``rule``, ``baseline``, ``selected`` and every
    ``evaluated`` trial, all JSON-serializable.
    """
    probs, truths, spacings = _unpack_cases(cases)
    masks = [binarize(prob) for prob in probs]
    current = _score(masks, truths)
    baseline, steps, evaluated = current, [], []
    grids = {
        "remove_small_components": [{"min_volume_ml": float(v)} for v in min_volume_ml_candidates],
        "keep_nonempty": [{"floor": float(v)} for v in floor_candidates],
    }
    for name, grid in grids.items():
        best = None
        for params in grid:
            step = {"name": name, **params}
            trial_masks = [_run_step(step, m, p, s) for m, p, s in zip(masks, probs, spacings)]
            score = _score(trial_masks, truths)
            qualifies = _qualifies(score, current)
            evaluated.append({**step, **score, "qualifies": qualifies})
            if qualifies and (best is None or _rank(score) > _rank(best[1])):
                best = (step, score, trial_masks)
        if best is not None:
            steps.append(best[0])
            current, masks = best[1], best[2]
    return {
        "threshold": PROBABILITY_THRESHOLD,
        "steps": steps,
        "rule": SELECTION_RULE,
        "baseline": baseline,
        "selected": current,
        "evaluated": evaluated,
    }


def _qualifies(score: dict, current: dict) -> bool:
    if score["num_hd_inf"] > current["num_hd_inf"]:
        return False
    dice_gain = score["dice_mean"] - current["dice_mean"]
    fewer_inf = score["num_hd_inf"] < current["num_hd_inf"]
    return dice_gain > DICE_TOLERANCE or (fewer_inf and dice_gain >= -DICE_TOLERANCE)


def _rank(score: dict) -> tuple[float, int]:
    return score["dice_mean"], -score["num_hd_inf"]


def _score(masks: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict:
    return {
        "dice_mean": float(np.mean([dice_score(m, t) for m, t in zip(masks, truths)])),
        "num_hd_inf": int(sum(not m.any() or not t.any() for m, t in zip(masks, truths))),
        "num_cases": len(masks),
    }


def _run_step(step: dict, mask: np.ndarray, prob: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    name = step.get("name")
    if name not in POSTPROCESSING_STEPS:
        raise ValueError(f"unknown post-processing step {name!r}; known steps: {sorted(POSTPROCESSING_STEPS)}.")
    params = {key: value for key, value in step.items() if key != "name"}
    try:
        return POSTPROCESSING_STEPS[name](mask, prob, spacing_mm, **params)
    except TypeError as error:
        raise ValueError(f"post-processing step {name!r} got parameters {params}: {error}") from error


def _unpack_cases(cases: Sequence[dict]) -> tuple[list, list, list]:
    if not cases:
        raise ValueError("choose_postprocessing got no cases; pass the cross-validation cases.")
    probs, truths, spacings = [], [], []
    for index, case in enumerate(cases):
        case_id = str(case.get("case_id", index))
        missing = {"prob", "truth", "spacing_mm"} - case.keys()
        if missing:
            raise ValueError(f"case {case_id!r} lacks keys {sorted(missing)}; each case needs prob, truth, spacing_mm.")
        prob = np.asarray(case["prob"])
        if prob.shape != np.shape(case["truth"]):
            raise ValueError(
                f"case {case_id!r}: probability shape {prob.shape} differs from truth shape {np.shape(case['truth'])}."
            )
        probs.append(prob)
        truths.append(validate_mask(case["truth"], case_id, "truth"))
        spacings.append(validate_spacing(case["spacing_mm"], prob.ndim, case_id))
    return probs, truths, spacings
