import shutil

import bundle_config
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


def test_monai_training_keys_are_accepted():
    """The keys of MONAI's tutorials (AutoRunner.set_training_params) reach the same settings as ours."""
    config = load_config(CONFIG, num_epochs=2, num_epochs_per_validation=1, num_images_per_batch=2,
                         num_warmup_epochs=1, determ=False)
    assert (config["num_epochs"], config["num_epochs_per_validation"], config["batch_size"]) == (2, 1, 2)
    assert config["num_warmup_epochs"] == 1 and config["deterministic"] is False
    assert load_config(CONFIG, val_every=3)["num_epochs_per_validation"] == 3  # the old name still works


def test_keys_of_other_auto3dseg_algorithms_warn_once_and_train_on(caplog, monkeypatch):
    monkeypatch.setattr(bundle_config, "_warned", set())
    with caplog.at_level("WARNING", logger="segresnet2d"):
        config = load_config(CONFIG, num_crops_per_image=2, early_stopping_fraction=0.1, num_epochs=3)
        load_config(CONFIG, num_crops_per_image=2)
    assert config["num_epochs"] == 3 and "num_crops_per_image" not in config
    warnings = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert len(warnings) == 1 and "num_crops_per_image, early_stopping_fraction" in warnings[0]


def test_a_removed_key_in_an_override_warns_once_and_trains_on(caplog, monkeypatch):
    """A profile, data-source YAML or command line written for an older template version still runs: the key is
    dropped and the warning says what runs instead. A removed key must not be in the template's YAML."""
    import yaml

    monkeypatch.setattr(bundle_config, "_warned", set())
    with caplog.at_level("WARNING", logger="segresnet2d"):
        config = load_config(CONFIG, infer_cpu_streams=2, num_epochs=3)
        load_config(CONFIG, infer_cpu_streams=1)
    assert config["num_epochs"] == 3 and "infer_cpu_streams" not in config
    warnings = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert warnings == ["segresnet2d ignores infer_cpu_streams from the command line: OpenVINO picks its streams "
                        "for the CPU. Delete the key there."]
    with open(CONFIG) as stream:
        assert not set(bundle_config.REMOVED_KEYS) & set(yaml.safe_load(stream))


def test_a_typo_of_a_monai_name_suggests_it():
    with pytest.raises(ConfigError, match="did you mean 'num_epochs_per_validation'"):
        load_config(CONFIG, num_epochs_per_valdation=1)


def test_an_alias_and_our_name_that_disagree_are_refused():
    with pytest.raises(ConfigError, match="'num_images_per_batch' .* and 'batch_size' .* give only one"):
        load_config(CONFIG, batch_size=4, num_images_per_batch=2)


def test_nested_keys_are_read_and_set_by_one_walker():
    from bundle_config import get_nested, set_nested

    tree = {"network": {"init_filters": 32, "norm": "batch"}, "amp": True}
    assert get_nested(tree, "network#init_filters", "t.yaml") == 32
    set_nested(tree, "network#init_filters", 8, "t.yaml")
    set_nested(tree, "amp", False, "t.yaml")
    assert tree == {"network": {"init_filters": 8, "norm": "batch"}, "amp": False}
    with pytest.raises(ConfigError, match=r"'network#init_filter' \(in t.yaml\); did you mean 'network#init_filters'"
                                          r".* Valid keys under network: init_filters, norm"):
        get_nested(tree, "network#init_filter", "t.yaml")
    with pytest.raises(ConfigError, match="'netwrk#norm' .*did you mean 'network'"):
        set_nested(tree, "netwrk#norm", "instance", "t.yaml")
