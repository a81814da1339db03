"""Folder evaluation: matching by name, missing and empty predictions, report files, CLI use."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest

from autoseg2d.evaluation.evaluate import cross_validation_table, evaluate_folders
from autoseg2d.synthetic.head_ct import make_head_ct, write_case

SPACING_MM = (0.5, 0.45, 5.0)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Four labelled cases: perfect, empty and missing predictions, and one saved as .nii."""
    gt, pred = tmp_path / "labels", tmp_path / "preds"
    pred.mkdir()
    for i, name in enumerate(["ct_a", "ct_b", "ct_c", "ct_d"]):
        case = make_head_ct(size=32, num_slices=6, spacing_mm=SPACING_MM, num_lesions=1, seed=i)
        write_case(case, tmp_path / "images" / f"{name}.nii.gz", gt / f"{name}.nii.gz")
        if name == "ct_a":
            _save(case.label, case.affine, pred / "ct_a.nii.gz")
        elif name == "ct_b":
            _save(np.zeros_like(case.label), case.affine, pred / "ct_b.nii.gz")
        elif name == "ct_d":
            _save(case.label, case.affine, pred / "ct_d.nii")
    _save(np.zeros((32, 32, 6), np.uint8), np.eye(4), pred / "stray.nii.gz")
    return pred, gt


def _save(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), path)


def test_scores_every_label_and_reports_failures(folders, tmp_path):
    pred, gt = folders
    summary = evaluate_folders(str(pred), str(gt), str(tmp_path / "report"))
    rows = {row["case"]: row for row in csv.DictReader(open(tmp_path / "report" / "metrics_per_case.csv"))}
    assert sorted(rows) == ["ct_a", "ct_b", "ct_c", "ct_d"]
    assert float(rows["ct_a"]["dice"]) == pytest.approx(1.0) and float(rows["ct_a"]["hd_mm"]) == 0.0
    assert float(rows["ct_d"]["dice"]) == pytest.approx(1.0)  # .nii prediction matched to .nii.gz label
    assert rows["ct_b"]["status"] == "scored" and math.isinf(float(rows["ct_b"]["hd_mm"]))
    assert float(rows["ct_b"]["dice"]) < 1e-6
    assert rows["ct_c"]["status"] == "missing_prediction" and float(rows["ct_c"]["dice"]) == 0.0
    assert "no prediction file" in rows["ct_c"]["note"]
    assert summary["num_cases"] == 4 and summary["num_hd_inf"] == 2
    assert summary["hd_mm_mean"] == math.inf
    assert summary["missing_predictions"] == ["ct_c"] and summary["unmatched_predictions"] == ["stray"]
    assert summary["dice_mean"] == pytest.approx(0.5, abs=1e-6)


def test_reports_are_strict_json_and_markdown(folders, tmp_path):
    pred, gt = folders
    evaluate_folders(str(pred), str(gt), str(tmp_path / "report"))
    saved = json.loads((tmp_path / "report" / "summary.json").read_text(), parse_constant=pytest.fail)
    assert saved["hd_mm_mean"] == "inf" and saved["num_missing_predictions"] == 1
    markdown = (tmp_path / "report" / "summary.md").read_text()
    assert "| ct_c | missing_prediction |" in markdown
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.endswith(".tmp")]


def test_spacing_comes_from_the_label_header(folders):
    pred, gt = folders
    evaluate_folders(str(pred), str(gt))
    rows = list(csv.DictReader(open(pred / "evaluation" / "metrics_per_case.csv")))
    label = nib.load(gt / "ct_a.nii.gz")
    voxels = int(np.count_nonzero(label.get_fdata()))
    expected_ml = voxels * float(np.prod(label.header.get_zooms())) / 1000
    assert float(rows[0]["true_volume_ml"]) == pytest.approx(expected_ml)


def test_non_binary_prediction_names_the_case(folders, tmp_path):
    pred, gt = folders
    label = nib.load(gt / "ct_a.nii.gz")
    _save(np.asanyarray(label.dataobj) * 255, label.affine, pred / "ct_a.nii.gz")
    with pytest.raises(ValueError, match=r"case 'ct_a'.*255"):
        evaluate_folders(str(pred), str(gt), str(tmp_path / "report"))


def test_runs_through_fire_like_the_cli(folders, tmp_path):
    pred, gt = folders
    summary = fire.Fire(
        evaluate_folders, command=["--pred", str(pred), "--gt", str(gt), "--output", str(tmp_path / "cli")]
    )
    assert summary["num_cases"] == 4 and (tmp_path / "cli" / "summary.md").exists()


def test_empty_gt_folder_is_an_error(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    with pytest.raises(ValueError, match="no label files"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))


def test_cross_validation_table_rows_and_inf_counts():
    good = {"dice": 0.8, "rvd": 0.1, "nsd": 0.6, "hd_mm": 4.0}
    failed = {"dice": 0.0, "rvd": 1.0, "nsd": 0.0, "hd_mm": math.inf}
    records = [
        {"variant": "windows3", "fold": 1, "cases": [good, failed]},
        {"variant": "windows3", "fold": 0, "cases": [good]},
        {"variant": "slices3", "fold": 0, "cases": [good, good]},
    ]
    lines = cross_validation_table(records).strip().splitlines()
    assert lines[0] == "| variant | fold | cases | Dice | RVD | NSD | HD mm | HD inf |"
    assert lines[2] == "| slices3 | 0 | 2 | 0.8000 | 0.1000 | 0.6000 | 4.0000 | 0 |"
    assert lines[3].startswith("| windows3 | 0 | 1 |")
    assert lines[4] == "| windows3 | 1 | 2 | 0.4000 | 0.5500 | 0.3000 | inf | 1 |"
    assert lines[5] == "| windows3 | all | 3 | 0.5333 | 0.4000 | 0.4000 | inf | 1 |"


def test_cross_validation_folds_in_numeric_order():
    good = {"dice": 0.8, "rvd": 0.1, "nsd": 0.6, "hd_mm": 4.0}
    records = [{"variant": "v", "fold": fold, "cases": [good]} for fold in (10, 2, 0, 1)]
    lines = cross_validation_table(records).strip().splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["0", "1", "2", "10", "all"]


def test_cross_validation_record_without_cases_is_an_error():
    with pytest.raises(ValueError, match=r"record 0 lacks keys \['cases'\]"):
        cross_validation_table([{"variant": "a", "fold": 0}])


def test_images_folder_adds_overlays_for_every_case(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    summary = evaluate_folders(str(pred), str(gt), output=str(tmp_path / "report"), images=str(tmp_path / "images"))
    names = sorted(Path(p).name for p in summary["overlays"])
    assert names == ["ct_a.png", "ct_b.png", "ct_c.png", "ct_d.png"]  # the missing prediction is drawn too
    assert (tmp_path / "report" / "overlays" / "contact_sheet.png").stat().st_size > 0


def test_multiclass_folders_get_per_class_metrics_and_the_mean_over_classes(tmp_path):
    gt, pred = tmp_path / "labels", tmp_path / "preds"
    pred.mkdir()
    for i in range(2):
        case = make_head_ct(size=32, num_slices=6, spacing_mm=SPACING_MM, num_lesions=3, seed=i, num_classes=3)
        write_case(case, tmp_path / "images" / f"ct_{i}.nii.gz", gt / f"ct_{i}.nii.gz")
        _save(case.label, case.affine, pred / f"ct_{i}.nii.gz")
    summary = evaluate_folders(str(pred), str(gt), str(tmp_path / "report"), class_names="IPH,IVH,SAH")
    assert summary["dice_mean"] == pytest.approx(1.0)
    assert set(summary["classes"]) == {"IPH", "IVH", "SAH", "mean over classes"}
    assert summary["classes"]["mean over classes"]["dice_mean"] == pytest.approx(1.0)
    header = (tmp_path / "report" / "metrics_per_case.csv").read_text().splitlines()[0]
    assert "dice_IPH" in header and "true_volume_ml_SAH" in header and "hd_mm_IVH" in header
    markdown = (tmp_path / "report" / "summary.md").read_text()
    assert "## Classes" in markdown and "| mean over classes |" in markdown
    assert evaluate_folders(str(pred), str(gt), str(tmp_path / "r2"))["classes"].keys() >= {"class_1", "class_3"}


def test_binary_reports_keep_their_format(folders, tmp_path):
    pred, gt = folders
    summary = evaluate_folders(str(pred), str(gt), str(tmp_path / "report"))
    assert "classes" not in summary
    header = (tmp_path / "report" / "metrics_per_case.csv").read_text().splitlines()[0]
    assert header == "case,status,dice,rvd,nsd,hd_mm,pred_volume_ml,true_volume_ml,note"
    assert "## Classes" not in (tmp_path / "report" / "summary.md").read_text()


def test_cross_validation_table_adds_a_per_class_table_for_multiclass_records():
    from autoseg2d.evaluation.metrics import class_case_metrics

    truth = np.zeros((8, 8, 4), np.uint8)
    truth[1:3, 1:3, 1], truth[5:7, 5:7, 2] = 1, 2
    case = class_case_metrics(truth, truth, (1.0, 1.0, 2.0), ["IPH", "IVH"], "c")
    table = cross_validation_table([{"variant": "slices", "fold": f, "cases": [case]} for f in (0, 1)])
    assert "Per class, all folds pooled" in table
    assert "| slices | IPH | 2 | 1.0000 |" in table and "| slices | mean over classes |" in table
