"""The training scans' spacing range and the flag a scan unlike them gets."""

from __future__ import annotations

import json

import numpy as np
import yaml

from autoseg2d.pipeline.ensemble import predict_images
from autoseg2d.reporting.case_report import FLAG_SPACING, CaseReport
from autoseg2d.reporting.geometry import SPACING_TOLERANCE, SpacingRange
from autoseg2d.synthetic import make_head_ct, write_case
from tests.ensemble_fakes import fake_ensemble

TRAINED = SpacingRange(low=(0.42, 0.42, 4.5), high=(0.49, 0.49, 5.0))


def datastats(path, spacing: dict) -> None:
    path.write_text(yaml.safe_dump({"stats_summary": {"image_stats": {"spacing": spacing}}}))


def test_the_range_comes_from_datastats_and_is_none_without_one(tmp_path):
    datastats(tmp_path / "datastats.yaml", {"min": [0.42, 0.42, 4.5], "max": [0.49, 0.49, 5.0], "median": [0, 0, 0]})
    assert SpacingRange.from_datastats(tmp_path / "datastats.yaml") == TRAINED
    assert SpacingRange.from_datastats(tmp_path / "missing.yaml") is None
    datastats(tmp_path / "partial.yaml", {"median": [0.45, 0.45, 5.0]})
    assert SpacingRange.from_datastats(tmp_path / "partial.yaml") is None
    datastats(tmp_path / "two_axes.yaml", {"min": [0.45, 5.0], "max": [0.45, 5.0]})
    assert SpacingRange.from_datastats(tmp_path / "two_axes.yaml") is None


def test_a_scan_is_unlike_the_training_scans_only_beyond_the_tolerance_on_an_axis():
    assert TRAINED.unlike_axes((0.45, 0.45, 5.0)) == []
    assert TRAINED.unlike_axes((0.42 / SPACING_TOLERANCE, 0.49 * SPACING_TOLERANCE, 4.5 / SPACING_TOLERANCE)) == []
    assert TRAINED.unlike_axes((0.45, 0.45, 1.25)) == ["z"]  # thin slices
    assert TRAINED.unlike_axes((0.9, 0.9, 5.0)) == ["x", "y"]  # a larger field of view at 512 px
    text = TRAINED.describe((0.45, 0.45, 1.25))
    assert "0.45 x 0.45 x 1.25 mm" in text and "0.42-0.49 x 0.42-0.49 x 4.50-5.00 mm" in text
    assert "axis z" in text and "resample" in text


def test_the_report_flags_a_thin_slice_scan_and_says_what_it_was_trained_on(tmp_path, capsys):
    size, slices = 32, 6
    lesion = np.zeros((size, size, slices), np.float32)
    lesion[10:16, 10:16, 2:4] = 0.9
    for name, slice_mm in (("usual", 5.0), ("thin", 1.25)):
        case = make_head_ct(size=size, num_slices=slices, seed=0)
        case.affine[:3, 2] *= slice_mm / 5.0  # the generator's slices are 5 mm
        write_case(case, tmp_path / "in" / f"{name}.nii.gz", None)
    predictor = fake_ensemble("mean", lesion)
    predictor.training_spacing = SpacingRange(low=(0.45, 0.45, 5.0), high=(0.45, 0.45, 5.0))
    predict_images(predictor, sorted((tmp_path / "in").iterdir()), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    flags = {row["case"]: row["flags"] for row in report["rows"]}
    assert FLAG_SPACING in flags["thin"] and FLAG_SPACING not in flags["usual"]
    assert report["settings"]["training_spacing_mm"] == {"min": [0.45, 0.45, 5.0], "max": [0.45, 0.45, 5.0],
                                                         "tolerance": SPACING_TOLERANCE}
    printed = capsys.readouterr().out
    assert "thin.nii.gz: warning: voxel spacing 0.45 x 0.45 x 1.25 mm" in printed
    assert "usual.nii.gz: warning" not in printed


def test_without_a_training_range_nothing_is_flagged(tmp_path):
    case = make_head_ct(size=32, num_slices=6, seed=0)
    write_case(case, tmp_path / "a.nii.gz", None)
    mask = np.zeros((32, 32, 6), np.uint8)
    report = CaseReport(tmp_path / "out", ["hemorrhage"])
    (row,) = report.add_case("a", tmp_path / "a.nii.gz", tmp_path / "out" / "a.nii.gz", mask)
    assert FLAG_SPACING not in row["flags"]
    assert "training_spacing_mm" not in json.loads((tmp_path / "out" / "report.json").read_text())["settings"]
