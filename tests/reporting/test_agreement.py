"""Members' agreement with the ensemble mask: volumes, spread, Dice, the low-agreement flag."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoseg2d.reporting.agreement import LOW_AGREEMENT_DICE, low_agreement, member_agreement


def test_identical_members_agree_fully():
    mask = np.zeros((10, 10, 3), np.uint8)
    mask[2:6, 2:6, 1] = 1
    agreement = member_agreement(mask, [mask, mask], (1, 1, 1))
    assert agreement["member_dice_mean"] == pytest.approx(1.0)
    assert agreement["member_volume_spread_ml"] == 0
    assert not low_agreement(agreement)


def test_disagreeing_members_are_flagged():
    ensemble = np.zeros((10, 10, 3), np.uint8)
    ensemble[0:4, 0:4, 1] = 1  # 16 voxels
    other = np.zeros_like(ensemble)
    other[4:8, 4:8, 1] = 1  # no overlap
    agreement = member_agreement(ensemble, [ensemble, other, np.zeros_like(ensemble)], (1, 1, 1000))
    assert agreement["member_volumes_ml"] == [16, 16, 0]
    assert agreement["member_volume_spread_ml"] == 16
    assert agreement["member_dice_mean"] == pytest.approx(1 / 3, abs=1e-5)
    assert agreement["member_dice_mean"] < LOW_AGREEMENT_DICE and low_agreement(agreement)


def test_one_class_of_several_and_a_single_member():
    ensemble = np.array([[[1, 2, 2, 0]]], np.uint8)
    member = np.array([[[1, 1, 2, 0]]], np.uint8)
    assert member_agreement(ensemble, [ensemble, member], (1, 1, 1), label=1)["member_volumes_ml"] == [0.001, 0.002]
    single = member_agreement(ensemble, [member], (1, 1, 1))
    assert math.isnan(single["member_dice_mean"]) and not low_agreement(single)
    with pytest.raises(ValueError, match="differ in shape"):
        member_agreement(ensemble, [member[..., :2], member], (1, 1, 1))
