"""autoseg2d.check: one test per entry of the bad-input catalogue, each naming the case, the file and the fix."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg2d import check
from autoseg2d.check import InputCheckError, check_inputs
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.conftest import SCRIPTS, SUBPROCESS_TIMEOUT_S

NUM_TRAIN = 4


def check_ct(datalist: str, dataroot: str, **options) -> dict:
    """check_inputs for CT data unless the test names another modality (the run context gives it in a run)."""
    return check_inputs(datalist, dataroot, **{"modality": "ct", **options})


def write_dataset(root: Path, num_train: int = NUM_TRAIN, num_folds: int = 2) -> Path:
    """case_000..: 32 x 32 x 6 head CTs with lesions, two folds, one testing case; returns the datalist."""
    training = []
    for i in range(num_train):
        write_case(make_head_ct(size=32, num_slices=6, num_lesions=1, seed=i),
                   root / f"images/case_{i:03d}.nii.gz", root / f"labels/case_{i:03d}.nii.gz")
        training.append({"image": f"images/case_{i:03d}.nii.gz", "label": f"labels/case_{i:03d}.nii.gz",
                         "fold": i % num_folds})
    write_case(make_head_ct(size=32, num_slices=6, seed=99), root / "test/case_099.nii.gz", None)
    return write_datalist(root, {"training": training, "testing": [{"image": "test/case_099.nii.gz"}]})


def write_datalist(root: Path, datalist: dict) -> Path:
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([-0.45, 0.45, 5.0, 1.0]) if affine is None else affine), path)


def problems(root: Path, **kwargs) -> str:
    with pytest.raises(InputCheckError) as raised:
        check_ct(str(root / "datalist.json"), str(root), **kwargs)
    return str(raised.value)


@pytest.fixture
def data(tmp_path) -> Path:
    write_dataset(tmp_path)
    return tmp_path


def test_clean_data_passes_with_a_report(data):
    report = check_ct(str(data / "datalist.json"), str(data), work_dir=str(data / "work"))
    assert report["errors"] == [] and report["num_folds"] == 2
    assert [c["status"] for c in report["cases"]] == ["ok"] * (NUM_TRAIN + 1)
    assert json.loads((data / "work" / "input_check.json").read_text())["cases"][0]["case"] == "case_000"


def test_missing_image_file(data):
    (data / "images/case_001.nii.gz").unlink()
    assert "case case_001: file not found:" in problems(data) and "images/case_001.nii.gz" in problems(data)


def test_missing_label_file(data):
    (data / "labels/case_002.nii.gz").unlink()
    message = problems(data)
    assert "case case_002: file not found" in message and "labels/case_002.nii.gz" in message
    assert "Check the datalist entry and --dataroot" in message


def test_unreadable_and_truncated_nifti(data):
    (data / "images/case_000.nii.gz").write_bytes(b"not a nifti file")
    whole = (data / "labels/case_001.nii.gz").read_bytes()
    (data / "labels/case_001.nii.gz").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half way
    message = problems(data)
    assert "case case_000: cannot read" in message and "images/case_000.nii.gz" in message
    assert "case case_001: cannot read" in message and "labels/case_001.nii.gz" in message
    assert "is it a NIfTI file?" in message


def test_image_label_shape_mismatch(data):
    save(data / "labels/case_001.nii.gz", np.zeros((32, 32, 5), np.uint8))
    message = problems(data)
    assert "case case_001: label shape (32, 32, 5) differs from image shape (32, 32, 6)" in message


def test_image_label_affine_mismatch_beyond_tolerance(data):
    label = nib.load(data / "labels/case_003.nii.gz")
    shifted = label.affine.copy()
    shifted[0, 3] += 10 * check.template_module("volumes").AFFINE_TOLERANCE_MM
    save(data / "labels/case_003.nii.gz", np.asanyarray(label.dataobj), shifted)
    assert "case case_003: label affine differs from the image affine by more than 0.001 mm" in problems(data)


def test_affine_difference_within_tolerance_is_accepted(data):
    label = nib.load(data / "labels/case_003.nii.gz")
    nudged = label.affine.copy()
    nudged[0, 3] += 0.1 * check.template_module("volumes").AFFINE_TOLERANCE_MM
    save(data / "labels/case_003.nii.gz", np.asanyarray(label.dataobj), nudged)
    check_ct(str(data / "datalist.json"), str(data))


@pytest.mark.parametrize(
    ("label_values", "expected"),
    [
        (np.array([0, 255], np.uint8), "label values [0, 255] exceed 20, more classes than any hemorrhage"),
        (np.array([0.0, 0.5], np.float32), "not class indices 0..N"),
    ],
)
def test_label_values_outside_the_classes(data, label_values, expected):
    label = np.zeros((32, 32, 6), label_values.dtype)
    label[10:20, 10:20, 2:4] = label_values[1]
    save(data / "labels/case_002.nii.gz", label)
    message = problems(data)
    assert "case case_002" in message and str(data / "labels/case_002.nii.gz") in message
    assert expected in message and "0/255" in message  # the fix: convert 0/255 masks to 0/1


def test_more_classes_pass_when_declared(data):
    label = np.zeros((32, 32, 6), np.uint8)
    label[10:20, 10:20, 2:4] = 2
    save(data / "labels/case_002.nii.gz", label)
    check_ct(str(data / "datalist.json"), str(data), output_classes=3)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_voxels(data, bad_value):
    image = make_head_ct(size=32, num_slices=6, seed=1).image_hu.astype(np.float32)
    image[3, 3, 3] = bad_value
    save(data / "images/case_001.nii.gz", image)
    assert "case case_001: " in problems(data) and "contains NaN or inf voxels; fix or exclude" in problems(data)


def test_2d_image(data):
    save(data / "test/case_099.nii.gz", make_head_ct(size=32, num_slices=6).image_hu[..., 3])
    message = problems(data)
    assert "case case_099:" in message and "has shape (32, 32); a single-channel 3D volume" in message
    assert "give the whole 3D series" in message


def test_multichannel_image(data):
    rgb = np.stack([make_head_ct(size=32, num_slices=6, seed=0).image_hu] * 3, axis=-1)
    save(data / "images/case_000.nii.gz", rgb)
    message = problems(data)
    assert "case case_000:" in message and "(32, 32, 6, 3)" in message
    assert "save the one CT channel (or time point) as its own file" in message


def test_single_slice_volume_cannot_train(data):
    case = make_head_ct(size=32, num_slices=6, num_lesions=1, seed=2)
    save(data / "images/case_002.nii.gz", case.image_hu[..., 2:3])
    save(data / "labels/case_002.nii.gz", case.label[..., 2:3])
    message = problems(data)
    assert "case case_002 (" in message and "the image has 1 axial slice; training needs at least 2" in message
    assert "move the case to testing" in message


def test_single_slice_testing_volume_is_a_warning(data):
    save(data / "test/case_099.nii.gz", make_head_ct(size=32, num_slices=6).image_hu[..., 2:3])
    report = check_ct(str(data / "datalist.json"), str(data))
    assert any("case case_099: the image has one axial slice" in w for w in report["warnings"])


def test_empty_label_is_allowed_but_reported(data):
    save(data / "labels/case_003.nii.gz", np.zeros((32, 32, 6), np.uint8))
    report = check_ct(str(data / "datalist.json"), str(data))
    assert report["errors"] == []
    assert any("case case_003" in w and "the label is empty" in w for w in report["warnings"])
    assert next(c for c in report["cases"] if c["case"] == "case_003")["status"] == "ok"


@pytest.mark.parametrize(("scale", "span"), [(1.0, "0..1"), (255.0, "0..255")])
def test_non_ct_intensity_range(data, scale, span):
    hu = make_head_ct(size=32, num_slices=6, seed=0).image_hu.astype(np.float32)
    exported = np.clip((hu - 0) / 80, 0, 1) * scale  # a brain-window export, 0-1 or 0-255
    save(data / "images/case_000.nii.gz", exported.astype(np.float32 if scale == 1 else np.uint8))
    message = problems(data)
    assert f"case case_000 ({data / 'images/case_000.nii.gz'}" in message
    assert f"modality is ct but the voxel values span {span}, not Hounsfield units" in message
    assert "Convert the scan to HU" in message
    check_ct(str(data / "datalist.json"), str(data), modality="mri")  # z-scored, so any range will do


def test_duplicate_entries_and_duplicate_scans(data):
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["training"].append(dict(datalist["training"][0], fold=1))
    write_datalist(data, datalist)
    assert "training lists images/case_000.nii.gz 2 times; keep one entry per case" in problems(data)

    datalist["training"].pop()
    write_datalist(data, datalist)
    for kind in ("images", "labels"):
        (data / f"{kind}/case_003.nii.gz").write_bytes((data / f"{kind}/case_000.nii.gz").read_bytes())
    message = problems(data)
    assert "case case_003:" in message and "has the same voxels as case case_000" in message


def test_case_in_training_and_testing(data):
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["testing"].append({"image": "images/case_001.nii.gz"})
    write_datalist(data, datalist)
    assert "images/case_001.nii.gz is in both training and testing" in problems(data)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda e: e[0].pop("fold"), "training entry 0 (images/case_000.nii.gz) has no fold"),
        (lambda e: e[1].update(fold="one"), "has fold 'one'; folds are integers >= 0"),
        (lambda e: [x.update(fold=0) for x in e[:3]] and e[3].update(fold=2), "folds [1] hold no training case"),
    ],
)
def test_missing_or_invalid_folds(data, change, expected):
    datalist = json.loads((data / "datalist.json").read_text())
    change(datalist["training"])
    write_datalist(data, datalist)
    assert expected in problems(data)


def test_fewer_cases_than_folds(data):
    message = problems(data, num_folds=5)
    assert f"{NUM_TRAIN} training cases cannot fill 5 folds" in message


def test_work_dir_without_write_permission(data, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(check.tempfile, "mkstemp", refuse)
    message = problems(data, work_dir=str(data / "work"))
    assert f"work dir {data / 'work'}: cannot write to {data} (Permission denied)" in message


def test_work_dir_that_is_a_file(data):
    assert "is a file, not a folder" in problems(data, work_dir=str(data / "datalist.json" / "work"))


def test_work_dir_on_a_full_disk(data, monkeypatch):
    monkeypatch.setattr(check.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 2**29})())
    message = problems(data, work_dir=str(data))
    assert "0.5 GB free, about 3 GB needed (1 GB of checkpoints per fold x 2 folds" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"num_epoch": 10}, "unknown config key 'num_epoch'"),
        ({"num_epoch": 10}, "did you mean 'num_epochs'?"),
        ({"num_epochs": "ten"}, "config key 'num_epochs' expects int like 300, got str 'ten'"),
        ({"input_variant": "all"}, "input_variant 'all' is unknown; choose one of slices, windows, both"),
        ({"network#init_filter": 8}, "Valid keys under network: blocks_down, dsdepth, init_filters, norm"),
    ],
)
def test_config_key_unknown_or_of_the_wrong_type(data, overrides, expected):
    assert expected in problems(data, config_overrides=overrides)


def test_every_problem_is_listed_at_once(data):
    (data / "images/case_000.nii.gz").unlink()
    save(data / "labels/case_002.nii.gz", np.full((32, 32, 6), 255, np.uint8))
    with pytest.raises(InputCheckError) as raised:
        check_ct(str(data / "datalist.json"), str(data), config_overrides={"batch_sise": 4})
    message = str(raised.value)
    assert message.startswith("input check found 3 problem(s)")
    assert "1. case case_000: file not found" in message and "case case_002 (" in message
    assert "unknown config key 'batch_sise'" in message and "--skip_bad" in message
    assert [c["status"] for c in raised.value.report["cases"]].count("error") == 2


def test_skip_bad_leaves_the_bad_cases_out(data):
    for i in (4, 5):
        write_case(make_head_ct(size=32, num_slices=6, num_lesions=1, seed=i),
                   data / f"images/case_{i:03d}.nii.gz", data / f"labels/case_{i:03d}.nii.gz")
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["training"] += [{"image": f"images/case_{i:03d}.nii.gz", "label": f"labels/case_{i:03d}.nii.gz",
                              "fold": i % 2} for i in (4, 5)]
    write_datalist(data, datalist)
    with gzip.open(data / "images/case_001.nii.gz", "wb") as f:
        f.write(b"\x00" * 10)

    report = check_ct(str(data / "datalist.json"), str(data), work_dir=str(data / "work"), skip_bad=True)
    assert report["skipped"] == ["case_001"] and report["errors"] == []
    assert any(w.startswith("skipped: case case_001: cannot read") for w in report["warnings"])
    cleaned = json.loads(Path(report["cleaned_datalist"]).read_text())
    assert [e["image"] for e in cleaned["training"]] == [e["image"] for e in datalist["training"] if "001" not in
                                                         e["image"]]
    assert cleaned["testing"] == datalist["testing"]
    check_ct(report["cleaned_datalist"], str(data))


def test_skip_bad_still_stops_when_a_fold_would_be_empty(data):
    (data / "images/case_001.nii.gz").unlink()
    (data / "images/case_003.nii.gz").unlink()
    message = problems(data, skip_bad=True)
    assert "datalist without the 2 skipped cases: folds [1] hold no training case" in message


def test_a_data_root_without_any_listed_file_is_one_problem(data, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(InputCheckError) as raised:
        check_ct(str(data / "datalist.json"), str(empty))
    message = str(raised.value)
    assert "found 1 problem(s)" in message
    assert f"none of the {2 * NUM_TRAIN + 1} files the datalist lists exists under --dataroot {empty}" in message
    assert "images/case_000.nii.gz, labels/case_000.nii.gz, test/case_099.nii.gz" in message


def multiclass_dataset(root: Path, class_names: list[str] | None = None) -> Path:
    from autoseg2d.synthetic.head_ct import write_dataset as write_generated

    datalist = write_generated(root, num_train=4, num_test=0, num_folds=2, size=32, num_slices=6, num_classes=3)
    if class_names is not None:
        datalist.write_text(json.dumps({**json.loads(datalist.read_text()), "class_names": class_names}))
    return datalist


def test_multiclass_labels_pass_with_classes_from_the_data(tmp_path):
    """The generator's num_classes=3 labels (0..3): the check takes the classes from the data."""
    datalist = multiclass_dataset(tmp_path)
    report = check_ct(str(datalist), str(tmp_path))
    assert report["label_ids"] == [0, 1, 2, 3] and report["class_names"] == []


def test_class_names_in_the_datalist_are_checked_against_the_labels(tmp_path):
    datalist = multiclass_dataset(tmp_path, ["IPH", "IVH", "SAH"])
    assert check_ct(str(datalist), str(tmp_path))["class_names"] == ["IPH", "IVH", "SAH"]
    datalist = multiclass_dataset(tmp_path, ["IPH", "IVH"])
    message = problems(tmp_path)
    assert "label values [0, 1, 2, 3] exceed the 2 classes in class_names ['IPH', 'IVH']" in message
    datalist.write_text(json.dumps({**json.loads(datalist.read_text()), "class_names": "IPH"}))
    assert "class_names 'IPH' must be a list of distinct names" in problems(tmp_path)


def test_template_modules_import_their_siblings_from_the_template():
    planning = check.template_module("planning")
    assert Path(planning.__file__).parent == SCRIPTS  # the template's own copy, imported by its plain name
    assert planning.WINDOW_RULES["ct"] is check.template_module("ct_windows").derive_ct_windows_hu


def test_the_driver_loads_planning_without_the_template_on_sys_path():
    """As in `run_autoseg.py`: the scripts folder is not importable by plain names there."""
    code = ("import sys; from autoseg2d.check import template_module; planning = template_module('planning'); "
            "assert not any(p.endswith('scripts') for p in sys.path); "
            "stats = {'stats_summary': {'image_stats': {'spacing': {'median': [1, 1, 5]}}}}; "
            "print(planning.derive_anisotropy(stats)[0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5.0"


def test_ct_windows_are_checked_only_where_the_run_is_ct(data):
    """The config check uses the run's modality, as the bundles will: CT windows mean nothing to an MRI run."""
    wrong = {"ct_windows_hu": [[80, 40]]}
    assert "ct_windows_hu entry [80.0, 40.0] must have high > low" in problems(data, config_overrides=wrong)
    report = check_ct(str(data / "datalist.json"), str(data), modality="mri", config_overrides=wrong)
    assert report["errors"] == []
