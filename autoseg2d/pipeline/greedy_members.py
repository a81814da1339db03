"""Greedy forward selection of ensemble members on out-of-fold predictions (Caruana et al., ICML 2004), per fold.

A bundle of fold k trained without fold k's cases, so only fold k's bundles may predict them
out of fold: each fold runs its own selection over its own bundles, on its own validation
cases. Starting empty, a fold repeatedly adds the bundle whose addition gives the highest mean
Dice of the averaged probabilities over the fold's cases. Bundles are added without
replacement: a repeat would only be a weight, yet it costs a whole member at prediction time
(the reason to select is fewer members), and weights fitted on ~20 cases per fold overfit.

Memory: the ensemble's mask can be foreground only where some member exceeds 0.5, so each case
keeps just those voxels (the "support") of every candidate, plus its truth; a lesion-sized set,
not the 512 x 512 x 32 maps. The maps come from cross-validation (fold_probabilities), in 1/255
steps, read one case at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg2d.datalist import case_name
from autoseg2d.evaluation.metrics import DICE_SMOOTHING, case_metrics, summarize_metrics
from autoseg2d.run.fold_probabilities import (LEVELS, above_half, check_grid, has_foreground, load_foreground,
                                              store_foreground)
from autoseg2d.run.inference import load_inferer, read_mask

DICE_TIE = 1e-9  # Dice differences below this are ties: the smaller ensemble wins


@dataclass(frozen=True)
class FoldCase:
    """One validation case, reduced to the voxels where some candidate of its fold says lesion."""

    case_id: str
    shape: tuple
    spacing_mm: tuple
    support: np.ndarray  # flat indices of those voxels
    values: np.ndarray  # (candidates, support) uint8 levels; each row a candidate's map there
    truth_at_support: np.ndarray  # bool, per support voxel
    truth_indices: np.ndarray  # flat indices of every lesion voxel (Dice needs the count, HD the shape)

    def predicted(self, members: Sequence[int]) -> np.ndarray:
        """Support voxels where the members' mean exceeds 0.5 (the ensemble's lesion, as argmax of the mean)."""
        total = self.values[list(members)].sum(0, dtype=np.int64)
        return 2 * total > LEVELS * len(members)

    def dice(self, members: Sequence[int]) -> float:
        predicted = self.predicted(members)
        overlap = np.count_nonzero(predicted & self.truth_at_support)
        return (2.0 * overlap + DICE_SMOOTHING) / (np.count_nonzero(predicted) + self.truth_indices.size
                                                   + DICE_SMOOTHING)

    def metrics(self, members: Sequence[int]) -> dict:
        """The four challenge metrics of the members' mean mask, computed on a box around it and the truth
        (a voxel of margin, clipped at the scan's edge, so surfaces and distances are those of the whole scan)."""
        predicted = self.support[self.predicted(members)]
        both = np.concatenate([predicted, self.truth_indices])
        if both.size == 0:
            return case_metrics(np.zeros((1,) * len(self.shape), np.uint8), np.zeros((1,) * len(self.shape), np.uint8),
                                self.spacing_mm, case_id=self.case_id)
        coordinates = np.unravel_index(both, self.shape)
        low = [max(int(c.min()) - 1, 0) for c in coordinates]
        high = [min(int(c.max()) + 2, size) for c, size in zip(coordinates, self.shape)]
        box = tuple(h - lo for lo, h in zip(low, high))
        masks = []
        for indices in (predicted, self.truth_indices):
            mask = np.zeros(box, np.uint8)
            local = tuple(c - lo for c, lo in zip(np.unravel_index(indices, self.shape), low))
            mask[local] = 1
            masks.append(mask)
        return case_metrics(masks[0], masks[1], self.spacing_mm, case_id=self.case_id)


def ensure_stored(bundle: Path, cases: list[dict]) -> None:
    """Predict and store the validation maps a bundle lacks (bundles cross-validated before maps were kept)."""
    missing = [case for case in cases if not has_foreground(bundle, case_name(case["image"]))]
    if missing:
        inferer = load_inferer(bundle)
        for case in missing:
            store_foreground(bundle, case_name(case["image"]), inferer.infer(str(case["image"])).numpy())


def load_fold(bundles: Sequence[Path], cases: list[dict], vote: bool = False) -> list[FoldCase]:
    """Each validation case of a fold with every candidate bundle's map on the case's support.

    vote: members count as their mask (p > 0.5), as the vote ensemble combines them.
    """
    fold_cases = []
    for case in cases:
        case_id = case_name(case["image"])
        truth, spacing = read_mask(case["label"])
        maps = np.stack([load_foreground(bundle, case_id) for bundle in bundles])
        check_grid(maps.shape[1:], case_id, case["label"], truth.shape)
        if vote:
            maps = np.where(above_half(maps), LEVELS, 0).astype(np.uint8)
        support = np.flatnonzero(above_half(maps.max(0)))
        truth = truth.ravel().astype(bool)
        fold_cases.append(FoldCase(case_id, tuple(maps.shape[1:]), spacing, support,
                                   maps.reshape(len(bundles), -1)[:, support], truth[support], np.flatnonzero(truth)))
    return fold_cases


def mean_dice(fold_cases: Sequence[FoldCase], members: Sequence[int]) -> float:
    return float(np.mean([case.dice(members) for case in fold_cases]))


def greedy_order(fold_cases: Sequence[FoldCase], num_candidates: int) -> tuple[list[int], list[float]]:
    """Every candidate in the order greedy forward selection adds them, and the fold's mean Dice after each.

    Candidates come best validation score first, so among equal gains the better-scored is added.
    """
    chosen, path, remaining = [], [], list(range(num_candidates))
    while remaining:
        scores = [mean_dice(fold_cases, chosen + [c]) for c in remaining]
        best = next(i for i, score in enumerate(scores) if score >= max(scores) - DICE_TIE)
        chosen.append(remaining.pop(best))
        path.append(scores[best])
    return chosen, path


def overall_dice(paths: dict, counts: dict[int, int], per_fold: dict) -> float:
    """Mean Dice over all out-of-fold cases when each fold keeps its first per_fold[fold] members."""
    total = sum(counts.values())
    return sum(paths[f][min(per_fold[f], len(paths[f])) - 1] * counts[f] for f in paths) / total


def members_per_fold(paths: dict, counts: dict[int, int], size: int, tolerance: float | None) -> dict:
    """How many greedy members each fold keeps.

    With a tolerance: the smallest equal count per fold whose out-of-fold Dice is within
    `tolerance` of the best count's, at most size // k per fold. Without: `size` members, size // k
    per fold (at least one) and the remaining places, one at a time, to the fold whose next member
    raises its own mean Dice most (a fold out of candidates gives its places to the others).
    """
    folds = sorted(paths)
    most = max(1, min(size // len(folds), max(len(p) for p in paths.values())))
    if tolerance is not None:
        curve = [overall_dice(paths, counts, dict.fromkeys(folds, m)) for m in range(1, most + 1)]
        best = max(curve)
        m = next(m for m, dice in enumerate(curve, 1) if dice >= best - tolerance - DICE_TIE)
        return {f: min(m, len(paths[f])) for f in folds}
    per_fold = {f: min(most, len(paths[f])) for f in folds}
    size = min(max(size, len(folds)), sum(len(p) for p in paths.values()))
    while sum(per_fold.values()) < size:
        open_folds = [f for f in folds if per_fold[f] < len(paths[f])]
        gain = {f: paths[f][per_fold[f]] - paths[f][per_fold[f] - 1] for f in open_folds}
        per_fold[max(open_folds, key=lambda f: (gain[f], -folds.index(f)))] += 1
    return per_fold


def curve_rows(folds: dict, orders: dict[int, list[int]], score_orders: dict[int, list[int]]) -> list[dict]:
    """Out-of-fold metrics (before post-processing) with m members per fold, m = 1, 2, ...: the greedy
    members (Dice, RVD, NSD, HD, inf count), and for comparison the mean Dice of each fold's m best
    validation scores (what fold_balanced takes)."""
    rows, cache = [], {}
    for m in range(1, max(len(order) for order in orders.values()) + 1):
        per_case, by_score = [], []
        for fold, fold_cases in folds.items():
            members = orders[fold][:m]
            for index, case in enumerate(fold_cases):
                key = (fold, index, hashlib.sha1(np.packbits(case.predicted(members))).hexdigest())
                if key not in cache:
                    cache[key] = case.metrics(members)
                per_case.append(cache[key])
                by_score.append(case.dice(score_orders[fold][:m]))
        summary = summarize_metrics(per_case)
        rows.append({"members_per_fold": m, "members": sum(min(m, len(o)) for o in orders.values()),
                     "dice": summary["dice_mean"], "dice_by_score": float(np.mean(by_score)),
                     **{key: summary[key] for key in ("rvd_mean", "nsd_mean", "hd_mm_mean", "hd_mm_mean_finite",
                                                      "num_hd_inf")}})
    return rows


def curve_markdown(rows: list[dict], chosen_per_fold: dict) -> str:
    """The members-vs-accuracy table; the chosen row is marked when every fold keeps the same count."""
    lines = ["| members per fold | members | Dice (greedy) | Dice (best validation scores) | RVD | NSD | HD mm | "
             "HD mm (finite) | HD inf |", "|---|---|---|---|---|---|---|---|---|"]
    counts = set(chosen_per_fold.values())
    chosen = counts.pop() if len(counts) == 1 else None
    for row in rows:
        mark = " (chosen)" if row["members_per_fold"] == chosen else ""
        values = [row[key] for key in ("dice", "dice_by_score", "rvd_mean", "nsd_mean", "hd_mm_mean",
                                       "hd_mm_mean_finite")]
        lines.append(f"| {row['members_per_fold']}{mark} | {row['members']} | "
                     + " | ".join("inf" if math.isinf(v) else f"{v:.4f}" for v in values)
                     + f" | {row['num_hd_inf']} |")
    return "\n".join(lines)
