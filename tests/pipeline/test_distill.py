"""The distill stage's pieces: which model predicts, the profile key, the student's configuration and bundle.

The stage end to end (teacher maps, fold students, the student, predict and export with it) is in
test_pipeline_cli.py, on the tiny run's work dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from autoseg2d.pipeline.distill import all_cases_bundle, best_configuration, describe_model, load_model
from autoseg2d.run.eta import planned_trainings
from autoseg2d.pipeline.predict import EnsemblePredictor
from autoseg2d.run.profiles import ProfileError, load_profile, profile_sha256
from autoseg2d.run.workdir import WorkDir, WorkDirError

ENSEMBLE = {"mode": "mean",
            "members": [{"bundle": "b/segresnet2d_0", "fold": 0}, {"bundle": "b/segresnet2d_1", "fold": 1}]}
STUDENT = {"model": "student", "mode": "mean", "members": [{"bundle": "b/segresnet2d_all", "fold": -1}]}


def work_with(tmp_path, *, ensemble: bool, student: bool) -> WorkDir:
    work = WorkDir.create(tmp_path / "work")
    for wanted, path, content in ((ensemble, work.ensemble_file, ENSEMBLE), (student, work.student_file, STUDENT)):
        if wanted:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content))
    return work


def test_the_student_predicts_by_default_where_there_is_one(tmp_path):
    work = work_with(tmp_path, ensemble=True, student=True)
    assert load_model(work) == STUDENT and load_model(work, "student") == STUDENT
    assert load_model(work, "ensemble") == ENSEMBLE
    assert describe_model(STUDENT).startswith("the student") and describe_model(ENSEMBLE).endswith("2 members")


def test_without_a_student_the_ensemble_predicts_and_asking_for_one_says_how_to_get_it(tmp_path):
    work = work_with(tmp_path, ensemble=True, student=False)
    assert load_model(work) == ENSEMBLE
    with pytest.raises(WorkDirError, match="has no student .*distill is true.*--model ensemble"):
        load_model(work, "student")
    with pytest.raises(ValueError, match="--model 'best': choose student or ensemble"):
        load_model(work, "best")
    with pytest.raises(WorkDirError, match="no ensemble in"):
        load_model(work_with(tmp_path / "empty", ensemble=False, student=False))


def test_a_student_writes_masks_under_its_own_record():
    ensemble = EnsemblePredictor(WorkDir(Path("/w")), ENSEMBLE)
    student = EnsemblePredictor(WorkDir(Path("/w")), STUDENT)
    assert "model" not in ensemble.record("scan")  # masks written before students existed stay kept
    assert student.record("scan")["model"] == "student" and student.record("scan") != ensemble.record("scan")


def test_distill_is_a_profile_key_that_does_not_change_the_run(tmp_path):
    profile = load_profile("demo")
    assert profile["distill"] is False
    assert profile_sha256({**profile, "distill": True}) == profile_sha256(profile)  # added after the ensemble
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"base": "demo", "distill": "yes"}))
    with pytest.raises(ProfileError, match="distill is 'yes'; give true"):
        load_profile(str(mine))


def test_the_clock_plans_one_student_per_fold_and_one_on_every_case():
    profile = load_profile("demo")
    assert "distill" not in planned_trainings(profile, num_folds=5)
    assert planned_trainings({**profile, "distill": True}, num_folds=5)["distill"] == 6


def test_the_student_takes_the_configuration_with_the_best_mean_validation_dice():
    a, b = {"input_variant": "slices", "learning_rate": 0.003}, {"input_variant": "both", "learning_rate": 0.002}
    records = [{"settings": a, "score": 0.9}, {"settings": a, "score": 0.5},  # mean 0.70
               {"settings": b, "score": 0.8}, {"settings": b, "score": 0.7}]  # mean 0.75
    assert best_configuration(records) == b


def test_the_student_on_every_case_is_a_fold_minus_one_copy_of_fold_0s_bundle(tmp_path):
    fold0 = tmp_path / "config" / "segresnet2d_0"
    (fold0 / "configs").mkdir(parents=True)
    (fold0 / "scripts").mkdir()
    (fold0 / "scripts" / "train.py").write_text("# trainer\n")
    (fold0 / "model").mkdir()
    (fold0 / "model" / "model.pt").write_bytes(b"weights of fold 0")
    (fold0 / "configs" / "hyper_parameters.yaml").write_text(
        "# Filled by Segresnet2dAlgo.fill_template_config.\n" + yaml.safe_dump({"fold": 0, "bundle_root": str(fold0),
                                                                               "learning_rate": 0.003}))
    bundle = all_cases_bundle(tmp_path / "config")
    config_text = (bundle / "configs" / "hyper_parameters.yaml").read_text()
    assert config_text.startswith("# Filled by")
    assert yaml.safe_load(config_text) == {"fold": -1, "bundle_root": str(bundle.resolve()), "learning_rate": 0.003}
    assert (bundle / "scripts" / "train.py").is_file() and not (bundle / "model").exists()
    assert all_cases_bundle(tmp_path / "config") == bundle  # made once
