import shutil

import pytest
from bundle_config import ConfigError, load_config

from tests.conftest import TEMPLATE

CONFIG = str(TEMPLATE / "configs" / "hyper_parameters.yaml")


def test_defaults_load_and_ckpt_path_follows_bundle_root():
    config = load_config(CONFIG, bundle_root="/work/b")
    assert config["ckpt_path"] == "/work/b/model"
    assert config["network"]["blocks_down"] == [2, 4, 4, 4, 4]


def test_a_moved_bundle_uses_its_own_folder(tmp_path):
    moved = tmp_path / "trial_3" / "segresnet2d_0"
    shutil.copytree(TEMPLATE / "configs", moved / "configs")
    text = (moved / "configs" / "hyper_parameters.yaml").read_text()
    (moved / "configs" / "hyper_parameters.yaml").write_text(text.replace('bundle_root: ""', "bundle_root: /old/place"))
    config = load_config(str(moved / "configs" / "hyper_parameters.yaml"))
    assert config["bundle_root"] == str(moved)
    assert config["ckpt_path"] == str(moved / "model")


def test_comma_strings_from_monai_become_lists():
    config = load_config(CONFIG, roi_size="96,96", **{"network#blocks_down": "1,2,2"})
    assert config["roi_size"] == [96, 96]
    assert config["network"]["blocks_down"] == [1, 2, 2]


@pytest.mark.parametrize(("value", "expected"), [("1e-4", 1e-4), (0.001, 0.001), (1, 1.0)])
def test_numbers(value, expected):
    assert load_config(CONFIG, learning_rate=value)["learning_rate"] == expected


def test_comma_separated_config_files(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("num_epochs: 7\n")
    assert load_config(f"{CONFIG},{extra}")["num_epochs"] == 7


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown config key 'num_epoch'.*did you mean 'num_epochs'"):
        load_config(CONFIG, num_epoch=3)


def test_unknown_nested_key_lists_valid_ones():
    with pytest.raises(ConfigError, match="network#filters.*Valid keys under network: blocks_down, dsdepth"):
        load_config(CONFIG, **{"network#filters": 3})


@pytest.mark.parametrize(("key", "value"), [("num_epochs", "many"), ("amp", 3), ("num_epochs", 2.5)])
def test_wrong_types_name_key_and_value(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' expects"):
        load_config(CONFIG, **{key: value})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/hyper_parameters.yaml")
