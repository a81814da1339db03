"""The validation Dice that picks the best checkpoint: classes absent from truth and prediction do not count."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import volume_dice


def probabilities_of(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.moveaxis(np.eye(num_classes, dtype=np.float32)[labels], -1, 0)


def test_a_class_absent_from_truth_and_prediction_does_not_count():
    truth = np.zeros((8, 8, 2), np.uint8)
    truth[1:5, 1:5, 0] = 1  # class 1: 16 voxels; classes 2 and 3 absent from this scan
    pred = np.zeros_like(truth)
    pred[1:5, 1:3, 0] = 1  # half of it: Dice 2 * 8 / (8 + 16)
    assert volume_dice(probabilities_of(pred, 4), truth) == pytest.approx(2 / 3)
    pred[6, 6, 1] = 2  # a false class-2 voxel now counts: (2/3 + 0) / 2
    assert volume_dice(probabilities_of(pred, 4), truth) == pytest.approx(1 / 3)


def test_an_empty_scan_predicted_empty_scores_one_and_a_false_positive_zero():
    truth = np.zeros((8, 8, 2), np.uint8)
    assert volume_dice(probabilities_of(truth, 2), truth) == 1.0
    assert volume_dice(probabilities_of(truth, 4), truth) == 1.0
    pred = truth.copy()
    pred[2, 2, 0] = 1
    assert volume_dice(probabilities_of(pred, 4), truth) == 0.0
