"""An ensemble's screening pass: a few members look at every slice, the others only where those saw something.

Most slices of a head CT hold no hemorrhage, and on them every member says so. The screening
members (the driver picks each fold's first: ``Screen.members``) run on every slice; a slice where
their mean foreground probability (1 - P(background); in a vote ensemble, the share of them voting
foreground) stays below ``Screen.below`` at every pixel is left to them: the other members skip
it, and its probabilities are the screening members' mean. On every other slice all members run,
on the inputs a pass of every member would give them, so there the result is the whole
ensemble's (to the last bits where other batches round differently in reduced precision).

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

from predictor import SlicePredictor, background, predict_together
from volumes import Volume


@dataclass(frozen=True)
class Screen:
    """Which members screen (their indices among the ensemble's) and the probability they screen below."""

    members: tuple[int, ...]
    below: float

    @classmethod
    def from_settings(cls, settings: dict, num_members: int, where: str) -> Screen:
        """An ensemble's "screen" entry {members: [indices], below: probability}, checked; `where` names its file."""
        members, below = settings.get("members"), settings.get("below")
        fix = f"fix it in {where} or set \"screen\" to null there (every member on every slice)"
        indices = isinstance(members, list) and bool(members) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_members for i in members)
        if not indices or len(set(members)) != len(members):
            raise ValueError(f"screen members {members!r} are not distinct member indices 0..{num_members - 1} "
                             f"(the screening members of {num_members}); {fix}")
        if isinstance(below, bool) or not isinstance(below, (int, float)) or not 0.0 < below < 0.5:
            raise ValueError(f"screen below {below!r} is not a probability between 0 and 0.5 (exclusive); {fix}")
        return cls(tuple(members), float(below))


@dataclass
class ScreenedResult:
    """Summed probabilities (C, H, W, D) as if every member had run, each member's mask in the members' order (None
    for a member that skipped slices: its mask would be partial), and the axial slices skipped."""

    total: np.ndarray
    masks: list[np.ndarray | None]
    skipped: list[int]


def screened_together(predictors: Sequence[SlicePredictor], volume: Volume, screen: Screen, vote: bool = False,
                      keep_masks: bool = False, complete_if: Callable[[np.ndarray], bool] | None = None
                      ) -> ScreenedResult:
    """The predictors' summed probabilities (or votes) over `volume`, the non-screening ones only on the slices
    the screening ones (`screen.members`) do not screen out.

    `complete_if(total)` is asked once the screened result stands; True runs the skipped slices through the
    other members too, so every member has then run on the same inputs as predict_together.
    """
    count = len(predictors)
    first = list(screen.members)
    later = [i for i in range(count) if i not in screen.members]
    total, screen_masks = predict_together([predictors[i] for i in first], volume, vote, keep_masks)
    masks: list = [None] * count if keep_masks else []
    for index, mask in zip(first, screen_masks):
        masks[index] = mask
    if not later:
        return ScreenedResult(total, masks, [])
    foreground = 1.0 - total[0] / len(first)  # (H, W, D): the screening members' mean of "any class" (vote: share)
    peak = foreground.reshape(-1, foreground.shape[-1]).max(axis=0)
    head = sorted(z for slices in predictors[0].batch_slices(volume) for z in slices)  # air only: nobody runs
    kept = [z for z in head if peak[z] >= screen.below]
    skipped = [z for z in head if peak[z] < screen.below]
    others = [predictors[i] for i in later]
    if kept:
        rest, rest_masks = predict_together(others, volume, vote, keep_masks, only=set(kept))
    else:  # nothing to run (a scan without a bleed): no pass at all, not even predict_together's blank one
        rest = background(total.shape[0], volume.image.shape) * len(others)
        rest_masks = [np.zeros(volume.image.shape, np.uint8) for _ in others] if keep_masks else []
    estimate = total[..., skipped] * (len(later) / len(first))  # the screening members' mean, for the others
    rest[..., skipped] = estimate
    result = ScreenedResult(total + rest, masks, skipped)
    if skipped and complete_if is not None and complete_if(result.total):
        late, late_masks = predict_together(others, volume, vote, keep_masks, only=set(skipped))
        result.total[..., skipped] += late[..., skipped] - estimate
        for mask, late_mask in zip(rest_masks, late_masks):
            mask[..., skipped] = late_mask[..., skipped]
        result.skipped = []
    for index, mask in zip(later, rest_masks):
        masks[index] = None if result.skipped else mask
    return result
