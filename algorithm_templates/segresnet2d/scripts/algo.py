"""Segresnet2dAlgo: wires MONAI's BundleGen to the data-derived settings in planning.py."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.apps.auto3dseg import BundleAlgo
from monai.bundle import ConfigParser

from .bundle_config import (KEY_SEPARATOR, ConfigError, coerce_value, get_nested, set_nested, suggest_key,
                            translate_monai_keys)
from .bundle_contract import launch_command, write_text_atomic
from .planning import PlanningDefaults, derive_anisotropy, derive_settings

logger = logging.getLogger(__name__)

CONFIG_NAME = "hyper_parameters.yaml"
DATA_SOURCE_KEYS = ("modality", "datalist", "dataroot", "name", "task", "class_names", "sigmoid", "multigpu")
# AutoRunner's own settings, which it also reads from the data-source YAML (MONAI's auto_runner.py)
AUTORUNNER_KEYS = ("work_dir", "num_fold", "analyze", "algo_gen", "train", "hpo", "ensemble", "not_use_cache",
                   "allow_skip", "algos", "hpo_backend", "templates_path_or_url")
# AutoRunner's MLflow arguments, which it hands every algorithm through BundleGen (BundleAlgo's attributes of the
# same names): config keys of this template too, so the data-source YAML can set them as well
MLFLOW_KEYS = ("mlflow_tracking_uri", "mlflow_experiment_name")
MONAI_EXPORT_KEYS = ("fill_with_datastats", "gpu_customization", "gpu_customization_specs")


def _read_yaml(path: str | os.PathLike) -> Any:
    return ConfigParser.load_config_file(str(path))


def apply_settings(config: dict, settings: dict, source: str) -> None:
    """Apply {key or 'a#b': value} with the same type checks as command-line overrides."""
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            apply_settings(config[key], value, f"{source} [{key}]")
            continue
        set_nested(config, key, coerce_value(key, value, get_nested(config, key, source)), source)


class Segresnet2dAlgo(BundleAlgo):
    """2D slice-wise SegResNetDS for thick-slice CT (and any anisotropic 3D data)."""

    def _data_source(self) -> dict:
        return dict(_read_yaml(self.data_list_file)) if self.data_list_file else {}

    def _template_config(self) -> dict:
        return _read_yaml(Path(str(self.template_path)) / self.name / "configs" / CONFIG_NAME)

    def _run_cmd(self, cmd: str, devices_info: str = "") -> subprocess.CompletedProcess:
        """As BundleAlgo, except that a one-node multi-GPU run starts torchrun the way the driver does
        (bundle_contract.launch_command: from this interpreter), and shows the training output live."""
        if int(self.device_setting["NUM_NODES"]) > 1 or int(self.device_setting["n_devices"]) <= 1:
            return super()._run_cmd(cmd, devices_info)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(self.device_setting["CUDA_VISIBLE_DEVICES"])}
        return subprocess.run(launch_command(cmd.split(), int(self.device_setting["n_devices"])), env=env, check=True)

    def train(self, train_params: dict | None = None, device_setting: dict | None = None):
        """As BundleAlgo.train, with MONAI's key names mapped onto ours and keys only other Auto3DSeg
        algorithms read (AutoRunner's one dict for all of them) dropped with one warning."""
        params = translate_monai_keys(dict(train_params or {}), "the training parameters") if train_params else None
        return super().train(params, device_setting)

    def pre_check_skip_algo(self, skip_bundlegen: bool = False, skip_info: str = "") -> tuple[bool, str]:
        """Skip unless slices are much thicker than pixels (2D at native resolution loses little there)."""
        config = self._template_config()
        apply_settings(config, {k: v for k, v in self._data_source().items() if k in ("force_2d", "min_anisotropy")},
                       "data source")
        if config["force_2d"] or not self.data_stats_files:
            return skip_bundlegen, skip_info
        ratio, note = derive_anisotropy(_read_yaml(self.data_stats_files))
        if ratio < config["min_anisotropy"]:
            reason = (f"{note} < min_anisotropy {config['min_anisotropy']}; to train 2D anyway put force_2d: true "
                      f"in the data-source YAML ({self.data_list_file})")
            logger.info(f"segresnet2d skipped: {reason}")
            return True, reason
        return skip_bundlegen, skip_info

    def fill_template_config(self, data_stats_filename: str, output_path: str, **kwargs: Any) -> dict:
        """Fill configs/hyper_parameters.yaml: defaults <- data-derived <- data-source extras <- BundleGen's
        MLflow arguments <- kwargs.

        With fill_with_datastats=False (MONAI's OptunaGen copying a bundle for a trial) the copy starts
        from the filled config of the bundle it copies (its fold and settings), and only bundle_root moves.
        """
        config_file = Path(output_path) / "configs" / CONFIG_NAME
        config = _read_yaml(config_file)
        copied = (self.fill_records or {}).get(CONFIG_NAME) if kwargs.get("fill_with_datastats") is False else None
        config.update(copied or {})
        data_source = self._data_source()
        modality = str(data_source.get("modality", config["modality"])).lower()

        notes: list[str] = []
        if data_stats_filename and not copied:
            stats = _read_yaml(data_stats_filename)
            by_case_file = Path(data_stats_filename).with_name(Path(data_stats_filename).stem + "_by_case.yaml")
            by_case = _read_yaml(by_case_file).get("stats_by_cases") if by_case_file.exists() else None
            device, memory = self._device()
            settings, notes = derive_settings(stats, by_case, PlanningDefaults.from_config(config), modality=modality,
                                              device=device, gpu_memory_gb=memory)
            apply_settings(config, settings, "planning.derive_settings")

        extras = translate_monai_keys({k: v for k, v in data_source.items()
                                       if k not in DATA_SOURCE_KEYS + AUTORUNNER_KEYS},
                                      str(self.data_list_file))
        unknown = [k for k in extras if k.split(KEY_SEPARATOR)[0] not in config]
        typos = {k: suggest_key(k.split(KEY_SEPARATOR)[0], config) for k in unknown}
        typos = {k: hint for k, hint in typos.items() if hint}
        if typos:
            raise ConfigError(f"data-source YAML {self.data_list_file}: " + "; ".join(
                f"'{k}' is not a segresnet2d setting, did you mean '{hint}'?" for k, hint in typos.items()))
        if unknown:
            logger.warning(f"data-source keys {unknown} are not segresnet2d settings and are ignored")
        apply_settings(config, {k: v for k, v in extras.items() if k not in unknown}, str(self.data_list_file))
        handed = {key: getattr(self, key, None) for key in MLFLOW_KEYS}  # None: BundleGen was not given it
        apply_settings(config, {k: v for k, v in handed.items() if v is not None}, "BundleGen's MLflow arguments")
        overrides = translate_monai_keys({k: v for k, v in kwargs.items() if k not in MONAI_EXPORT_KEYS},
                                         "fill_template_config arguments")
        apply_settings(config, overrides, "fill_template_config arguments")

        config["bundle_root"] = str(Path(output_path).resolve())
        config["modality"] = modality
        if "datalist" in data_source:
            config["data_list_file_path"] = str(Path(data_source["datalist"]).resolve())
        if "dataroot" in data_source:
            config["data_file_base_dir"] = str(Path(data_source["dataroot"]).resolve())
        if "class_names" in data_source:
            config["class_names"] = list(data_source["class_names"])
            config["output_classes"] = self._classes_with_names(config["output_classes"], config["class_names"])

        for note in notes:
            logger.info(f"segresnet2d: {note}")
        header = "".join(f"# {line}\n" for line in ["Filled by Segresnet2dAlgo.fill_template_config.", *notes])
        write_text_atomic(config_file, header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
        return {CONFIG_NAME: config}

    def _classes_with_names(self, output_classes: int, class_names: list[str]) -> int:
        """One channel per named class, even one that no training case holds; more label ids than names is
        an error (the names would be shifted or missing)."""
        if output_classes - 1 > len(class_names):
            raise ConfigError(f"data-source YAML {self.data_list_file}: class_names {class_names} names "
                              f"{len(class_names)} classes but the labels hold ids up to {output_classes - 1}; "
                              "give one name per label id 1..N")
        return len(class_names) + 1

    @staticmethod
    def _device() -> tuple[str, float | None]:
        if torch.cuda.is_available():
            return "cuda", torch.cuda.get_device_properties(0).total_memory / 2**30
        return "cpu", None
