"""How far the ensemble's members agree on one case: the spread of their volumes and their Dice against the ensemble.

A reader cannot see the members, only the mask; when the members disagree the mask is a
guess between them, and the case deserves a closer look. Members are compared on their own
argmax masks, before the ensemble's post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autoseg2d.evaluation.metrics import dice_score, volume_ml

# Mean Dice of the members against the ensemble mask below which a case is flagged "low agreement".
# Members that agree to within a voxel layer on a small bleed still reach about 0.8; at 0.7 they
# disagree on where the bleed is or how far it goes.
LOW_AGREEMENT_DICE = 0.7


def member_agreement(ensemble_mask: np.ndarray, member_masks: Sequence[np.ndarray], spacing_mm: Sequence[float],
                     label: int | None = None) -> dict:
    """Members' volumes (mL), their spread (max - min) and Dice against the ensemble, for one class or any (None).

    With fewer than two members agreement is not measured (NaN): one model cannot disagree with itself.
    members_compared says how many were compared (a screened ensemble passes only the members that ran on
    every slice).
    """
    def select(mask):
        mask = np.asarray(mask)
        return mask > 0 if label is None else mask == label

    if len(member_masks) < 2:
        return {"member_volumes_ml": [], "member_volume_spread_ml": math.nan, "member_dice": [],
                "member_dice_mean": math.nan, "members_compared": len(member_masks)}
    shapes = {np.shape(m) for m in member_masks}
    if shapes != {np.shape(ensemble_mask)}:
        raise ValueError(f"member masks {sorted(shapes)} and the ensemble mask {np.shape(ensemble_mask)} differ in "
                         "shape; pass them all in the same array order")
    ensemble = select(ensemble_mask)
    volumes = [volume_ml(select(m), spacing_mm) for m in member_masks]
    dices = [dice_score(select(m), ensemble) for m in member_masks]
    return {"member_volumes_ml": volumes, "member_volume_spread_ml": max(volumes) - min(volumes),
            "member_dice": dices, "member_dice_mean": float(np.mean(dices)), "members_compared": len(member_masks)}


def low_agreement(agreement: dict, threshold: float = LOW_AGREEMENT_DICE) -> bool:
    dice = agreement["member_dice_mean"]
    return not math.isnan(dice) and dice < threshold
