"""The distill stage's pieces: which model predicts, the profile key, the student's configuration and bundle.

The stage end to end (teacher maps, fold students, the student, predict and export with it) is in
test_pipeline_cli.py, on the tiny run's work dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from autoseg2d.pipeline.distill import all_cases_bundle, best_configuration, describe_model, load_model
from autoseg2d.run.eta import planned_trainings
from autoseg2d.pipeline.predict import EnsemblePredictor, ensemble_identity
from autoseg2d.run.profiles import ProfileError, load_profile, profile_sha256
from autoseg2d.run.workdir import WorkDir, WorkDirError

ENSEMBLE = {"mode": "mean",
            "members": [{"bundle": "b/segresnet2d_0", "fold": 0}, {"bundle": "b/segresnet2d_1", "fold": 1}]}
STUDENT = {"model": "student", "mode": "mean", "members": [{"bundle": "b/segresnet2d_all", "fold": -1}],
           "teacher": ensemble_identity(ENSEMBLE)}


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


def teacher_setup(tmp_path, monkeypatch, store: bool):
    """stored_ensemble's six cases in two folds and three members (folds 0, 0, 1) in a work dir with its
    ensemble.json; members load as FixedInferers that refuse a case they trained on."""
    from autoseg2d.pipeline import predict as predict_module
    from tests.ensemble_fakes import FixedInferer
    from tests.pipeline.test_out_of_fold import member_lesion, stored_ensemble

    _, ensemble, data = stored_ensemble(tmp_path, "mean", store=store)
    work = WorkDir(tmp_path.resolve())
    work.ensemble_file.parent.mkdir(parents=True)
    work.ensemble_file.write_text(json.dumps(ensemble))
    folds = {e["image"]: e["fold"] for e in data["training"]}
    loaded = []

    class OutOfFold(FixedInferer):
        def __init__(self, index: int, fold: int):
            super().__init__(member_lesion(index))
            self.fold = fold

        def infer(self, image):
            assert folds[Path(image).name] == self.fold, f"a member of fold {self.fold} predicted {image}"
            return super().infer(image)

    def load(bundle):
        index = int(bundle.name[1:])
        loaded.append(index)
        return OutOfFold(index, ensemble["members"][index]["fold"])

    monkeypatch.setattr(predict_module, "load_inferer", load)
    return work, ensemble, data, loaded


def test_teacher_maps_are_the_mean_of_the_members_that_did_not_train_on_each_case(tmp_path, monkeypatch):
    from autoseg2d.pipeline.distill import write_teacher_maps
    from autoseg2d.run.fold_probabilities import quantize
    from tests.pipeline.test_out_of_fold import member_lesion

    for store in (True, False):  # read from the stored cross-validation maps, or the members run
        root = tmp_path / str(store)
        root.mkdir()
        work, ensemble, data, loaded = teacher_setup(root, monkeypatch, store)
        folder = write_teacher_maps(work, ensemble, **data)
        assert bool(loaded) != store  # stored maps: no member loads
        for entry in data["training"]:
            members = [i for i, m in enumerate(ensemble["members"]) if m["fold"] == entry["fold"]]
            expected = np.mean([member_lesion(i) for i in members], axis=0)
            with np.load(folder / entry["image"].replace(".nii.gz", ".npz")) as stored:
                assert stored["foreground"].dtype == np.uint8
                np.testing.assert_allclose(stored["foreground"], quantize(expected), atol=1)  # stored maps: 1/255


def test_a_changed_ensemble_gets_new_teacher_maps_and_a_fold_without_members_is_refused(tmp_path, monkeypatch):
    from autoseg2d.pipeline.distill import write_teacher_maps

    work, ensemble, data, _ = teacher_setup(tmp_path, monkeypatch, store=True)
    first = write_teacher_maps(work, ensemble, **data)
    changed = {**ensemble, "members": ensemble["members"][1:]}  # m1 (fold 0) and m2 (fold 1)
    second = write_teacher_maps(work, changed, **data)
    assert first != second and first.parent == second.parent  # the students' configuration names the folder
    with pytest.raises(WorkDirError, match="fold 0 has no member in ensemble/ensemble.json.*delete that file"):
        write_teacher_maps(work, {**ensemble, "members": ensemble["members"][2:]}, **data)


def test_a_student_of_another_ensemble_is_refused_with_the_fix(tmp_path):
    work = work_with(tmp_path, ensemble=True, student=True)
    assert load_model(work)["model"] == "student"
    work.ensemble_file.write_text(json.dumps({**ENSEMBLE, "mode": "vote"}))  # rebuilt since
    with pytest.raises(WorkDirError, match="distilled from another ensemble.*run the distill stage again"):
        load_model(work)
    assert load_model(work, "ensemble")["mode"] == "vote"


def test_export_checks_the_model_it_is_asked_for(tmp_path):
    from autoseg2d.export.bundle import export_bundle

    work = work_with(tmp_path, ensemble=True, student=False)
    with pytest.raises(ValueError, match="--model 'studnet': choose student or ensemble"):
        export_bundle(str(work.root), str(tmp_path / "out"), model="studnet")
    with pytest.raises(WorkDirError, match="has no student"):
        export_bundle(str(work.root), str(tmp_path / "out"), model="student")
