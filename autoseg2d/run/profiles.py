"""Budget profiles (profiles.yaml): how many trials, folds, runs and ensemble members a run uses.

profiles.yaml's `defaults` section owns the run defaults (the profile and the number of folds a
run uses when neither the command line nor the work dir's run.json says) and the profile keys
every built-in profile shares; each profile lists only what is its own. A profile file of your
own starts from a built-in `base` profile and lists only the keys it changes, so a key added by a
later release reaches it from the base. Only the run context (context.py) reads these defaults:
the datalist and check modules take num_folds and modality as arguments.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from pathlib import Path

import yaml

from autoseg2d.templates import template_config

logger = logging.getLogger(__name__)

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
PROFILE_KEYS = ("sweep_trials", "sweep_folds", "cv_top_variants", "cv_runs", "ensemble_size", "ensemble_mode",
                "ensemble_selection", "ensemble_tolerance", "ensemble_screen_below", "distill", "train_overrides",
                "search_space")
ENSEMBLE_MODES = ("mean", "vote")
# ensemble_selection's values; the ensemble stage implements each (ensemble.select_members, select_greedy)
SELECTION_NAMES = ("fold_balanced", "greedy")
DEFAULTS_SECTION = "defaults"  # in profiles.yaml; not a profile
DEFAULT_KEYS = ("profile", "num_folds")  # the run defaults in that section; its other keys are shared profile keys
BASE_KEY = "base"  # in a profile file: the built-in profile its missing keys come from (default: the default profile)
# Search-space keys each input variant's first trial runs at the value the bundle trains with (the profile's
# train_overrides, else the template's): the paper's setting is tried before the sampler takes over.
FIRST_TRIAL_KEYS = ("learning_rate",)


class ProfileError(ValueError):
    pass


def load_profile(name: str) -> dict:
    """A built-in profile by name, or your own: a YAML file with `base: <built-in profile>` (default: the default
    profile) and the keys it changes; every key it leaves out comes from the base, and the log says which."""
    if name.endswith((".yaml", ".yml")):
        profile, source = _profile_file(Path(name)), Path(name)
    else:
        profiles = built_in_profiles()
        if name not in profiles:
            raise ProfileError(f"unknown profile '{name}'; choose one of {', '.join(profiles)} ({PROFILES_FILE}),"
                               " or give the path of your own profile YAML")
        profile, source = profiles[name], PROFILES_FILE
    where = f"profile '{name}' in {source}"
    missing = [k for k in PROFILE_KEYS if k not in profile]
    if missing:
        raise ProfileError(f"{where} lacks {', '.join(missing)}; give them in the profile or in the "
                           f"'{DEFAULTS_SECTION}' section of {PROFILES_FILE}")
    check_search_space(profile["search_space"], where)
    if profile["ensemble_mode"] not in ENSEMBLE_MODES:
        raise ProfileError(f"profile '{name}': ensemble_mode '{profile['ensemble_mode']}' is not one of "
                           f"{', '.join(ENSEMBLE_MODES)}")
    check_ensemble_selection(profile, where)
    check_first_trial(profile, where)
    return {"name": name, **{key: profile[key] for key in PROFILE_KEYS}}


def _read_profiles_file() -> dict:
    content = yaml.safe_load(PROFILES_FILE.read_text()) or {}
    for section, keys in content.items():
        allowed = (*DEFAULT_KEYS, *PROFILE_KEYS) if section == DEFAULTS_SECTION else PROFILE_KEYS
        _refuse_unknown(keys or {}, allowed, f"section '{section}' of {PROFILES_FILE}")
    return content


def _refuse_unknown(profile: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in profile if key not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ProfileError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint}; "
                           f"valid keys are {', '.join(allowed)}")


def built_in_profiles() -> dict:
    """Every profile of profiles.yaml with the shared keys of its `defaults` section."""
    content = _read_profiles_file()
    shared = {key: value for key, value in (content.get(DEFAULTS_SECTION) or {}).items() if key in PROFILE_KEYS}
    return {name: {**shared, **(own or {})} for name, own in content.items() if name != DEFAULTS_SECTION}


def _profile_file(path: Path) -> dict:
    """Your profile file, its missing keys from its base profile (one log line names them)."""
    if not path.is_file():
        raise ProfileError(f"profile file not found: {path}")
    own = yaml.safe_load(path.read_text()) or {}
    if not isinstance(own, dict):
        raise ProfileError(f"profile file {path} holds {type(own).__name__}, not a mapping of profile keys; "
                           f"give keys such as sweep_trials: 3 (valid keys: {', '.join((BASE_KEY, *PROFILE_KEYS))})")
    own = dict(own)
    base = own.pop(BASE_KEY, None) or default_profile_name()
    _refuse_unknown(own, (BASE_KEY, *PROFILE_KEYS), f"profile file {path}")
    profiles = built_in_profiles()
    if base not in profiles:
        raise ProfileError(f"profile file {path}: {BASE_KEY} '{base}' is not a built-in profile; choose one of "
                           f"{', '.join(profiles)} ({PROFILES_FILE})")
    taken = [key for key in PROFILE_KEYS if key not in own]
    if taken:
        logger.info(f"profile {path}: {', '.join(taken)} from the base profile '{base}'")
    return {**profiles[base], **own}


# Keys that change only what is built on a finished ensemble (how it predicts: ensemble.json records its effect;
# whether a student is distilled from it), not the sweep, the models or the members: left out of the profile's
# identity, so editing them (or a release adding one) does not make a work dir "another run".
AFTER_ENSEMBLE_KEYS = ("ensemble_screen_below", "distill")


def profile_sha256(settings: dict) -> str:
    """The loaded profile's content hash: run.json records it, so an edited profile file is another profile
    (AFTER_ENSEMBLE_KEYS aside)."""
    identity = {key: value for key, value in settings.items() if key not in AFTER_ENSEMBLE_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def driver_defaults() -> dict:
    """The run defaults of profiles.yaml's `defaults` section: {profile, num_folds}."""
    defaults = _read_profiles_file().get(DEFAULTS_SECTION) or {}
    missing = [key for key in DEFAULT_KEYS if key not in defaults]
    if missing:
        raise ProfileError(f"{PROFILES_FILE} lacks {', '.join(f'{DEFAULTS_SECTION}.{key}' for key in missing)}; "
                           f"its '{DEFAULTS_SECTION}' section names the default {' and '.join(DEFAULT_KEYS)}")
    return {key: defaults[key] for key in DEFAULT_KEYS}


def default_profile_name() -> str:
    return str(driver_defaults()["profile"])


def default_num_folds() -> int:
    """Folds drawn for a datalist that has none."""
    return int(driver_defaults()["num_folds"])


def _template_settings() -> dict:
    return yaml.safe_load(template_config().read_text())


def first_trial_params(profile: dict) -> dict:
    """{key: value} for the FIRST_TRIAL_KEYS the profile searches: the value the bundle trains with, from the
    profile's train_overrides, else from the template's hyper_parameters.yaml."""
    template = _template_settings()
    return {key: profile["train_overrides"].get(key, template.get(key)) for key in FIRST_TRIAL_KEYS
            if key in (profile["search_space"] or {})}


def check_first_trial(profile: dict, where: str) -> None:
    """The first trial's values must lie in the search space: Optuna would otherwise record a value outside
    the distribution, and the sweep would never compare the paper's setting with its neighbours."""
    for key, value in first_trial_params(profile).items():
        space = profile["search_space"][key]
        origin = "train_overrides" if key in profile["train_overrides"] else f"the template's {template_config()}"
        inside = value in space["choices"] if "choices" in space else space["low"] <= value <= space["high"]
        if not inside:
            shown = space["choices"] if "choices" in space else f"{space['low']:g}..{space['high']:g}"
            raise ProfileError(f"{where}: search_space {key} {shown} excludes {value}, the {key} the bundle "
                               f"trains with ({origin}), which each input variant's first trial runs; widen the "
                               f"range to include it, or set {key} inside the range in train_overrides")


def check_ensemble_selection(profile: dict, where: str) -> None:
    """ensemble_selection names a strategy; ensemble_tolerance is null or a Dice difference >= 0 (greedy only);
    ensemble_screen_below is null or a probability in [0, 0.5); distill is true or false."""
    selection, tolerance = profile["ensemble_selection"], profile["ensemble_tolerance"]
    if selection not in SELECTION_NAMES:
        raise ProfileError(f"{where}: ensemble_selection '{selection}' is not one of {', '.join(SELECTION_NAMES)}")
    if not isinstance(profile["distill"], bool):
        raise ProfileError(f"{where}: distill is {profile['distill']!r}; give true (distil a student from the "
                           "ensemble) or false")
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

    return walk(_template_settings(), "")


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
