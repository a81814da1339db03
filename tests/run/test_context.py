"""The run context: resolved once from the options, run.json and the defaults; the stages only receive it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml

from autoseg2d.run import profiles

from autoseg2d.pipeline import runner
from autoseg2d.run.context import resolve_context
from autoseg2d.pipeline.runner import run_pipeline
from autoseg2d.synthetic.head_ct import write_dataset
from tests.conftest import TEMPLATES


def resolve_again(work, **options):
    asked = {"datalist": None, "dataroot": None, "profile": None, "modality": None, "num_folds": None,
             "storage": None, "skip_bad": False, **options}
    return resolve_context(str(work), **asked)


def test_a_rerun_resolves_every_option_from_run_json(foldless, tmp_path):
    work = tmp_path / "work"
    run_pipeline(str(foldless), str(foldless.parent), work_dir=str(work), profile="demo", num_folds=3, until="check")
    context = resolve_again(work)
    assert context.source_datalist == foldless.resolve()
    assert context.datalist == work / "datalist_with_folds.json"  # the copy with folds added is what trains
    assert (context.dataroot, context.modality, context.profile_name, context.num_folds) == (
        foldless.parent.resolve(), "ct", "demo", 3)
    assert context.profile == profiles.load_profile("demo")
    assert sorted({e["fold"] for e in context.training}) == [0, 1, 2] and len(context.testing) == 1
    assert context.sweep_storage == f"sqlite:///{work / 'sweep' / 'optuna.db'}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.num_folds = 2


def test_the_bad_cases_left_out_are_left_out_of_the_context(tmp_path):
    datalist = write_dataset(tmp_path / "data", num_train=6, num_test=0, num_folds=2, size=32, num_slices=4)
    first = tmp_path / "data" / json.loads(datalist.read_text())["training"][0]["image"]
    image = nib.load(str(first))
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(first))
    context = resolve_context(str(tmp_path / "work"), str(datalist), str(datalist.parent), "demo", None, None, None,
                              skip_bad=True)
    assert context.source_datalist == datalist.resolve()
    assert context.datalist.name == "datalist_checked.json" and len(context.training) == 5
    assert first.name not in {e["image"].split("/")[-1] for e in context.training}


def test_the_default_folds_come_from_profiles_yaml(foldless, tmp_path, monkeypatch):
    edited = yaml.safe_load(profiles.PROFILES_FILE.read_text())
    edited["defaults"]["num_folds"] = 3
    copy = tmp_path / "profiles.yaml"
    copy.write_text(yaml.safe_dump(edited, sort_keys=False))
    monkeypatch.setattr(profiles, "PROFILES_FILE", copy)
    summary = run_pipeline(str(foldless), str(foldless.parent), work_dir=str(tmp_path / "work"), profile="demo",
                           until="check")
    assert summary["num_folds"] == 3


def test_a_missing_default_names_the_file_and_key(tmp_path, monkeypatch):
    edited = yaml.safe_load(profiles.PROFILES_FILE.read_text())
    del edited["defaults"]["profile"]
    copy = tmp_path / "profiles.yaml"
    copy.write_text(yaml.safe_dump(edited, sort_keys=False))
    monkeypatch.setattr(profiles, "PROFILES_FILE", copy)
    with pytest.raises(profiles.ProfileError, match=rf"{copy} lacks defaults.profile"):
        profiles.default_profile_name()
    assert "defaults" not in profiles.built_in_profiles()
    with pytest.raises(profiles.ProfileError, match="unknown profile 'defaults'; choose one of gpu, cpu, demo"):
        profiles.load_profile("defaults")


def test_the_default_modality_is_the_templates(foldless, tmp_path, monkeypatch):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES / "segresnet2d", templates / "segresnet2d",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = templates / "segresnet2d" / "configs" / "hyper_parameters.yaml"
    config.write_text(config.read_text().replace("\nmodality: ct ", "\nmodality: mri "))
    monkeypatch.setenv("SEGRESNET2D_TEMPLATES", str(templates))
    summary = run_pipeline(str(foldless), str(foldless.parent), work_dir=str(tmp_path / "work"), profile="demo",
                           num_folds=2, until="check")
    assert json.loads((tmp_path / "work" / "run.json").read_text())["modality"] == "mri"
    assert summary["num_folds"] == 2


def test_the_stages_run_in_order_on_one_context_and_stop_at_until(foldless, tmp_path, monkeypatch):
    seen = []
    for name in runner.STAGES:
        monkeypatch.setitem(runner.STAGES, name, lambda context, outputs, name=name: seen.append((name, context)))
    run_pipeline(str(foldless), str(foldless.parent), work_dir=str(tmp_path / "work"), profile="demo", num_folds=2,
                 until="crossval")
    assert [name for name, _ in seen] == ["analyze", "sweep", "crossval"]
    assert len({id(context) for _, context in seen}) == 1
    assert runner.STAGE_NAMES == ("check", "analyze", "sweep", "crossval", "ensemble", "distill", "predict")


def test_an_unknown_stage_lists_the_stages(tmp_path):
    with pytest.raises(ValueError, match="until='train' is not a stage; choose one of check, analyze, sweep, "
                                         "crossval, ensemble, distill, predict"):
        run_pipeline(work_dir=str(tmp_path / "work"), until="train")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("skip_bad", [False, True])
def test_the_check_stage_reads_the_datalist_once_and_checks_the_runs_identity_once(foldless, tmp_path, monkeypatch,
                                                                                   skip_bad):
    """Every datalist file (the source, the copy with folds, the check's copy) is read at most once, and run.json
    is compared once, with everything the run depends on; a rerun is the same run."""
    from pathlib import Path

    from autoseg2d.run.workdir import WorkDir

    reads, checks = [], []
    for method in ("read_bytes", "read_text"):
        original = getattr(Path, method)
        monkeypatch.setattr(Path, method, lambda self, *a, original=original, **k: (
            reads.append(self.name), original(self, *a, **k))[1])
    check_same_run = WorkDir.check_same_run
    monkeypatch.setattr(WorkDir, "check_same_run", lambda self, identity: (
        checks.append(sorted(identity)), check_same_run(self, identity))[1])
    for _ in range(2):
        reads.clear()
        checks.clear()
        context = resolve_context(str(tmp_path / "work"), str(foldless), str(foldless.parent), "demo", None, 2,
                                  None, skip_bad)
        assert context.datalist.name == "datalist_with_folds.json" and len(context.training) == 6
        assert [name for name in reads if name.endswith(".json") and name != "run.json"] == ["datalist.json"]
        assert checks == [["datalist_sha256", "modality", "num_folds", "profile", "profile_sha256",
                           "used_datalist_sha256"]]
