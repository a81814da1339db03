"""Per-case metrics against the INSTANCE 2022 organizers' values on 24 test vectors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autoseg2d.evaluation.metrics import (
    RVD_UNDEFINED_NOTE,
    case_metrics,
    summarize_metrics,
    validate_mask,
)

VECTORS = Path(__file__).resolve().parents[1] / "data" / "instance22_metric_vectors"  # 24 organizers' cases

CASES = json.loads(VECTORS.with_suffix(".json").read_text())
ARRAYS = np.load(VECTORS.with_suffix(".npz"))
TOLERANCE = {"dice": 1e-4, "rvd": 1e-6, "nsd": 1e-4, "hd_mm": 1e-3}
EXPECTED_KEY = {"dice": "dice", "rvd": "rvd", "nsd": "nsd_0.42mm", "hd_mm": "hd_mm"}


def _expected(value) -> float | None:
    """Organizers' value as a float; None where their function raises."""
    if isinstance(value, dict):
        return None
    return float(value)  # float("inf") and float("nan") parse the JSON strings


@pytest.fixture(scope="module")
def computed() -> dict[str, dict]:
    return {
        case["name"]: case_metrics(
            ARRAYS[case["name"] + "_pred"], ARRAYS[case["name"] + "_gt"], ARRAYS[case["name"] + "_spacing"],
            case_id=case["name"],
        )
        for case in CASES
    }


@pytest.mark.parametrize("metric", sorted(EXPECTED_KEY))
@pytest.mark.parametrize("case", CASES, ids=[c["name"] + "-" + c["short_name"] for c in CASES])
def test_matches_organizers(computed, case, metric):
    got = computed[case["name"]][metric]
    expected = _expected(case["expected"][EXPECTED_KEY[metric]])
    if expected is None:  # organizers raise (RVD, empty truth): we report NaN and say why
        assert math.isnan(got)
        assert computed[case["name"]]["note"] == RVD_UNDEFINED_NOTE
    elif math.isnan(expected):
        assert math.isnan(got)
    elif math.isinf(expected):
        assert got == expected
    else:
        assert got == pytest.approx(expected, abs=TOLERANCE[metric])


def test_all_vectors_checked():
    assert len(CASES) == 24
    raising = [c["name"] for c in CASES if isinstance(c["expected"]["rvd"], dict)]
    assert raising == ["case12", "case13"]


def test_nsd_tolerance_is_a_parameter():
    case = next(c for c in CASES if c["name"] == "case05")
    metrics = case_metrics(ARRAYS["case05_pred"], ARRAYS["case05_gt"], ARRAYS["case05_spacing"], nsd_tolerance_mm=1.0)
    assert metrics["nsd"] == pytest.approx(case["expected"]["nsd_1mm"], abs=1e-4)


def test_volumes_in_ml_use_spacing():
    truth = np.zeros((4, 4, 3), np.uint8)
    truth[:2, :2, 0] = 1  # 4 voxels of 0.5 x 0.5 x 4 mm = 4 mm3
    pred = np.zeros_like(truth)
    pred[:2, :2, :2] = 1
    metrics = case_metrics(pred, truth, (0.5, 0.5, 4.0))
    assert metrics["true_volume_ml"] == pytest.approx(0.004)
    assert metrics["pred_volume_ml"] == pytest.approx(0.008)
    assert metrics["rvd"] == pytest.approx(1.0)
    assert metrics["note"] == ""


@pytest.mark.parametrize(
    "bad, shown", [(np.array([0, 255]), "255"), (np.array([0.0, 0.7]), "0.7"), (np.array([0, 2]), "2")]
)
def test_non_binary_mask_names_the_case(bad, shown):
    pred = np.zeros((4, 4, 2), dtype=bad.dtype)
    pred[0, 0, 0] = bad[1]
    truth = np.zeros((4, 4, 2), np.uint8)
    with pytest.raises(ValueError, match=rf"case 'ct_007'.*prediction.*{shown}"):
        case_metrics(pred, truth, (1.0, 1.0, 1.0), case_id="ct_007")


def test_float_zero_one_mask_is_accepted():
    assert validate_mask(np.array([0.0, 1.0]), "c", "truth").tolist() == [False, True]


def test_shape_mismatch_names_case_and_shapes():
    with pytest.raises(ValueError, match=r"case 'ct_003'.*\(4, 4, 2\).*\(4, 4, 3\)"):
        case_metrics(np.zeros((4, 4, 2)), np.zeros((4, 4, 3)), (1, 1, 1), case_id="ct_003")


def test_bad_spacing_names_the_case():
    with pytest.raises(ValueError, match=r"case 'ct_001'.*spacing_mm"):
        case_metrics(np.zeros((4, 4, 2)), np.zeros((4, 4, 2)), (1.0, 0.0, 1.0), case_id="ct_001")


def test_summary_mean_hd_is_inf_with_one_inf_case():
    cases = [
        {"dice": 0.8, "rvd": 0.1, "nsd": 0.6, "hd_mm": 4.0},
        {"dice": 0.6, "rvd": 0.3, "nsd": 0.4, "hd_mm": 6.0},
        {"dice": 1e-7, "rvd": math.nan, "nsd": 0.0, "hd_mm": math.inf},
    ]
    summary = summarize_metrics(cases)
    assert summary["dice_mean"] == pytest.approx((0.8 + 0.6 + 1e-7) / 3)
    assert summary["rvd_mean"] == pytest.approx(0.2)
    assert summary["nsd_mean"] == pytest.approx(1.0 / 3)
    assert summary["hd_mm_mean"] == math.inf
    assert summary["hd_mm_mean_finite"] == pytest.approx(5.0)
    assert (summary["num_cases"], summary["num_hd_inf"], summary["num_rvd_nan"]) == (3, 1, 1)


def test_summary_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no cases"):
        summarize_metrics([])


def test_class_metrics_score_each_class_and_the_foreground():
    from autoseg2d.evaluation.metrics import class_case_metrics, summarize_classes

    truth = np.zeros((8, 8, 4), np.uint8)
    truth[1:3, 1:3, 1] = 1
    truth[5:7, 5:7, 2] = 2
    pred = truth.copy()
    pred[5:7, 5:7, 2] = 1  # class 2 predicted as class 1: the foreground is perfect, the classes are not
    metrics = class_case_metrics(pred, truth, (1.0, 1.0, 2.0), ["IPH", "IVH", "SAH"], "c")
    assert metrics["dice"] == pytest.approx(1.0)
    assert metrics["classes"]["IPH"]["dice"] == pytest.approx(2 * 4 / (8 + 4))
    assert metrics["classes"]["IVH"]["dice"] < 1e-5 and metrics["classes"]["IVH"]["true_volume_ml"] == 0.008
    assert metrics["classes"]["SAH"] is None  # in neither mask: nothing to score
    summary = summarize_classes([metrics])
    assert summary["SAH"] is None and summary["IPH"]["num_cases"] == 1
    iph, ivh = (metrics["classes"][name]["dice"] for name in ("IPH", "IVH"))
    assert summary["mean over classes"]["dice_mean"] == pytest.approx((iph + ivh) / 2)
    assert summary["IPH"]["pred_volume_ml_mean"] == 0.016


def test_class_ids_outside_the_classes_are_refused():
    from autoseg2d.evaluation.metrics import class_case_metrics

    truth = np.zeros((4, 4, 2), np.uint8)
    with pytest.raises(ValueError, match=r"prediction holds values \[4\], not class ids 0..3"):
        class_case_metrics(np.full_like(truth, 4), truth, (1.0, 1.0, 1.0), ["a", "b", "c"], "c")
