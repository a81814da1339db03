"""An ensemble's screening pass: a few members look at every slice, the others only where those saw something.

Most slices of a head CT hold no hemorrhage, and on them every member says so. The screening
members (one per fold: ``Screen.members``) run on every slice; a slice where their mean
foreground probability (1 - P(background)) stays below ``Screen.below`` at every pixel is left
to them: the other members skip it, and its probabilities are the screening members' mean. On
every other slice all members run, so there the result is the whole ensemble's.

What this can change: with N members of which j screen, a screened-out slice becomes foreground
in the whole ensemble's mean only where the other N - j members average above
(N / 2 - j * below) / (N - j) at a pixel where the screening members' mean stays below `below`
(0.60 against 0.25 for 18 members, 5 screening, below 0.25). Anything that reads probabilities
below 0.5 would see estimates there, so a caller whose output depends on them (the never-empty
rescue of an otherwise empty mask) asks, through ``complete_if``, for the skipped slices to be
run by every member as well; its result is then the whole ensemble's everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from predictor import SlicePredictor, predict_together
from volumes import Volume


@dataclass(frozen=True)
class Screen:
    """The first `members` predictors screen every slice; slices they see below `below` everywhere are theirs."""

    members: int
    below: float

    def __post_init__(self):
        if int(self.members) < 1 or not 0.0 < float(self.below) < 0.5:
            raise ValueError(f"a screen needs at least one screening member and a probability between 0 and 0.5 "
                             f"(exclusive) to screen below; got members={self.members}, below={self.below}")


@dataclass
class ScreenedResult:
    """Summed probabilities (C, H, W, D) as if every member had run, the masks of the members that ran on every
    slice (None for the others, whose masks would be partial), and the axial slices the others skipped."""

    total: np.ndarray
    masks: list[np.ndarray | None]
    skipped: list[int]


def screened_together(predictors: Sequence[SlicePredictor], volume: Volume, screen: Screen, vote: bool = False,
                      keep_masks: bool = False, complete_if: Callable[[np.ndarray], bool] | None = None
                      ) -> ScreenedResult:
    """The predictors' summed probabilities (or votes) over `volume`, the later ones only on slices the first
    `screen.members` do not screen out.

    `complete_if(total)` is asked once the screened result stands; True runs the skipped slices through the
    later members too, so the result equals predict_together's.
    """
    count, first = len(predictors), min(screen.members, len(predictors))
    total, masks = predict_together(predictors[:first], volume, vote, keep_masks)
    if first == count:
        return ScreenedResult(total, list(masks), [])
    foreground = 1.0 - total[0] / first  # (H, W, D): the screening members' mean of "any class"
    peak = foreground.reshape(-1, foreground.shape[-1]).max(axis=0)
    head = sorted(z for slices, _, _ in predictors[0].boxes(volume) for z in slices)  # air only: nobody runs
    kept = [z for z in head if peak[z] >= screen.below]
    skipped = [z for z in head if peak[z] < screen.below]
    rest, rest_masks = predict_together(predictors[first:], volume, vote, keep_masks, only=set(kept))
    estimate = total[..., skipped] * ((count - first) / first)  # the screening members' mean, for the others
    rest[..., skipped] = estimate
    result = ScreenedResult(total + rest, [*masks, *rest_masks], skipped)
    if skipped and complete_if is not None and complete_if(result.total):
        late, late_masks = predict_together(predictors[first:], volume, vote, keep_masks, only=set(skipped))
        result.total[..., skipped] += late[..., skipped] - estimate
        for mask, late_mask in zip(rest_masks, late_masks):
            mask[..., skipped] = late_mask[..., skipped]
        result.skipped = []
    if result.skipped:
        result.masks[first:] = [None] * len(rest_masks) if keep_masks else []
    return result
