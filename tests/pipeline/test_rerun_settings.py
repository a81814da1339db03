"""A rerun of a work dir must use the settings its results were made with (checked before anything is written)."""

from __future__ import annotations

import json

import pytest
import yaml

from autoseg2d.run.profiles import load_profile
from autoseg2d.pipeline.runner import run_pipeline
from autoseg2d.run.workdir import WorkDirError


def check_stage(datalist, work, **options):
    return run_pipeline(str(datalist), str(datalist.parent), work_dir=str(work), profile="demo", until="check",
                        **options)


def folds_in(work) -> list[int]:
    copy = json.loads((work / "datalist_with_folds.json").read_text())
    return sorted({e["fold"] for e in copy["training"]})


def test_rerun_keeps_the_fold_count_and_refuses_another(foldless, tmp_path):
    work = tmp_path / "work"
    assert check_stage(foldless, work, num_folds=3)["num_folds"] == 3
    assert check_stage(foldless, work)["num_folds"] == 3  # not redrawn into the default 5
    with pytest.raises(WorkDirError, match=r"num_folds 3 -> 5"):
        check_stage(foldless, work, num_folds=5)
    assert folds_in(work) == [0, 1, 2]  # refused before the fold copy was rewritten


def test_rerun_refuses_another_profile_or_modality(foldless, tmp_path):
    work = tmp_path / "work"
    check_stage(foldless, work, num_folds=2)
    with pytest.raises(WorkDirError, match=r"profile 'demo' -> 'cpu'"):
        run_pipeline(work_dir=str(work), profile="cpu", until="check")
    with pytest.raises(WorkDirError, match=r"modality 'ct' -> 'mri'"):
        check_stage(foldless, work, modality="mri")
    run = json.loads((work / "run.json").read_text())
    assert (run["profile"], run["modality"], run["num_folds"]) == ("demo", "ct", 2)


def test_an_edited_profile_file_is_another_profile(foldless, tmp_path):
    profile = tmp_path / "mine.yaml"
    settings = {key: value for key, value in load_profile("demo").items() if key != "name"}
    profile.write_text(yaml.safe_dump(settings))
    work = tmp_path / "work"
    run_pipeline(str(foldless), str(foldless.parent), work_dir=str(work), profile=str(profile), num_folds=2,
                 until="check")
    settings["sweep_trials"] += 1
    profile.write_text(yaml.safe_dump(settings))
    with pytest.raises(WorkDirError, match="profile_sha256"):
        run_pipeline(work_dir=str(work), until="check")


def test_a_profile_file_that_adds_distill_to_the_runs_profile_continues_the_run(foldless, tmp_path):
    work = tmp_path / "work"
    check_stage(foldless, work, num_folds=2)
    distilling, other = tmp_path / "distill.yaml", tmp_path / "other.yaml"
    distilling.write_text(yaml.safe_dump({"base": "demo", "distill": True}))
    run_pipeline(work_dir=str(work), profile=str(distilling), until="check")
    assert json.loads((work / "run.json").read_text())["profile"] == str(distilling)  # a rerun takes it from here
    other.write_text(yaml.safe_dump({"base": "demo", "distill": True, "sweep_trials": 4}))
    with pytest.raises(WorkDirError, match="profile_sha256"):
        run_pipeline(work_dir=str(work), profile=str(other), until="check")


def test_another_datalist_is_refused_before_its_folds_are_written(foldless, tmp_path):
    work = tmp_path / "work"
    check_stage(foldless, work, num_folds=3)
    content = json.loads(foldless.read_text())
    content["training"].pop()
    foldless.write_text(json.dumps(content))
    with pytest.raises(WorkDirError, match="datalist_sha256"):
        check_stage(foldless, work)
    assert len(json.loads((work / "datalist_with_folds.json").read_text())["training"]) == 6  # untouched
