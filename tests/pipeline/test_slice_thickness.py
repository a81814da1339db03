"""run_autoseg.py trains its template at any slice thickness; a profile can make thin slices a refusal."""

from __future__ import annotations

import pytest
import yaml

from autoseg2d.pipeline.analyze import analyze, settings_for_slice_thickness
from autoseg2d.pipeline.runner import run_pipeline
from autoseg2d.run.workdir import WorkDir
from autoseg2d.synthetic.head_ct import write_dataset
from tests.conftest import TINY_NETWORK

ONE_TRIAL = {
    "sweep_trials": 1, "sweep_folds": [0], "cv_top_variants": 1, "cv_runs": 1, "ensemble_size": 1,
    "ensemble_mode": "mean", "ensemble_selection": "fold_balanced", "ensemble_tolerance": None,
    "ensemble_screen_below": 0.05,
    "train_overrides": {"num_epochs": 1, "batch_size": 4, "num_workers": 0, **TINY_NETWORK},
    "search_space": {"input_variant": {"choices": ["slices"]}},
}


def thin_slice_run(tmp_path, spacing_mm, **train_overrides):
    datalist = write_dataset(tmp_path / "data", num_train=4, num_test=0, num_folds=2, num_slices=8,
                             spacing_mm=spacing_mm)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({**ONE_TRIAL, "train_overrides": {**ONE_TRIAL["train_overrides"],
                                                                        **train_overrides}}))
    return run_pipeline(str(datalist), str(datalist.parent), work_dir=str(tmp_path / "work"), profile=str(profile),
                        until="sweep")


def test_thin_slices_train_2d_with_one_note(tmp_path, caplog):
    """5 mm slices of 1.8 mm pixels (ratio 2.8): the issue's failed trial and traceback."""
    with caplog.at_level("INFO"):
        summary = thin_slice_run(tmp_path, (1.8, 1.8, 5.0))
    notes = [r.getMessage() for r in caplog.records if "training 2D anyway" in r.getMessage()]
    assert len(notes) == 1 and "slice/in-plane ratio 2.8 < min_anisotropy 3" in notes[0]
    assert summary["configurations"][0]["force_2d"] is True
    bundle = next((tmp_path / "work" / "bundles").glob("*/segresnet2d_0"))
    assert (bundle / "model" / "progress.yaml").is_file() and (bundle / "model" / "model.pt").is_file()


def test_a_profile_can_refuse_thin_slices(tmp_path):
    with pytest.raises(ValueError, match="ratio 2.8 < min_anisotropy 3, and the profile's train_overrides set "
                                         "force_2d: false"):
        thin_slice_run(tmp_path, (0.45, 0.45, 1.25), force_2d=False)
    assert not (tmp_path / "work" / "bundles").exists()  # refused before anything trained


@pytest.mark.parametrize(("spacing_mm", "expected"), [((0.45, 0.45, 1.25), {"force_2d": True}),
                                                      ((0.9, 0.9, 2.5), {"force_2d": True}),
                                                      ((0.45, 0.45, 5.0), {})])
def test_thin_slice_ct_is_forced_to_2d(tmp_path, spacing_mm, expected):
    datalist = write_dataset(tmp_path / "data", num_train=2, num_test=0, num_folds=2, size=32, num_slices=4,
                             spacing_mm=spacing_mm)
    work = WorkDir.create(tmp_path / "work")
    analyze(work, datalist, datalist.parent)
    assert settings_for_slice_thickness(work.datastats, {}) == expected
    assert settings_for_slice_thickness(work.datastats, {"force_2d": True}) == {}
