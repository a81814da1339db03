"""Load the bundle's config file(s) and apply command-line overrides with type checks.

MONAI hands every file in configs/ to train.py as one comma-separated string and passes
list overrides as comma strings (``--roi_size='96,96'``); both are undone here, and every
override must name an existing key and keep that key's type.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from monai.bundle import ConfigParser

# Keys that MONAI's ensemble passes to InferClass but that belong to the ensemble, not the bundle.
KEY_SEPARATOR = "#"  # MONAI's separator of nested config keys: network#init_filters
ENSEMBLE_ONLY_KEYS = ("image_save_func", "rank", "mode", "sigmoid", "algo_spec_params", "infer_files", "files_slices")


# MONAI's own Auto3DSeg templates and tutorials (AutoRunner.set_training_params) name these settings
# differently; each means the same as ours. In a slice-wise trainer every image of a batch is a 2D crop.
MONAI_ALIASES = {
    "num_images_per_batch": "batch_size",
    "determ": "deterministic",
    "val_every": "num_epochs_per_validation",  # this template's name before it took MONAI's
}
# Training keys that only other Auto3DSeg templates (segresnet, swinunetr, dints) read. AutoRunner hands
# one dict to every algorithm it trains, so these are dropped with one warning instead of stopping training.
OTHER_ALGORITHM_KEYS = (
    "num_crops_per_image", "num_patches_per_image", "cache_rate", "auto_scale_allowed", "validate",
    "early_stopping_fraction", "num_epochs_per_saving", "num_sw_batch_size", "overlap_ratio", "crop_ratios",
    "auto_scale_batch", "auto_scale_roi", "auto_scale_filters", "finetune", "infer",
)

# Keys of earlier versions of this template, and what runs instead. A bundle runs its own copy of the scripts,
# so an old bundle keeps its keys' behaviour; these reach newer scripts only in a config or override written
# for an older version. Each is dropped with one warning rather than refused: each chose a speed trade-off
# whose replacement gives the same masks or better ones, so such a config still trains and predicts.
_NO_INT8 = "INT8 inference was removed (it never passed its own agreement check); the float model runs"
_NO_HEAD_CROP = ("the head crop was removed (it cost held-out Dice); inference runs whole slices, leaving air-only "
                 "ones out as infer_skip_air_slices says")
REMOVED_KEYS = {
    "infer_cpu_int8": _NO_INT8,
    "infer_int8_calibration_slices": _NO_INT8,
    "infer_int8_calibration_scans": _NO_INT8,
    "infer_int8_min_agreement": _NO_INT8,
    "infer_crop_to_head": _NO_HEAD_CROP,
    "infer_head_margin_px": _NO_HEAD_CROP,
    "infer_head_threshold_hu": "air-only slices are those without a voxel above HEAD_TISSUE_HU (scripts/predictor.py)",
    "infer_cpu_streams": "OpenVINO picks its streams for the CPU",
    "infer_cpu_bf16": "amp decides: with amp true, CPUs with native bf16 run bf16 (amp false: fp32 everywhere)",
}

logger = logging.getLogger("segresnet2d")
_warned: set[str] = set()


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


def translate_monai_keys(params: dict, source: str) -> dict:
    """MONAI's names mapped onto ours; keys only other Auto3DSeg algorithms read, and REMOVED_KEYS, dropped with
    one warning.

    Any other key is kept, so that a typo of one of ours still fails with a suggestion where it is applied.
    """
    translated: dict = {}
    for key, value in params.items():
        if key in REMOVED_KEYS:
            warn_removed(key, source)
            continue
        ours = MONAI_ALIASES.get(key, key)
        if ours in translated and translated[ours] != value:
            raise ConfigError(f"{source}: '{key}' ({value!r}) and '{ours}' ({translated[ours]!r}) set the same "
                              f"segresnet2d setting {ours}; give only one of them")
        if key.split(KEY_SEPARATOR)[0] not in OTHER_ALGORITHM_KEYS:
            translated[ours] = value
    ignored = [k for k in params if k.split(KEY_SEPARATOR)[0] in OTHER_ALGORITHM_KEYS and k not in _warned]
    if ignored:
        _warned.update(ignored)
        logger.warning(f"segresnet2d ignores {', '.join(ignored)} from {source}: only other Auto3DSeg algorithms "
                       "read them (AutoRunner passes one set of training parameters to every algorithm)")
    return translated


def warn_removed(key: str, source: str) -> None:
    """One warning per process and key: REMOVED_KEYS[key] is no longer read."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(f"segresnet2d ignores {key} from {source}: {REMOVED_KEYS[key]}. Delete the key there.")


def suggest_key(key: str, known: Iterable[str]) -> str | None:
    """The closest valid key, for 'did you mean' in error messages."""
    hint = difflib.get_close_matches(key, list(known), n=1)
    return hint[0] if hint else None


def split_config_files(config_file: str | Sequence[str]) -> list[str]:
    files = config_file.split(",") if isinstance(config_file, str) else list(config_file)
    files = [f.strip() for f in files if f and f.strip()]
    if not files:
        raise ConfigError("no config file given: pass --config_file=<bundle>/configs/hyper_parameters.yaml")
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"config file not found: {f}")
    return files


def bundle_of(config_file: str) -> str | None:
    """The bundle folder a config file belongs to (<bundle>/configs/<file>), if it is laid out that way."""
    configs_dir = os.path.dirname(os.path.abspath(config_file))
    return os.path.dirname(configs_dir) if os.path.basename(configs_dir) == "configs" else None


def load_config(config_file: str | Sequence[str], **overrides: Any) -> dict:
    """Return the parsed config with overrides applied (``network#init_filters=16`` reaches nested keys).

    bundle_root defaults to the bundle the config file lives in, so a moved or copied bundle
    (or an HPO trial copy) reads and writes itself, never the folder it was copied from.
    """
    files = split_config_files(config_file)
    overrides = translate_monai_keys(overrides, "the command line")
    if "bundle_root" not in overrides and bundle_of(files[0]):
        overrides = {"bundle_root": bundle_of(files[0]), **overrides}
    parser = ConfigParser()
    parser.read_config(files)
    raw = parser.get()
    for key in [k for k in raw if k in REMOVED_KEYS]:  # a config written for an older template version
        warn_removed(key, ", ".join(files))
        del raw[key]
    for key, value in overrides.items():
        current = get_nested(raw, key, ", ".join(files))
        parser[key] = coerce_value(key, value, current)
    return parser.get_parsed_content()


def get_nested(tree: dict, key: str, source: str) -> Any:
    """The value of a MONAI nested key ('network#init_filters'); a part that does not exist raises, naming
    the valid keys at that level and the closest one."""
    return _walk(tree, key, key.split(KEY_SEPARATOR), source)


def set_nested(tree: dict, key: str, value: Any, source: str) -> None:
    """Set a MONAI nested key ('network#init_filters') in place; its parents must exist."""
    *parents, leaf = key.split(KEY_SEPARATOR)
    _walk(tree, key, parents, source)[leaf] = value


def _walk(tree: dict, key: str, parts: list[str], source: str) -> Any:
    node: Any = tree
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = sorted(node) if isinstance(node, dict) else []
            prefix = KEY_SEPARATOR.join(parts[:depth])
            hint = suggest_key(part, known if depth else [*known, *MONAI_ALIASES])
            raise ConfigError(
                f"unknown config key '{key}' (in {source})"
                + (f"; did you mean '{(prefix + KEY_SEPARATOR) if prefix else ''}{hint}'?" if hint else "")
                + f" Valid keys{' under ' + prefix if prefix else ''}: {', '.join(known)}"
            )
        node = node[part]
    return node


def coerce_value(key: str, value: Any, current: Any) -> Any:
    """Convert an override to the type of the key's current value, or raise naming both."""
    if isinstance(value, str) and not isinstance(current, str) and not value.startswith(("$", "@")):
        value = _parse_string(value, current)
    if current is None or (isinstance(value, str) and value.startswith(("$", "@"))):
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif isinstance(current, dict):
        if isinstance(value, dict):
            return value
    elif isinstance(value, type(current)):
        return value
    raise ConfigError(
        f"config key '{key}' expects {type(current).__name__} like {current!r}, got {type(value).__name__} {value!r}"
    )


def _parse_string(value: str, current: Any) -> Any:
    """'96,96' -> [96, 96]; 'true' -> True; '1e-4' -> 0.0001 (YAML rules)."""
    if isinstance(current, (list, tuple)) and not value.strip().startswith("["):
        return [yaml.safe_load(v) for v in value.split(",") if v.strip()]
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str) and isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return float(parsed)  # YAML reads '1e-4' (no dot) as a string
        except ValueError:
            return parsed
    return parsed
