"""Budget profiles: the built-in ones load, a profile file takes what it leaves out from its base profile, and a
wrong key, search space or first learning rate is refused before any training."""

from __future__ import annotations

import logging

import pytest
import yaml

from autoseg2d.run import profiles
from autoseg2d.run.profiles import ProfileError, first_trial_params, load_profile, profile_sha256
from autoseg2d.templates import template_config

NEW_IN_THIS_RELEASE = ("ensemble_selection", "ensemble_tolerance", "ensemble_screen_below")


@pytest.mark.parametrize("name", ["gpu", "cpu", "demo"])
def test_built_in_profiles_load(name):
    assert load_profile(name)["search_space"]["input_variant"]["choices"]


def _profile_file(tmp_path, **keys) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(keys))
    return str(path)


def test_a_profile_file_of_the_previous_release_takes_the_new_keys_from_its_base(tmp_path, caplog):
    cpu = load_profile("cpu")
    old = {key: value for key, value in cpu.items() if key not in (*NEW_IN_THIS_RELEASE, "name")}
    old["ensemble_size"] = 3
    with caplog.at_level(logging.INFO, logger=profiles.__name__):
        mine = load_profile(_profile_file(tmp_path, base="cpu", **old))
    assert {key: mine[key] for key in NEW_IN_THIS_RELEASE} == {key: cpu[key] for key in NEW_IN_THIS_RELEASE}
    assert mine["ensemble_size"] == 3 and mine["train_overrides"] == cpu["train_overrides"]
    said = [r.getMessage() for r in caplog.records if "from the base profile" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(f"{', '.join(NEW_IN_THIS_RELEASE)} from the base profile 'cpu'")


def test_the_default_base_is_the_default_profile_and_a_complete_file_takes_nothing(tmp_path, caplog):
    gpu = load_profile("gpu")
    mine = load_profile(_profile_file(tmp_path, sweep_trials=2))
    assert mine == {**gpu, "name": mine["name"], "sweep_trials": 2}
    complete = {key: value for key, value in gpu.items() if key != "name"}
    with caplog.at_level(logging.INFO, logger=profiles.__name__):
        assert load_profile(_profile_file(tmp_path, base="demo", **complete))["ensemble_size"] == gpu["ensemble_size"]
    assert not [r for r in caplog.records if "from the base profile" in r.getMessage()]


def test_an_unknown_key_or_base_is_refused_naming_the_valid_ones(tmp_path):
    with pytest.raises(ProfileError, match=r"unknown key ensemble_sise \(did you mean ensemble_size\?\); valid keys "
                                           r"are base, sweep_trials, .*, search_space"):
        load_profile(_profile_file(tmp_path, ensemble_sise=4))
    with pytest.raises(ProfileError, match=r"unknown keys name, seed; valid keys are base"):
        load_profile(_profile_file(tmp_path, name="mine", seed=1))
    with pytest.raises(ProfileError, match="base 'laptop' is not a built-in profile; choose one of gpu, cpu, demo"):
        load_profile(_profile_file(tmp_path, base="laptop"))


def test_shared_keys_have_one_owner(tmp_path, monkeypatch):
    """A key every profile shares lives in `defaults` only; a profile that restates it, or a section with a key
    that is no profile key, is refused or caught here."""
    content = yaml.safe_load(profiles.PROFILES_FILE.read_text())
    shared = {key for key in content["defaults"] if key in profiles.PROFILE_KEYS}
    assert shared, "the shared profile keys live in defaults"
    for name, own in content.items():
        if name != "defaults":
            assert not shared & set(own), f"profile {name} restates shared keys {shared & set(own)}"
            assert set(load_profile(name)) == {"name", *profiles.PROFILE_KEYS}
    content["cpu"]["ensemble_sise"] = 4
    copy = tmp_path / "profiles.yaml"
    copy.write_text(yaml.safe_dump(content, sort_keys=False))
    monkeypatch.setattr(profiles, "PROFILES_FILE", copy)
    with pytest.raises(ProfileError, match=rf"section 'cpu' of {copy}: unknown key ensemble_sise"):
        load_profile("gpu")


def test_a_misspelled_search_space_key_is_refused_with_the_likely_key(tmp_path):
    with pytest.raises(ProfileError, match=r"'learning_rte' is not a segresnet2d setting \(did you mean learning_rate"):
        load_profile(_profile_file(tmp_path, search_space={"learning_rte": {"low": 1e-4, "high": 1e-3}}))


def test_nested_keys_are_valid_and_a_bad_range_is_named(tmp_path):
    assert load_profile(_profile_file(tmp_path, search_space={"network#init_filters": {"choices": [8, 16]}}))
    with pytest.raises(ProfileError, match=r"search_space 'learning_rate' is \[0.001, 0.01\]; give \{choices"):
        load_profile(_profile_file(tmp_path, search_space={"learning_rate": [0.001, 0.01]}))


def test_each_first_trial_runs_the_learning_rate_the_bundle_trains_with():
    template_rate = yaml.safe_load(template_config().read_text())["learning_rate"]
    for name in ("gpu", "cpu", "demo"):
        profile = load_profile(name)
        rate = profile["train_overrides"].get("learning_rate", template_rate)
        assert first_trial_params(profile) == {"learning_rate": rate}
        space = profile["search_space"]["learning_rate"]
        assert space["low"] <= rate <= space["high"]
    assert "learning_rate" not in load_profile("gpu")["train_overrides"]  # the paper's rate, the template's own


def test_a_range_without_the_bundles_learning_rate_is_refused(tmp_path):
    template_rate = yaml.safe_load(template_config().read_text())["learning_rate"]
    narrow = {"learning_rate": {"low": template_rate * 5, "high": template_rate * 50, "log": True}}
    path = _profile_file(tmp_path, search_space=narrow)
    with pytest.raises(ProfileError, match=rf"profile '{path}' .*: search_space learning_rate {template_rate * 5:g}\.\."
                                           rf"{template_rate * 50:g} excludes {template_rate}, the learning_rate the "
                                           "bundle trains with \\(the template's"):
        load_profile(path)
    inside = {"learning_rate": template_rate * 10}
    assert first_trial_params(load_profile(_profile_file(tmp_path, search_space=narrow, train_overrides=inside))) \
        == inside
    assert first_trial_params(load_profile(_profile_file(tmp_path, search_space={}))) == {}


def test_ensemble_selection_and_tolerance_are_checked(tmp_path):
    assert load_profile(_profile_file(tmp_path, ensemble_selection="greedy", ensemble_tolerance=0.002))
    known = ", ".join(profiles.SELECTION_NAMES)
    with pytest.raises(ProfileError, match=f"ensemble_selection 'best' is not one of {known}"):
        load_profile(_profile_file(tmp_path, ensemble_selection="best"))
    with pytest.raises(ProfileError, match="ensemble_tolerance is -0.1; give a Dice difference >= 0"):
        load_profile(_profile_file(tmp_path, ensemble_selection="greedy", ensemble_tolerance=-0.1))
    with pytest.raises(ProfileError, match="applies only to ensemble_selection: greedy"):
        load_profile(_profile_file(tmp_path, ensemble_tolerance=0.01))
    assert load_profile(_profile_file(tmp_path, ensemble_screen_below=None))["ensemble_screen_below"] is None
    for wrong in (0.5, -0.01, "0.05", True):
        with pytest.raises(ProfileError, match="ensemble_screen_below is .*from 0 up to .*0.5"):
            load_profile(_profile_file(tmp_path, ensemble_screen_below=wrong))


def test_the_screen_setting_is_not_part_of_the_runs_identity():
    """A work dir made before screening existed (run.json's profile hash without the key), or one whose
    profile's ensemble_screen_below was edited, is the same run: the key changes only how a finished ensemble
    predicts. Any other key still makes another run."""
    gpu = load_profile("gpu")
    without = {key: value for key, value in gpu.items() if key != "ensemble_screen_below"}
    assert profile_sha256(without) == profile_sha256(gpu) == profile_sha256({**gpu, "ensemble_screen_below": None})
    assert profile_sha256({**gpu, "ensemble_size": 17}) != profile_sha256(gpu)


def test_the_planning_note_shows_what_the_bundle_trains_with_and_marks_the_profiles_values():
    """With the cpu profile, planning derives 5 levels and epochs, but the bundle trains [1, 2, 2, 4] for the
    profile's 1,200 optimizer steps: the note says so, and that those values are the profile's."""
    from autoseg2d.run.bundles import planning_note
    from autoseg2d.templates import template_module

    planning, bundle_config = template_module("planning"), template_module("bundle_config")
    template = yaml.safe_load(template_config().read_text())
    blocks, blocks_note = planning.derive_blocks_down([384, 384], template["network"]["blocks_down"])
    epochs, epochs_note = planning.derive_num_epochs(5000, template["num_epochs"], 5)
    notes = ["statistics from datastats.yaml", blocks_note, epochs_note]
    assert blocks_note.startswith(f"network.blocks_down {blocks}") and epochs_note.startswith(f"num_epochs {epochs}")

    overrides = load_profile("cpu")["train_overrides"]
    config = bundle_config.load_config(str(template_config()), **overrides)
    shown = planning_note(notes, config, overrides, {**overrides, "input_variant": "both", "seed": 0})
    assert shown[0] == notes[0]
    assert shown[1] == f"network.blocks_down {overrides['network#blocks_down']} (profile), not planning's {blocks_note}"
    assert shown[2] == f"num_steps {overrides['num_steps']} (profile), not planning's {epochs_note}"
    assert shown[3:] == [f"network.init_filters {overrides['network#init_filters']} (profile)",
                         f"network.dsdepth {overrides['network#dsdepth']} (profile)"]

    gpu = load_profile("gpu")["train_overrides"]
    assert planning_note(notes, bundle_config.load_config(str(template_config()), **gpu), gpu, {"seed": 0}) == notes


def test_the_ensemble_stage_implements_every_selection_a_profile_may_name():
    from autoseg2d.pipeline import ensemble

    assert {*ensemble.SELECTION_STRATEGIES, ensemble.GREEDY} == set(profiles.SELECTION_NAMES)
