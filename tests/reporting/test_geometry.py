"""The training scans' spacing range and the flag a scan unlike them gets."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import yaml

from autoseg2d.pipeline.predict import predict_images
from autoseg2d.reporting.case_report import FLAG_SPACING
from autoseg2d.reporting.geometry import SPACING_TOLERANCE, SpacingRange
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
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
    """Spacing is compared in RAS order, whatever order the file stores its axes in: a thin-slice scan stored
    with its slices first is flagged on z, as the training range (RAS, from DataAnalyzer) says."""
    size = 32  # as many slices as pixels, so one lesion map fits either storage order
    lesion = np.zeros((size, size, size), np.float32)
    lesion[10:16, 10:16, 2:4] = 0.9
    write_case(make_head_ct(size=size, num_slices=size, seed=0), tmp_path / "in" / "usual.nii.gz", None)
    thin = make_head_ct(size=size, num_slices=size, spacing_mm=(0.45, 0.45, 1.25), seed=0)
    affine = thin.affine[:, [2, 1, 0, 3]]  # file axes (z, y, x): the same scan, stored slices first
    nib.save(nib.Nifti1Image(np.transpose(thin.image_hu, (2, 1, 0)), affine), str(tmp_path / "in" / "thin.nii.gz"))
    predictor = fake_ensemble("mean", lesion)
    trained = SpacingRange(low=(0.45, 0.45, 5.0), high=(0.45, 0.45, 5.0))
    predict_images(predictor, sorted((tmp_path / "in").iterdir()), tmp_path / "out", training_spacing=trained)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    flags = {row["case"]: row["flags"] for row in report["rows"]}
    assert FLAG_SPACING in flags["thin"] and FLAG_SPACING not in flags["usual"]
    assert report["settings"]["training_spacing_mm"] == {"min": [0.45, 0.45, 5.0], "max": [0.45, 0.45, 5.0],
                                                         "tolerance": SPACING_TOLERANCE}
    printed = capsys.readouterr().out
    assert "thin.nii.gz: warning: voxel spacing 0.45 x 0.45 x 1.25 mm is unlike the training scans' " \
           "(0.45 x 0.45 x 5.00 mm) on axis z" in printed
    assert "usual.nii.gz: warning" not in printed

    # a rerun keeps both masks and flags them by its own training range: none known, no flag
    predict_images(predictor, sorted((tmp_path / "in").iterdir()), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(FLAG_SPACING not in row["flags"] for row in report["rows"])
    assert "training_spacing_mm" not in report["settings"]
    predict_images(predictor, sorted((tmp_path / "in").iterdir()), tmp_path / "out", training_spacing=trained)
    assert "thin.nii.gz: warning" in capsys.readouterr().out  # kept, flagged and said again
