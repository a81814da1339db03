"""Budget profiles (profiles.yaml): how many trials, folds, runs and ensemble members a run uses."""

from __future__ import annotations

from pathlib import Path

import yaml

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
PROFILE_KEYS = ("sweep_trials", "sweep_folds", "cv_top_variants", "cv_runs", "ensemble_size", "ensemble_mode",
                "train_overrides", "search_space")
ENSEMBLE_MODES = ("mean", "vote")


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
        profiles = yaml.safe_load(PROFILES_FILE.read_text())
        if name not in profiles:
            raise ProfileError(f"unknown profile '{name}'; choose one of {', '.join(profiles)} ({PROFILES_FILE}),"
                               " or give the path of your own profile YAML")
        profile, source = profiles[name], PROFILES_FILE
    missing = [k for k in PROFILE_KEYS if k not in (profile or {})]
    if missing:
        raise ProfileError(f"profile '{name}' in {source} lacks {', '.join(missing)}")
    if profile["ensemble_mode"] not in ENSEMBLE_MODES:
        raise ProfileError(f"profile '{name}': ensemble_mode '{profile['ensemble_mode']}' is not one of "
                           f"{', '.join(ENSEMBLE_MODES)}")
    return {"name": name, **profile}
