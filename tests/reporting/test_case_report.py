"""The per-case report on known masks: rows, flags, files rewritten case by case, QA pictures, kept cases."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from autoseg2d.pipeline.predict import predict_images
from autoseg2d.reporting.case_report import (
    FLAG_EDGE,
    FLAG_EMPTY,
    FLAG_LOW_AGREEMENT,
    FLAG_SKULL,
    CaseReport,
    lesion_class_names,
)
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.ensemble_fakes import fake_ensemble

SIZE, SLICES = 32, 6


def write_image(path, seed=0):
    case = make_head_ct(size=SIZE, num_slices=SLICES, seed=seed)
    write_case(case, path, None)
    return case


def test_rows_and_flags_on_known_masks(tmp_path):
    case = write_image(tmp_path / "in" / "a.nii.gz")
    mask = np.zeros((SIZE, SIZE, SLICES), np.uint8)
    mask[12:18, 12:18, 2:4] = 1  # 72 voxels inside the brain, away from bone and edges
    other = np.zeros_like(mask)
    other[0:3, 0:3, 0] = 1  # a member that disagrees entirely, at the scan's corner
    report = CaseReport(tmp_path / "out", ["hemorrhage"])
    (row,) = report.add_case("a", tmp_path / "in" / "a.nii.gz", tmp_path / "out" / "a.nii.gz", mask, [mask, other],
                             seconds=1.5)
    assert row["volume_ml"] == pytest.approx(72 * 0.45 * 0.45 * 5 / 1000)
    assert row["num_bleeds"] == 1 and row["flags"] == [FLAG_LOW_AGREEMENT]
    assert row["member_dice_mean"] == pytest.approx(0.5, abs=1e-5)
    assert row["spacing_mm"] == pytest.approx([0.45, 0.45, 5.0]) and row["num_slices"] == SLICES
    # x is flipped in the file (LPS-like affine): report slices are RAS ones, here the same axial order
    assert (row["largest_bleed_first_slice"], row["largest_bleed_last_slice"]) == (2, 3)

    empty = report.add_case("b", tmp_path / "in" / "a.nii.gz", tmp_path / "out" / "b.nii.gz", np.zeros_like(mask),
                            [np.zeros_like(mask)] * 2)[0]
    assert empty["flags"] == [FLAG_EMPTY]
    skull = np.zeros_like(mask)
    skull[case.image_hu > 300] = 1  # the skull itself, which has bone as in-plane neighbour
    skull[:, :, 0] = 0
    skull[:, :, -1] = 0
    flagged = report.add_case("c", tmp_path / "in" / "a.nii.gz", tmp_path / "out" / "c.nii.gz", skull)[0]
    assert FLAG_SKULL in flagged["flags"] and np.isnan(flagged["member_dice_mean"])
    edge = mask.copy()
    edge[:, :, 0] = 1
    assert FLAG_EDGE in report.add_case("d", tmp_path / "in" / "a.nii.gz", tmp_path / "out" / "d.nii.gz", edge)[0][
        "flags"]

    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["flags"] == "low agreement" and rows[0]["spacing_mm"] == "0.45 x 0.45 x 5"
    assert rows[2]["member_dice_mean"] == ""  # not measured without members
    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    assert stored["settings"]["low_agreement_dice"] == 0.7 and len(stored["rows"]) == 4
    picture = imread(str(tmp_path / "out" / "qa" / "a.png"))
    assert picture.shape[1] > 4 * picture.shape[0] / 2  # five panels side by side
    assert report.write_contact_sheet().exists()


def test_multi_class_rows_per_class_and_any(tmp_path):
    write_image(tmp_path / "a.nii.gz")
    mask = np.zeros((SIZE, SIZE, SLICES), np.uint8)
    mask[10:14, 10:14, 2] = 1
    mask[18:22, 18:22, 3] = 2
    report = CaseReport(tmp_path / "out", lesion_class_names({"output_classes": 3, "class_names": ["IPH", "SDH"]}))
    rows = report.add_case("a", tmp_path / "a.nii.gz", tmp_path / "out" / "a.nii.gz", mask)
    assert [r["class"] for r in rows] == ["IPH", "SDH", "any"]
    assert [r["num_bleeds"] for r in rows] == [1, 1, 2]
    assert rows[2]["volume_ml"] == pytest.approx(rows[0]["volume_ml"] + rows[1]["volume_ml"])
    assert lesion_class_names({"output_classes": 3}) == ["class_1", "class_2"]


def test_prediction_writes_the_report_and_a_rerun_keeps_its_rows(tmp_path):
    for i in range(2):
        write_image(tmp_path / "in" / f"c{i}.nii.gz", seed=i)
    images = sorted((tmp_path / "in").iterdir())
    lesion = np.zeros((SIZE, SIZE, SLICES), np.float32)
    lesion[10:16, 10:16, 2:4] = 0.9
    shifted = np.roll(lesion, 2, axis=0)
    predictor = fake_ensemble("mean", lesion, shifted)
    out = tmp_path / "out"
    predict_images(predictor, images, out)
    first = json.loads((out / "report.json").read_text())["rows"]
    assert [r["case"] for r in first] == ["c0", "c1"]
    assert 0.5 < first[0]["member_dice_mean"] < 1 and len(first[0]["member_volumes_ml"]) == 2
    assert (out / "qa" / "contact_sheet.png").exists() and (out / "qa" / "c1.png").exists()
    (out / "c1.nii.gz").unlink()
    (out / "report.json").write_text(json.dumps({"settings": {}, "rows": first[:1]}))  # c1's row lost as well
    predict_images(predictor, images, out)
    again = json.loads((out / "report.json").read_text())["rows"]
    assert again[0] == first[0]  # kept from the earlier run
    assert again[1]["volume_ml"] == first[1]["volume_ml"]
    assert np.asanyarray(nib.load(str(out / "c1.nii.gz")).dataobj).sum() > 0


def test_a_kept_rows_unmeasured_agreement_stays_empty_in_the_csv(tmp_path):
    """One network (a student) has no agreement: NaN, kept as "nan" in report.json, empty in the CSV also when a
    rerun keeps the case."""
    write_image(tmp_path / "in" / "c0.nii.gz", seed=0)
    lesion = np.zeros((SIZE, SIZE, SLICES), np.float32)
    lesion[10:16, 10:16, 2:4] = 0.9
    predictor = fake_ensemble("mean", lesion)
    out = tmp_path / "out"
    for _ in range(2):  # the second run keeps the mask and its row
        predict_images(predictor, [tmp_path / "in" / "c0.nii.gz"], out)
        row = next(csv.DictReader((out / "report.csv").open()))
        assert (row["member_dice_mean"], row["member_volume_spread_ml"], row["members_compared"]) == ("", "", "1")
        assert row["model"] == "ensemble"
