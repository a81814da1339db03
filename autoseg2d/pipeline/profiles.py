"""Budget profiles (profiles.yaml): how many trials, folds, runs and ensemble members a run uses.

profiles.yaml also owns the driver's defaults (its `defaults` section): the profile and the
number of folds a run uses when neither the command line nor the work dir's run.json says.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path

import yaml

from autoseg2d.templates import template_config

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
PROFILE_KEYS = ("sweep_trials", "sweep_folds", "cv_top_variants", "cv_runs", "ensemble_size", "ensemble_mode",
                "ensemble_selection", "ensemble_tolerance", "ensemble_screen_below", "train_overrides",
                "search_space")
ENSEMBLE_MODES = ("mean", "vote")
DEFAULTS_SECTION = "defaults"  # in profiles.yaml; not a profile
DEFAULT_KEYS = ("profile", "num_folds")


class ProfileError(ValueError):
    pass


def load_profile(name: str) -> dict:
    """A built-in profile by name, or your own: a YAML file with the same keys as one profile in profiles.yaml."""
    source = Path(name)
    if name.endswith((".yaml", ".yml")):
        if not source.is_file():
            raise ProfileError(f"profile file not found: {name}")
        profile = yaml.safe_load(source.read_text())
    else:
        profiles = built_in_profiles()
        if name not in profiles:
            raise ProfileError(f"unknown profile '{name}'; choose one of {', '.join(profiles)} ({PROFILES_FILE}),"
                               " or give the path of your own profile YAML")
        profile, source = profiles[name], PROFILES_FILE
    missing = [k for k in PROFILE_KEYS if k not in (profile or {})]
    if missing:
        raise ProfileError(f"profile '{name}' in {source} lacks {', '.join(missing)}")
    check_search_space(profile["search_space"], f"profile '{name}' in {source}")
    if profile["ensemble_mode"] not in ENSEMBLE_MODES:
        raise ProfileError(f"profile '{name}': ensemble_mode '{profile['ensemble_mode']}' is not one of "
                           f"{', '.join(ENSEMBLE_MODES)}")
    check_ensemble_selection(profile, f"profile '{name}' in {source}")
    return {"name": name, **profile}


def built_in_profiles() -> dict:
    return {name: profile for name, profile in yaml.safe_load(PROFILES_FILE.read_text()).items()
            if name != DEFAULTS_SECTION}


# Keys that change only how a finished ensemble predicts (ensemble.json records their effect), not the sweep,
# the models or the members: left out of the profile's identity, so editing them (or a release adding one)
# does not make a work dir "another run".
PREDICTION_ONLY_KEYS = ("ensemble_screen_below",)


def profile_sha256(settings: dict) -> str:
    """The loaded profile's content hash: run.json records it, so an edited profile file is another profile
    (PREDICTION_ONLY_KEYS aside)."""
    identity = {key: value for key, value in settings.items() if key not in PREDICTION_ONLY_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def driver_defaults() -> dict:
    """The `defaults` section of profiles.yaml: {profile, num_folds}."""
    defaults = yaml.safe_load(PROFILES_FILE.read_text()).get(DEFAULTS_SECTION) or {}
    missing = [key for key in DEFAULT_KEYS if key not in defaults]
    if missing:
        raise ProfileError(f"{PROFILES_FILE} lacks {', '.join(f'{DEFAULTS_SECTION}.{key}' for key in missing)}; "
                           f"its '{DEFAULTS_SECTION}' section names the default {' and '.join(DEFAULT_KEYS)}")
    return defaults


def default_profile_name() -> str:
    return str(driver_defaults()["profile"])


def default_num_folds() -> int:
    """Folds drawn for a datalist that has none."""
    return int(driver_defaults()["num_folds"])


def default_modality() -> str:
    """The template's own modality (its hyper_parameters.yaml): what a bundle assumes when the data source
    names none, so the driver's default cannot disagree with the bundle's."""
    config = yaml.safe_load(template_config().read_text())
    if "modality" not in config:
        raise ProfileError(f"{template_config()} has no 'modality' key; the driver takes its default modality from"
                           " there: add modality: ct")
    return str(config["modality"])


def check_ensemble_selection(profile: dict, where: str) -> None:
    """ensemble_selection names a strategy; ensemble_tolerance is null or a Dice difference >= 0 (greedy only);
    ensemble_screen_below is null or a probability in [0, 0.5)."""
    from autoseg2d.pipeline.ensemble import SELECTION_NAMES  # here: the ensemble stage imports this module's users

    selection, tolerance = profile["ensemble_selection"], profile["ensemble_tolerance"]
    if selection not in SELECTION_NAMES:
        raise ProfileError(f"{where}: ensemble_selection '{selection}' is not one of {', '.join(SELECTION_NAMES)}")
    below = profile["ensemble_screen_below"]
    if below is not None and (isinstance(below, bool) or not isinstance(below, (int, float)) or not 0 <= below < 0.5):
        raise ProfileError(f"{where}: ensemble_screen_below is {below!r}; give a probability from 0 up to (not "
                           "including) 0.5 such as 0.05, or null (or 0) to run every member on every slice")
    if tolerance is None:
        return
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ProfileError(f"{where}: ensemble_tolerance is {tolerance!r}; give a Dice difference >= 0 such as "
                           "0.002, or null to take ensemble_size members")
    if selection != "greedy":
        raise ProfileError(f"{where}: ensemble_tolerance {tolerance} applies only to ensemble_selection: greedy "
                           f"(this profile has {selection}); set it to null or choose greedy")


def template_keys() -> list[str]:
    """Every key of the template config, nested ones as MONAI writes them (network#init_filters)."""
    def walk(tree: dict, prefix: str) -> list[str]:
        keys = []
        for key, value in tree.items():
            keys.append(prefix + key)
            if isinstance(value, dict):
                keys += walk(value, f"{prefix}{key}#")
        return keys

    return walk(yaml.safe_load(template_config().read_text()), "")


def check_search_space(search_space: dict, where: str) -> None:
    """Each entry names a template key and is {choices: [...]} or {low, high[, log]}.

    A misspelled key would otherwise be passed on, ignored by training and still change the
    bundle's name: a second, identical training under another hash.
    """
    known = template_keys()
    for key, space in (search_space or {}).items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ProfileError(f"{where}: search_space key '{key}' is not a segresnet2d setting{hint}; valid keys "
                               f"are those of {template_config()}")
        if not isinstance(space, dict) or not ("choices" in space or {"low", "high"} <= space.keys()):
            raise ProfileError(f"{where}: search_space '{key}' is {space!r}; give {{choices: [a, b, ...]}} or "
                               "{low: x, high: y} (optionally log: true)")
