"""Segresnet2dAlgo: skipping isotropic data, filling the config from statistics and the data-source YAML."""

from __future__ import annotations

import sys

import pytest
import yaml
from monai.apps.auto3dseg import DataAnalyzer

from autoseg2d.synthetic.head_ct import write_dataset
from tests.conftest import TEMPLATES

sys.path.insert(0, str(TEMPLATES))
from segresnet2d.scripts.algo import Segresnet2dAlgo  # noqa: E402
from segresnet2d.scripts.bundle_config import ConfigError  # noqa: E402


def make_algo(tmp_path, spacing_mm=(0.45, 0.45, 5.0), num_classes=1, **source) -> Segresnet2dAlgo:
    datalist = write_dataset(tmp_path / "data", num_train=4, num_test=0, num_folds=2, num_slices=6,
                             spacing_mm=spacing_mm, num_classes=num_classes)
    stats = tmp_path / "datastats.yaml"
    DataAnalyzer(str(datalist), str(datalist.parent), output_path=str(stats), device="cpu",
                 worker=0).get_all_case_stats()
    data_src = tmp_path / "data_src.yaml"
    data_src.write_text(yaml.safe_dump({"modality": "CT", "datalist": str(datalist),
                                        "dataroot": str(datalist.parent), **source}))
    algo = Segresnet2dAlgo(template_path=str(TEMPLATES))
    algo.name = "segresnet2d"
    algo.set_data_stats(str(stats))
    algo.set_data_source(str(data_src))
    return algo


def filled(algo, tmp_path, **kwargs) -> dict:
    algo.export_to_disk(str(tmp_path / "work"), "segresnet2d_1", fold=1, **kwargs)
    return yaml.safe_load((tmp_path / "work" / "segresnet2d_1" / "configs" / "hyper_parameters.yaml").read_text())


def test_thick_slices_are_not_skipped(tmp_path):
    assert make_algo(tmp_path).pre_check_skip_algo() == (False, "")


def test_isotropic_data_is_skipped_with_a_reason(tmp_path):
    skip, reason = make_algo(tmp_path, spacing_mm=(1.0, 1.0, 1.2)).pre_check_skip_algo()
    assert skip and "min_anisotropy" in reason and "force_2d" in reason


def test_force_2d_keeps_it(tmp_path):
    assert not make_algo(tmp_path, spacing_mm=(1.0, 1.0, 1.2), force_2d=True).pre_check_skip_algo()[0]


def test_fill_sets_paths_fold_and_data_source_extras(tmp_path):
    config = filled(make_algo(tmp_path, num_epochs=7, input_variant="slices"), tmp_path)
    assert config["bundle_root"] == str(tmp_path / "work" / "segresnet2d_1")
    assert config["fold"] == 1
    assert config["modality"] == "ct"
    assert config["num_epochs"] == 7 and config["input_variant"] == "slices"
    assert config["data_list_file_path"] == str(tmp_path / "data" / "datalist.json")
    header = (tmp_path / "work" / "segresnet2d_1" / "configs" / "hyper_parameters.yaml").read_text()
    assert "# roi_size" in header and "# ct_windows_hu[0]" in header  # each derived value with its numbers


def test_keyword_arguments_win_over_the_data_source(tmp_path):
    config = filled(make_algo(tmp_path, learning_rate=0.001), tmp_path, learning_rate=0.0005)
    assert config["learning_rate"] == 0.0005


def test_multiclass_labels_set_output_classes(tmp_path):
    assert filled(make_algo(tmp_path, num_classes=2), tmp_path)["output_classes"] == 3


def test_wrong_type_in_data_source_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="num_epochs"):
        filled(make_algo(tmp_path, num_epochs="many"), tmp_path)


def test_multi_gpu_training_starts_torchrun_from_this_interpreter(monkeypatch):
    """MONAI would run `torchrun` from PATH; the algo runs `<this python> -m torch.distributed.run`."""
    import segresnet2d.scripts.algo as algo_module

    calls = []
    monkeypatch.setattr(algo_module.subprocess, "run", lambda command, **kw: calls.append((command, kw)))
    algo = Segresnet2dAlgo(template_path=str(TEMPLATES))
    algo.device_setting.update({"CUDA_VISIBLE_DEVICES": "0,1,2", "n_devices": 3, "NUM_NODES": 1})
    algo._run_cmd("/b/scripts/train.py run --config_file=/b/configs/hyper_parameters.yaml --fold=1")
    command, options = calls[0]
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node"]
    assert command[6:9] == ["3", "/b/scripts/train.py", "run"] and command[-1] == "--fold=1"
    assert options["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2" and options["check"] is True


def test_monai_keys_in_the_data_source_are_applied(tmp_path):
    config = filled(make_algo(tmp_path, num_epochs_per_validation=2, num_images_per_batch=3, cache_rate=1.0),
                    tmp_path)
    assert config["num_epochs_per_validation"] == 2 and config["batch_size"] == 3


def test_a_typo_in_the_data_source_is_an_error_with_the_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="'num_epoch' is not a segresnet2d setting, did you mean 'num_epochs'"):
        filled(make_algo(tmp_path, num_epoch=3), tmp_path)


def test_autorunners_own_keys_in_the_data_source_are_neither_settings_nor_typos(tmp_path):
    """AutoRunner reads num_fold, work_dir, algos, ... from the same YAML; 'num_fold' is close to our 'fold'."""
    config = filled(make_algo(tmp_path, num_fold=3, work_dir=str(tmp_path / "w"), algos=["segresnet2d"],
                              ensemble=False), tmp_path)
    assert config["fold"] == 1 and "num_fold" not in config and "algos" not in config


def test_train_drops_other_algorithms_keys_before_the_command(tmp_path, monkeypatch):
    """AutoRunner's shared dict: MONAI's names are translated, other templates' keys never reach train.py."""
    algo = Segresnet2dAlgo(template_path=str(TEMPLATES))
    algo.output_path = str(tmp_path)
    commands = []
    monkeypatch.setattr(algo, "_run_cmd", lambda cmd: commands.append(cmd))
    algo.train({"num_epochs": 2, "num_images_per_batch": 2, "num_crops_per_image": 4})
    assert "--num_epochs=2" in commands[0] and "--batch_size=2" in commands[0]
    assert "num_crops_per_image" not in commands[0]


def test_class_names_in_the_data_source_set_one_channel_per_name(tmp_path):
    algo = make_algo(tmp_path, num_classes=2, class_names=["IPH", "IVH", "SAH"])
    assert filled(algo, tmp_path)["output_classes"] == 4  # a named class no case holds keeps its channel
    with pytest.raises(ConfigError, match=r"class_names \['IPH'\] names 1 classes but the labels hold ids up to 2"):
        filled(make_algo(tmp_path / "b", num_classes=2, class_names=["IPH"]), tmp_path / "b")
