"""train_bundle as the console shows it: a failed training says why in its last lines."""

from __future__ import annotations

import pytest

from autoseg2d.pipeline.bundles import TrainingError, describe, train_bundle


def test_a_failed_training_shows_its_last_lines(bundle, tmp_path):
    missing = tmp_path / "moved_away.json"
    with pytest.raises(TrainingError) as raised:
        train_bundle(bundle, "trial slices fold 0", datalist=missing, dataroot=tmp_path)
    message = str(raised.value)
    assert message.startswith("trial slices fold 0: training failed (exit code 1); its last lines:")
    assert str(missing) in message and "full log:" in message


def test_short_labels():
    assert describe({"input_variant": "both", "learning_rate": 0.0029257, "seed": 0}) == "both lr 2.9e-03"
    assert describe({"input_variant": "slices", "seed": 2}) == "slices seed 2"
