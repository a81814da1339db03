"""Budget profiles: the built-in ones load, and a wrong search space is refused before any training."""

from __future__ import annotations

import pytest
import yaml

from autoseg2d.pipeline.profiles import ProfileError, load_profile, profile_sha256


@pytest.mark.parametrize("name", ["gpu", "cpu", "demo"])
def test_built_in_profiles_load(name):
    assert load_profile(name)["search_space"]["input_variant"]["choices"]


def _profile_file(tmp_path, **search_space) -> str:
    profile = {**load_profile("demo"), "search_space": search_space}
    profile.pop("name")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def test_a_misspelled_search_space_key_is_refused_with_the_likely_key(tmp_path):
    with pytest.raises(ProfileError, match=r"'learning_rte' is not a segresnet2d setting \(did you mean learning_rate"):
        load_profile(_profile_file(tmp_path, learning_rte={"low": 1e-4, "high": 1e-3}))


def test_nested_keys_are_valid_and_a_bad_range_is_named(tmp_path):
    assert load_profile(_profile_file(tmp_path, **{"network#init_filters": {"choices": [8, 16]}}))
    with pytest.raises(ProfileError, match=r"search_space 'learning_rate' is \[0.001, 0.01\]; give \{choices"):
        load_profile(_profile_file(tmp_path, learning_rate=[0.001, 0.01]))


def _ensemble_profile(tmp_path, **ensemble_keys) -> str:
    profile = {**load_profile("demo"), **ensemble_keys}
    profile.pop("name")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def test_ensemble_selection_and_tolerance_are_checked(tmp_path):
    assert load_profile(_ensemble_profile(tmp_path, ensemble_selection="greedy", ensemble_tolerance=0.002))
    with pytest.raises(ProfileError, match="ensemble_selection 'best' is not one of fold_balanced, greedy"):
        load_profile(_ensemble_profile(tmp_path, ensemble_selection="best"))
    with pytest.raises(ProfileError, match="ensemble_tolerance -0.1; give a Dice difference >= 0|is -0.1"):
        load_profile(_ensemble_profile(tmp_path, ensemble_selection="greedy", ensemble_tolerance=-0.1))
    with pytest.raises(ProfileError, match="applies only to ensemble_selection: greedy"):
        load_profile(_ensemble_profile(tmp_path, ensemble_tolerance=0.01))
    assert load_profile(_ensemble_profile(tmp_path, ensemble_screen_below=None))["ensemble_screen_below"] is None
    for wrong in (0.5, -0.01, "0.05", True):
        with pytest.raises(ProfileError, match="ensemble_screen_below is .*from 0 up to .*0.5"):
            load_profile(_ensemble_profile(tmp_path, ensemble_screen_below=wrong))
    mine = yaml.safe_load(open(_ensemble_profile(tmp_path)))
    del mine["ensemble_selection"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(mine))
    with pytest.raises(ProfileError, match="lacks ensemble_selection"):
        load_profile(str(tmp_path / "old.yaml"))


def test_the_screen_setting_is_not_part_of_the_runs_identity():
    """A work dir made before screening existed (run.json's profile hash without the key), or one whose
    profile's ensemble_screen_below was edited, is the same run: the key changes only how a finished ensemble
    predicts. Any other key still makes another run."""
    gpu = load_profile("gpu")
    without = {key: value for key, value in gpu.items() if key != "ensemble_screen_below"}
    assert profile_sha256(without) == profile_sha256(gpu) == profile_sha256({**gpu, "ensemble_screen_below": None})
    assert profile_sha256({**gpu, "ensemble_size": 17}) != profile_sha256(gpu)
