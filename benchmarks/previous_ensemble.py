"""The ensemble's last mile as it was before the fold-balanced rework, kept only so benchmarks can compare.

Members: the global top N by validation Dice (scores of different folds compared as if
they were one scale). Post-processing: a step was kept only when it raised mean Dice or
lowered the number of inf-HD cases on the out-of-fold cases; so the never-empty rescue was
dropped whenever no out-of-fold prediction happened to be empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg2d.evaluation.metrics import dice_score
from autoseg2d.evaluation.postprocess import PROBABILITY_THRESHOLD, binarize, keep_nonempty, remove_small_components
from autoseg2d.pipeline.ensemble import select_members

MIN_VOLUME_ML_CANDIDATES = (0.01, 0.05, 0.1, 0.5)
FLOOR_CANDIDATES = (0.1, 0.2, 0.3)
DICE_TOLERANCE = 1e-4


def previous_members(records: list[dict], size: int) -> list[dict]:
    return select_members(records, size, "global_top")


def previous_postprocessing(cases: Sequence[dict]) -> dict:
    """The old greedy rule on mean Dice and the inf-HD count; returns a choice apply_postprocessing replays."""
    probs = [np.asarray(c["prob"]) for c in cases]
    truths = [np.asarray(c["truth"]).astype(bool) for c in cases]
    spacings = [tuple(c["spacing_mm"]) for c in cases]
    masks = [binarize(p) for p in probs]
    current, steps = _score(masks, truths), []
    grids = {"remove_small_components": [{"min_volume_ml": v} for v in MIN_VOLUME_ML_CANDIDATES],
             "keep_nonempty": [{"floor": v} for v in FLOOR_CANDIDATES]}
    for name, grid in grids.items():
        best = None
        for params in grid:
            trial = [_step(name, params, m, p, s) for m, p, s in zip(masks, probs, spacings)]
            score = _score(trial, truths)
            if _qualifies(score, current) and (best is None or _rank(score) > _rank(best[1])):
                best = ({"name": name, **params}, score, trial)
        if best is not None:
            steps.append(best[0])
            current, masks = best[1], best[2]
    return {"threshold": PROBABILITY_THRESHOLD, "steps": steps}


def _step(name: str, params: dict, mask, prob, spacing):
    if name == "remove_small_components":
        return remove_small_components(mask, spacing, params["min_volume_ml"])
    return keep_nonempty(mask, prob, params["floor"])


def _qualifies(score: dict, current: dict) -> bool:
    if score["num_hd_inf"] > current["num_hd_inf"]:
        return False
    gain = score["dice_mean"] - current["dice_mean"]
    return gain > DICE_TOLERANCE or (score["num_hd_inf"] < current["num_hd_inf"] and gain >= -DICE_TOLERANCE)


def _rank(score: dict) -> tuple:
    return score["dice_mean"], -score["num_hd_inf"]


def _score(masks, truths) -> dict:
    return {"dice_mean": float(np.mean([dice_score(m, t) for m, t in zip(masks, truths)])),
            "num_hd_inf": int(sum(not m.any() or not t.any() for m, t in zip(masks, truths)))}
