"""Post-processing steps and their cross-validated choice, on small synthetic probability maps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autoseg2d.pipeline.postprocess import (
    FLOOR_CANDIDATES,
    _mean_ranks,
    apply_multiclass_postprocessing,
    apply_postprocessing,
    binarize,
    choose_multiclass_postprocessing,
    choose_postprocessing,
    describe_effects,
    foreground_probability,
    keep_nonempty,
    peak_component,
    postprocess,
    postprocess_multiclass,
    remove_small_components,
    reads_low_probabilities,
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
    already = _blob(2, 3)
    assert np.array_equal(keep_nonempty(already, prob, floor=0.2), already)


def test_a_map_whose_maximum_is_below_the_floor_keeps_the_region_around_its_peak():
    prob = np.full(SHAPE, 0.001, np.float32)
    prob[_blob(12, 15)] = 0.03  # a faint spot ...
    prob[13, 7, 3] = 0.04  # ... peaking at 0.04, under the floor
    prob[_blob(2, 4)] = 0.025  # a second spot above half the peak but not touching the first
    rescued = keep_nonempty(np.zeros(SHAPE, bool), prob, floor=0.05)
    assert np.array_equal(rescued, _blob(12, 15))
    choice = {"threshold": 0.5, "steps": [{"name": "keep_nonempty", "floor": 0.05}]}
    mask, peak = postprocess(prob, SPACING_MM, choice)
    assert np.array_equal(mask, _blob(12, 15)) and peak == pytest.approx(0.04)
    left, would_be = postprocess(prob, SPACING_MM, choice, never_empty=False)
    assert not left.any() and would_be == pytest.approx(0.04)
    found = np.where(_blob(2, 6), 0.9, 0.01).astype(np.float32)
    assert postprocess(found, SPACING_MM, choice)[1] is None  # nothing to rescue: not reported


def test_a_flat_map_keeps_its_first_peak_voxel_alone():
    for value in (0.0, 0.03):
        rescued = keep_nonempty(np.zeros(SHAPE, bool), np.full(SHAPE, value, np.float16), floor=0.05)
        assert rescued.sum() == 1 and rescued[0, 0, 0]


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


def test_choice_ranks_the_four_challenge_metrics_and_is_json():
    choice = choose_postprocessing(_cases(), min_volume_ml_candidates=(0.01, 0.05, 0.5), floor_candidates=(0.1, 0.4))
    assert choice["steps"] == [
        {"name": "remove_small_components", "min_volume_ml": 0.01},  # ties with 0.05: the smaller one is kept
        {"name": "keep_nonempty", "floor": 0.1},  # 0.4 is above the missed lesion
    ]
    assert choice["baseline"]["num_hd_inf"] == 1 and choice["selected"]["num_hd_inf"] == 0
    assert choice["selected"]["dice_mean"] > choice["baseline"]["dice_mean"]
    assert choice["selected"]["hd_mm_mean"] < choice["baseline"]["hd_mm_mean"]
    assert "mean rank" in choice["rule"] and "may become inf" in choice["rule"]
    forbidden = [c for c in choice["evaluated"] if c["new_inf_cases"]]
    assert forbidden and all(c["steps"][0].get("min_volume_ml") == 0.5 for c in forbidden)
    assert all(c["new_inf_cases"] == ["c0", "c2"] and "mean_rank" not in c for c in forbidden)
    assert choice["effects"]["rescued_cases"] == ["c1"] and choice["effects"]["empty_after"] == 0
    stored = json.loads(json.dumps(choice))
    for case in _cases():
        assert np.array_equal(apply_postprocessing(case["prob"], SPACING_MM, stored), case["truth"])


def test_the_never_empty_guarantee_stays_when_no_out_of_fold_case_is_empty():
    cases = [c for c in _cases() if c["case_id"] == "c2"]  # clean case: the guarantee changes nothing here
    choice = choose_postprocessing(cases)
    assert choice["steps"] == [{"name": "keep_nonempty", "floor": min(FLOOR_CANDIDATES)}]
    assert choice["selected"]["dice_mean"] == choice["baseline"]["dice_mean"]
    faint = np.where(_blob(3, 6), 0.4, 0.01).astype(np.float16)  # a test case never reaching 0.5
    assert np.array_equal(apply_postprocessing(faint, SPACING_MM, choice), _blob(3, 6))


def test_a_normal_scan_is_marked_by_the_rescue_and_the_choice_counts_it():
    normal = {"case_id": "n0", "prob": np.where(_blob(3, 6), 0.15, 0.01).astype(np.float32),
              "truth": np.zeros(SHAPE, np.uint8), "spacing_mm": SPACING_MM}
    choice = choose_postprocessing([*_cases(), normal], min_volume_ml_candidates=(0.01,),
                                   floor_candidates=(0.1, 0.2))
    # Below the floor of 0.2 the rescue keeps the normal scan's spot all the same, so 0.1 ties and wins.
    assert choice["steps"][-1] == {"name": "keep_nonempty", "floor": 0.1}
    assert choice["effects"]["normal_cases"] == 1 and choice["effects"]["normal_false_positive_cases"] == ["n0"]
    assert "normal scans given a false positive: 1 of 1" in describe_effects(choice)
    faint_noise = np.full(SHAPE, 0.03, np.float16)
    assert apply_postprocessing(faint_noise, SPACING_MM, choice).sum() == 1


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


def _three_class_case(case_id: str, rescue: bool = False) -> dict:
    """Background, class 1 (a blob) and class 2 (a blob plus a far speck); or, with rescue, only faint class 2."""
    probs = np.zeros((3, *SHAPE), np.float32)
    probs[0] = 0.96
    probs[1] = probs[2] = 0.02
    truth = np.zeros(SHAPE, np.uint8)
    if rescue:
        truth[_blob(10, 14)] = 2
        probs[0][_blob(10, 14)], probs[2][_blob(10, 14)], probs[1][_blob(10, 14)] = 0.6, 0.3, 0.1
    else:
        truth[_blob(2, 6)], truth[_blob(10, 14)] = 1, 2
        for index, blob in ((1, _blob(2, 6)), (2, _blob(10, 14))):
            probs[0][blob], probs[index][blob] = 0.05, 0.93
        probs[0][17, 17, 0], probs[2][17, 17, 0] = 0.05, 0.93  # a speck of class 2, 0.002 mL
    return {"case_id": case_id, "prob": probs.astype(np.float16), "truth": truth, "spacing_mm": SPACING_MM}


def test_multiclass_cleaning_is_chosen_per_class_and_the_rescue_keeps_the_most_probable_class():
    cases = [_three_class_case("m0"), _three_class_case("m1"), _three_class_case("m2", rescue=True)]
    choice = json.loads(json.dumps(choose_multiclass_postprocessing(cases, min_volume_ml_candidates=(0.01,),
                                                                    floor_candidates=(0.2,))))
    assert choice["per_class"]["1"]["steps"] == []  # nothing to clean in class 1: the smaller rule set wins ties
    assert choice["per_class"]["2"]["steps"] == [{"name": "remove_small_components", "min_volume_ml": 0.01}]
    assert choice["foreground"]["steps"] == [{"name": "keep_nonempty", "floor": 0.2}]
    for case in cases:
        assert np.array_equal(apply_multiclass_postprocessing(case["prob"], SPACING_MM, choice), case["truth"])
    labels, peak = postprocess_multiclass(cases[2]["prob"], SPACING_MM, choice)
    assert np.array_equal(labels, cases[2]["truth"]) and peak == pytest.approx(0.4, abs=1e-3)
    assert postprocess_multiclass(cases[0]["prob"], SPACING_MM, choice)[1] is None
    left, would_be = postprocess_multiclass(cases[2]["prob"], SPACING_MM, choice, never_empty=False)
    assert not left.any() and would_be == pytest.approx(0.4, abs=1e-3)


def binary(prob: np.ndarray) -> np.ndarray:
    return np.stack([1 - prob, prob])


def test_probabilities_below_one_half_are_read_by_the_rescue_of_an_empty_mask_or_a_lower_threshold():
    """An ensemble that only estimated probabilities below 0.5 (screening) must know when the mask reads them."""
    lesion = np.where(_blob(2, 6), 0.9, 0.2).astype(np.float32)  # a 40-voxel blob (0.08 mL)
    faint = np.full(SHAPE, 0.2, np.float32)
    rescue = {"threshold": 0.5, "steps": [{"name": "remove_small_components", "min_volume_ml": 0.1},
                                          {"name": "keep_nonempty", "floor": 0.1}]}
    clean_only = {"threshold": 0.5, "steps": [{"name": "remove_small_components", "min_volume_ml": 0.01}]}
    assert reads_low_probabilities(binary(faint), SPACING_MM, rescue)
    assert reads_low_probabilities(binary(lesion), SPACING_MM, rescue)  # cleaning (0.1 mL) empties it: rescued
    assert not reads_low_probabilities(binary(lesion), SPACING_MM, {**rescue, "steps": rescue["steps"][1:]})
    assert not reads_low_probabilities(binary(faint), SPACING_MM, clean_only)
    assert not reads_low_probabilities(binary(faint), SPACING_MM, None)
    assert reads_low_probabilities(binary(lesion), SPACING_MM, {**clean_only, "threshold": 0.3})
    multiclass = {"kind": "multiclass", "per_class": {"1": {"threshold": 0.5, "steps": []},
                                                      "2": {"threshold": 0.5, "steps": []}},
                  "foreground": {"threshold": 0.5, "steps": [{"name": "keep_nonempty", "floor": 0.05}]}}
    three = np.stack([1 - faint, faint / 2, faint / 2])
    assert reads_low_probabilities(three, SPACING_MM, multiclass)
    three[:, _blob(2, 6)] = np.array([0.1, 0.8, 0.1])[:, None]
    assert not reads_low_probabilities(three, SPACING_MM, multiclass)
    without_rescue = {**multiclass, "foreground": {"threshold": 0.5, "steps": []}}
    assert not reads_low_probabilities(np.stack([1 - faint, faint / 2, faint / 2]), SPACING_MM, without_rescue)


def test_a_probability_at_the_threshold_or_the_floor_is_not_above_it():
    """binarize is the argmax over (background, lesion), which gives a tie (0.5, 0.5) to background; the rescue's
    floor is passed only above it, as the threshold is."""
    prob = np.zeros(SHAPE, np.float32)
    prob[_blob(2, 5)] = 0.5
    prob[_blob(12, 15)] = 0.75
    assert np.array_equal(binarize(prob), _blob(12, 15))
    assert np.array_equal(binarize(prob), binary(prob).argmax(0) == 1)
    faint = np.zeros(SHAPE, np.float32)
    faint[_blob(10, 15)] = 0.25  # the floor exactly, touching ...
    faint[_blob(12, 15)] = 0.375  # ... the most probable spot
    assert np.array_equal(keep_nonempty(np.zeros(SHAPE, bool), faint, floor=0.25), _blob(12, 15))


def test_the_peak_region_is_half_the_peaks_height_over_the_median():
    """Around a peak of 0.05 on a median of 0.01, half the height is 0.03: the ring at 0.031 is kept, the one at
    0.029 is not, and a haze on another slice raises the mean (not the median) above half of it."""
    prob = np.full(SHAPE, 0.01, np.float32)
    prob[7:14, 7:14, 3] = 0.029
    prob[9:12, 9:12, 3] = 0.031
    prob[10, 10, 3] = 0.05
    prob[:, :, 0] = 0.04  # above half the height but not connected to the peak
    assert np.median(prob) == np.float32(0.01) and np.mean(prob) > 0.014
    expected = np.zeros(SHAPE, bool)
    expected[9:12, 9:12, 3] = True
    assert np.array_equal(peak_component(prob), expected)


def _ranked(**metrics) -> dict:
    return {"dice_mean": 0.8, "rvd_mean": 0.1, "nsd_mean": 0.7, "num_hd_inf": 0, "hd_mm_mean_finite": 10.0,
            **metrics}


def test_candidates_are_ranked_per_metric_with_ties_below_the_rounding_sharing_their_rank():
    assert _mean_ranks([_ranked(), _ranked(dice_mean=0.80003)]) == [1.5, 1.5]  # equal at 4 decimals
    assert _mean_ranks([_ranked(), _ranked(dice_mean=0.8003)]) == [1.625, 1.375]
    assert _mean_ranks([_ranked(), _ranked(rvd_mean=0.05)]) == [1.625, 1.375]  # lower RVD is better
    assert _mean_ranks([_ranked(), _ranked(nsd_mean=0.75)]) == [1.625, 1.375]
    assert _mean_ranks([_ranked(), _ranked(nsd_mean=math.nan)]) == [1.375, 1.625]  # undefined: last
    # HD: fewer inf cases first, whatever the mean over the finite ones; then the lower mean.
    fewer_inf = [_ranked(num_hd_inf=1, hd_mm_mean_finite=5.0), _ranked(hd_mm_mean_finite=20.0)]
    assert _mean_ranks(fewer_inf) == [1.625, 1.375]
    assert _mean_ranks([_ranked(hd_mm_mean_finite=20.0), _ranked(hd_mm_mean_finite=5.0)]) == [1.625, 1.375]


def test_the_foreground_probability_thresholded_at_one_half_is_the_argmax_mask_also_within_float16_rounding():
    probs = np.zeros((3, *SHAPE), np.float32)
    probs[0], probs[1] = 0.9, 0.1
    probs[:, _blob(2, 5)] = np.array([0.4999, 0.5001, 0.0], np.float32)[:, None]  # foreground by a hair
    probs[:, _blob(12, 15)] = np.array([0.5001, 0.2, 0.2999], np.float32)[:, None]  # background by a hair
    foreground = foreground_probability(probs)
    assert np.array_equal(binarize(foreground), probs.argmax(0) > 0)
    assert np.array_equal(binarize(foreground), _blob(2, 5))
    assert np.all(foreground[_blob(12, 15)] == np.float16(0.4999))  # below one half: as it was
