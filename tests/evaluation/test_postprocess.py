"""Post-processing steps and their cross-validated choice, on small synthetic probability maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg2d.evaluation.postprocess import (
    apply_postprocessing,
    choose_postprocessing,
    keep_nonempty,
    remove_small_components,
)

SPACING_MM = (1.0, 1.0, 2.0)  # one voxel = 0.002 mL
SHAPE = (20, 20, 6)


def _blob(x0: int, x1: int, z0: int = 2, z1: int = 4) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[x0:x1, 5:10, z0:z1] = True
    return mask


def test_remove_small_components_uses_volume_in_ml():
    mask = _blob(2, 7)  # 50 voxels = 0.1 mL
    mask[15, 15, 0] = mask[16, 16, 1] = True  # two voxels touching at a corner: one 0.004 mL component
    mask[15, 2, 5] = True  # 0.002 mL
    kept = remove_small_components(mask, SPACING_MM, min_volume_ml=0.004)
    assert kept[15, 15, 0] and kept[16, 16, 1] and not kept[15, 2, 5]
    assert remove_small_components(mask, SPACING_MM, min_volume_ml=0.05).sum() == 50
    assert not remove_small_components(mask, SPACING_MM, min_volume_ml=0.2).any()


def test_keep_nonempty_picks_the_most_probable_component():
    prob = np.zeros(SHAPE, np.float32)
    prob[_blob(2, 5)] = 0.3
    prob[_blob(12, 15)] = 0.35
    prob[13, 7, 3] = 0.45  # the peak of the second blob
    rescued = keep_nonempty(np.zeros(SHAPE, bool), prob, floor=0.2)
    assert np.array_equal(rescued, _blob(12, 15))
    assert not keep_nonempty(np.zeros(SHAPE, bool), prob, floor=0.45).any()
    already = _blob(2, 3)
    assert np.array_equal(keep_nonempty(already, prob, floor=0.2), already)


def _cases() -> list[dict]:
    """Case 0 has a noise speck far away; case 1's lesion is found only at low probability."""
    prob0 = np.where(_blob(2, 8), 0.9, 0.02).astype(np.float32)
    prob0[17, 17, 0] = 0.8
    prob1 = np.where(_blob(10, 14), 0.35, 0.02).astype(np.float32)
    prob2 = np.where(_blob(4, 9), 0.95, 0.01).astype(np.float32)
    return [
        {"case_id": "c0", "prob": prob0, "truth": _blob(2, 8).astype(np.uint8), "spacing_mm": SPACING_MM},
        {"case_id": "c1", "prob": prob1, "truth": _blob(10, 14).astype(np.uint8), "spacing_mm": SPACING_MM},
        {"case_id": "c2", "prob": prob2, "truth": _blob(4, 9).astype(np.uint8), "spacing_mm": SPACING_MM},
    ]


def test_choice_keeps_steps_that_help_and_is_json():
    choice = choose_postprocessing(_cases(), min_volume_ml_candidates=(0.01, 0.05, 0.5), floor_candidates=(0.1, 0.4))
    assert choice["steps"] == [
        {"name": "remove_small_components", "min_volume_ml": 0.01},  # 0.5 mL would delete the lesions
        {"name": "keep_nonempty", "floor": 0.1},  # 0.4 is above the missed lesion
    ]
    assert choice["baseline"]["num_hd_inf"] == 1 and choice["selected"]["num_hd_inf"] == 0
    assert choice["selected"]["dice_mean"] > choice["baseline"]["dice_mean"]
    assert "inf-HD" in choice["rule"]
    rejected = [t for t in choice["evaluated"] if not t["qualifies"]]
    assert {(t["name"], t.get("min_volume_ml", t.get("floor"))) for t in rejected} == {
        ("remove_small_components", 0.5), ("keep_nonempty", 0.4)}
    stored = json.loads(json.dumps(choice))
    for case in _cases():
        assert np.array_equal(apply_postprocessing(case["prob"], SPACING_MM, stored), case["truth"])


def test_choice_leaves_out_steps_that_do_not_help():
    cases = [c for c in _cases() if c["case_id"] == "c2"]  # clean case: nothing to fix
    choice = choose_postprocessing(cases)
    assert choice["steps"] == []
    assert choice["selected"] == choice["baseline"]


def test_apply_rejects_unknown_steps_and_listing_the_known_ones():
    choice = {"threshold": 0.5, "steps": [{"name": "largest_component"}]}
    with pytest.raises(ValueError, match=r"largest_component.*keep_nonempty.*remove_small_components"):
        apply_postprocessing(np.zeros(SHAPE), SPACING_MM, choice)
    with pytest.raises(ValueError, match="needs keys 'threshold' and 'steps'"):
        apply_postprocessing(np.zeros(SHAPE), SPACING_MM, {"steps": []})
    with pytest.raises(ValueError, match="remove_small_components"):
        apply_postprocessing(np.zeros(SHAPE), SPACING_MM, {"threshold": 0.5, "steps": [
            {"name": "remove_small_components", "min_volume": 1}]})


def test_case_without_truth_is_named():
    with pytest.raises(ValueError, match=r"case 'c9' lacks keys \['truth'\]"):
        choose_postprocessing([{"case_id": "c9", "prob": np.zeros(SHAPE), "spacing_mm": SPACING_MM}])
