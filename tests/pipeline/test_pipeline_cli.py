"""run_autoseg.py end to end on a tiny generated set: outputs are right, and a rerun redoes nothing."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml

from autoseg2d.evaluation.metrics import dice_score
from autoseg2d.synthetic.head_ct import write_dataset
from tests.conftest import DEMO_TRAINING, REPO, TINY_NETWORK

TINY_PROFILE = {
    "sweep_trials": 2,
    "sweep_folds": [0],
    "cv_top_variants": 1,
    "cv_runs": 1,
    "ensemble_size": 2,
    "ensemble_mode": "mean",
    "ensemble_selection": "fold_balanced",
    "ensemble_tolerance": None, "ensemble_screen_below": 0.05,
    "train_overrides": {**DEMO_TRAINING, "num_epochs": 15, "num_epochs_per_validation": 5, **TINY_NETWORK},
    "search_space": {"input_variant": {"choices": ["slices", "windows"]},
                     "learning_rate": {"low": 0.002, "high": 0.004, "log": True}},
}


def run_cli(*args: str, cwd) -> str:
    result = subprocess.run([sys.executable, str(REPO / "run_autoseg.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    datalist = write_dataset(root / "data", num_train=6, num_test=2, num_folds=2, num_slices=8)
    profile = root / "tiny.yaml"
    profile.write_text(yaml.safe_dump(TINY_PROFILE))
    args = ("--datalist", str(datalist), "--dataroot", str(datalist.parent), "--work_dir", str(root / "work"),
            "--profile", str(profile))
    first = run_cli(*args, cwd=root)
    second = run_cli(*args, cwd=root)
    return root, first, second


def test_outputs_exist_and_are_right(tiny_run):
    root, first, _ = tiny_run
    work = root / "work"
    assert "=== stage 7/7: predict ===" in first
    assert "fold 0: best Dice" in first and "15 epochs in" in first  # one line per trained fold
    assert "epoch 15/15 loss" not in first  # the trainer's per-epoch lines stay in each bundle's training.log
    assert "planned " not in first  # the planning notes go to the log file, once per configuration (trial)
    assert (work / "autoseg.log").read_text().count(": planned ") == 2
    testing = json.loads((root / "data" / "datalist.json").read_text())["testing"]
    for entry in testing:
        source = nib.load(str(root / "data" / entry["image"]))
        mask = nib.load(str(work / "predictions" / entry["image"].split("/")[-1]))
        assert mask.shape == source.shape
        assert mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, source.affine)
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}

    table = (work / "reports" / "cross_validation.md").read_text()
    assert "| fold |" in table and "| Dice |" in table.replace("Dice | RVD", "Dice |")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(run 0)" in line]
    assert len(rows) == 4  # two folds, the pooled row and the folds that did not choose the configuration
    assert "| 0 (chose config) |" in table and "| other folds |" in table

    ensemble = json.loads((work / "ensemble" / "ensemble.json").read_text())
    assert len(ensemble["members"]) == 2
    assert {m["fold"] for m in ensemble["members"]} == {0, 1}
    assert all(not m["bundle"].startswith("/") for m in ensemble["members"])  # portable work dir
    run = json.loads((work / "run.json").read_text())
    assert run["profile"].endswith("tiny.yaml")


# Lesions are ~1 % of the voxels, so a model that finds nothing (Dice ~1e-7 per case) or marks noise scores
# below 0.05. At 6 epochs the tiny run scored 0.02 (it had learned nothing yet), so it trains 15; then it scored
# 0.76 and 0.84 on these held-back cases (torch 2.13 CPU). 0.3 leaves room for other CPUs and library versions
# while still failing a pipeline whose models learned nothing. A fixed 50-150 HU threshold scores higher on this
# generator, so whether a model beats thresholding is test_hard_accuracy.py's question, on the hard generator.
HELD_BACK_DICE_FLOOR = 0.3


def test_held_back_cases_score_above_a_floor(tiny_run):
    root, _, _ = tiny_run
    testing = json.loads((root / "data" / "datalist.json").read_text())["testing"]
    scores = []
    for entry in testing:
        truth = np.asanyarray(nib.load(str(root / "data" / entry["label"])).dataobj) > 0
        mask = np.asanyarray(nib.load(str(root / "work" / "predictions" / entry["image"].split("/")[-1])).dataobj)
        scores.append(dice_score(mask > 0, truth))
    print(f"held-back Dice {[round(s, 3) for s in scores]}")
    assert np.mean(scores) > HELD_BACK_DICE_FLOOR


def test_second_run_redoes_nothing(tiny_run):
    _, first, second = tiny_run
    assert "best Dice" in first
    assert " epochs in " not in second  # no training process started
    assert "trials already finished" in second
    assert second.count("already trained") == 2
    assert "reusing ensemble/ensemble.json" in second
    assert second.count("done before by this ensemble from this scan, kept") == 2


def test_predict_command_writes_volumes(tiny_run, tmp_path):
    root, _, _ = tiny_run
    output = run_cli("predict", "--input", str(root / "data" / "imagesTs"), "--output", str(tmp_path / "masks"),
                     "--work_dir", str(root / "work"), cwd=root)
    assert output.count("hemorrhage") == 2 and " mL" in output
    masks = sorted(p.name for p in (tmp_path / "masks").glob("*.nii.gz"))
    assert masks == ["case_006.nii.gz", "case_007.nii.gz"]
    rows = list(csv.DictReader((tmp_path / "masks" / "report.csv").open()))
    assert [row["case"] for row in rows] == ["case_006", "case_007"]
    assert all(row["member_dice_mean"] and row["seconds"] for row in rows)  # two members: agreement measured
    assert (tmp_path / "masks" / "qa" / "contact_sheet.png").exists()


def test_predict_command_reads_dicom_series_and_writes_seg(tiny_run, tmp_path):
    from tests.dicom.series_writer import write_series

    root, _, _ = tiny_run
    for case in ("case_006", "case_007"):
        write_series(root / "data" / "imagesTs" / f"{case}.nii.gz", tmp_path / "dicom" / case)
    run_cli("predict", "--input", str(tmp_path / "dicom"), "--output", str(tmp_path / "masks"), "--work_dir",
            str(root / "work"), "--dicom_seg", cwd=root)
    for case in ("case_006", "case_007"):
        ours = nib.as_closest_canonical(nib.load(str(tmp_path / "masks" / f"{case}.nii.gz")))
        theirs = nib.as_closest_canonical(nib.load(str(root / "work" / "predictions" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-5)
        assert (tmp_path / "masks" / f"{case}.seg.dcm").is_file()


def test_a_moved_work_dir_still_predicts(tiny_run, tmp_path):
    root, _, _ = tiny_run
    moved = tmp_path / "elsewhere" / "work"
    shutil.copytree(root / "work", moved)
    output = run_cli("predict", "--input", str(root / "data" / "imagesTs"), "--output", str(tmp_path / "masks"),
                     "--work_dir", str(moved), cwd=tmp_path)
    assert output.count("hemorrhage") == 2


@pytest.fixture(scope="module")
def distilled_run(tiny_run, tmp_path_factory):
    """The tiny run's work dir, copied, continued with distill on: 2 fold students and 1 on every case."""
    root, _, _ = tiny_run
    copy = tmp_path_factory.mktemp("distilled")
    shutil.copytree(root / "work", copy / "work")
    profile = copy / "tiny_distill.yaml"
    profile.write_text(yaml.safe_dump({**TINY_PROFILE, "distill": True}))
    args = ("--datalist", str(root / "data" / "datalist.json"), "--dataroot", str(root / "data"), "--work_dir",
            str(copy / "work"), "--profile", str(profile))
    first = run_cli(*args, cwd=copy)
    second = run_cli(*args, cwd=copy)
    return root, copy / "work", first, second


def test_distill_trains_a_student_from_out_of_fold_teacher_maps(distilled_run):
    from autoseg2d.pipeline.predict import ensemble_identity
    from autoseg2d.run.fold_probabilities import mean_foreground, quantize

    root, work, first, second = distilled_run
    assert "=== stage 6/7: distill ===" in first and first.count(" epochs in ") == 3  # 2 fold students + 1
    student = json.loads((work / "student" / "student.json").read_text())
    ensemble = json.loads((work / "ensemble" / "ensemble.json").read_text())
    assert student["model"] == "student" and len(student["members"]) == 1 and student["postprocessing"]
    assert sorted(m["fold"] for m in student["fold_students"]) == [0, 1]
    config = yaml.safe_load((work / student["members"][0]["bundle"] / "configs" / "hyper_parameters.yaml").read_text())
    teacher = work / "student" / f"teacher-{ensemble_identity(ensemble)[:10]}"
    assert config["fold"] == -1 and config["distill_targets"] == str(teacher)
    member = yaml.safe_load((work / ensemble["members"][0]["bundle"] / "configs" / "hyper_parameters.yaml").read_text())
    assert config["num_epochs"] == 2 * member["num_epochs"] == 30  # twice the members' budget
    training = json.loads((root / "data" / "datalist.json").read_text())["training"]
    for entry in training:  # each case's target: the mean of its own fold's members, none of which trained on it
        case = entry["image"].split("/")[-1].replace(".nii.gz", "")
        members = [work / m["bundle"] for m in ensemble["members"] if m["fold"] == entry["fold"]]
        with np.load(teacher / f"{case}.npz") as stored:
            np.testing.assert_array_equal(stored["foreground"], quantize(mean_foreground(members, case)))
    table = (work / "reports" / "student_cross_validation.md").read_text()
    assert "| student | all |" in table and "(run 0)" in table  # the student beside the members
    assert "distill: reusing student/student.json" in second and " epochs in " not in second


def test_predict_uses_the_student_unless_asked_for_the_ensemble(distilled_run, tmp_path):
    root, work, first, _ = distilled_run
    rows = list(csv.DictReader((work / "predictions" / "report.csv").open()))
    assert [row["model"] for row in rows] == ["student", "student"]  # the pipeline's own predict stage
    assert all(row["members_compared"] == "1" and not row["member_dice_mean"] for row in rows)  # nothing to compare
    for model, expected in ((None, "student"), ("ensemble", "ensemble"), ("student", "student")):
        out = tmp_path / str(model)
        run_cli("predict", "--input", str(root / "data" / "imagesTs"), "--output", str(out), "--work_dir", str(work),
                *(("--model", model) if model else ()), cwd=tmp_path)
        rows = list(csv.DictReader((out / "report.csv").open()))
        assert [row["model"] for row in rows] == [expected, expected]
        assert all(bool(row["member_dice_mean"]) == (expected == "ensemble") for row in rows)
    import pydicom

    from tests.dicom.series_writer import write_series

    write_series(root / "data" / "imagesTs" / "case_006.nii.gz", tmp_path / "dicom" / "case_006")
    run_cli("predict", "--input", str(tmp_path / "dicom"), "--output", str(tmp_path / "seg"), "--work_dir", str(work),
            "--dicom_seg", cwd=tmp_path)
    assert pydicom.dcmread(str(tmp_path / "seg" / "case_006.seg.dcm")).ManufacturerModelName == "segresnet2d student"


def test_export_writes_the_student_as_the_one_model(distilled_run, tmp_path):
    _, work, _, _ = distilled_run
    run_cli("export", "--work_dir", str(work), "--output", str(tmp_path / "bundle"), cwd=tmp_path)
    student = json.loads((work / "student" / "student.json").read_text())
    trained = (work / student["members"][0]["bundle"] / "model" / "model.pt").read_bytes()
    assert (tmp_path / "bundle" / "models" / "model.pt").read_bytes() == trained
    assert sorted(p.name for p in (tmp_path / "bundle" / "models").iterdir()) == ["labels.csv", "member_0", "model.pt"]
    assert "student" in json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())["name"]
    run_cli("export", "--work_dir", str(work), "--output", str(tmp_path / "ensemble"), "--model", "ensemble",
            cwd=tmp_path)
    assert len(list((tmp_path / "ensemble" / "models").glob("member_*"))) == 2
