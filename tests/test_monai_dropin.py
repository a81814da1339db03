"""The template driven by stock MONAI the way its tutorials do: AutoRunner end to end and OptunaGen trials.

Offline and on CPU: the local template folder is passed (MONAI would otherwise download its own
segresnet2d), and the networks are tiny. AutoRunner starts train.py with `python` from PATH unless
told otherwise, so cmd_prefix names this interpreter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import yaml
from monai.apps.auto3dseg import AutoRunner, BundleGen, DataAnalyzer, OptunaGen
from monai.utils.enums import AlgoKeys

from autoseg2d.synthetic.head_ct import write_dataset
from tests.conftest import TEMPLATES, TINY_NETWORK

# The keys of MONAI's tutorials; the tiny network keeps each fold to seconds.
MONAI_TRAINING_PARAMS = {"num_epochs": 2, "num_epochs_per_validation": 1, "num_images_per_batch": 2,
                         "num_warmup_epochs": 1}
TINY_TRAINING = {"num_workers": 0, **TINY_NETWORK}


def small_dataset(root: Path) -> Path:
    return write_dataset(root, num_train=4, num_test=1, num_folds=2, num_slices=8)


def test_autorunner_with_monai_training_keys(tmp_path):
    datalist = small_dataset(tmp_path / "data")
    runner = AutoRunner(work_dir=str(tmp_path / "work"), algos=["segresnet2d"], templates_path_or_url=str(TEMPLATES),
                        input={"modality": "CT", "datalist": str(datalist), "dataroot": str(datalist.parent)})
    runner.set_analyze_params({"device": "cpu", "worker": 0, "do_ccp": False})
    runner.set_device_info(cmd_prefix=sys.executable)
    runner.set_training_params({**MONAI_TRAINING_PARAMS, **TINY_TRAINING, "num_crops_per_image": 2})
    runner.set_num_fold(2)
    runner.run()

    for fold in (0, 1):
        config = yaml.safe_load((tmp_path / "work" / f"segresnet2d_{fold}" / "configs" /
                                 "hyper_parameters.yaml").read_text())
        assert config["fold"] == fold
        log = (tmp_path / "work" / f"segresnet2d_{fold}" / "model" / "training_log.csv").read_text().splitlines()
        assert len(log) == 3 and all(row.split(",")[2] for row in log[1:])  # 2 epochs, each validated
    testing = json.loads(datalist.read_text())["testing"]
    outputs = sorted((tmp_path / "work" / "ensemble_output").rglob("*.nii.gz"))
    assert len(outputs) == len(testing)
    source = nib.load(str(datalist.parent / testing[0]["image"]))
    prediction = nib.load(str(outputs[0]))
    assert prediction.shape == source.shape
    assert set(np.unique(np.asanyarray(prediction.dataobj))) <= {0, 1}


class TrialGen(OptunaGen):
    """The subclass MONAI's OptunaGen asks for: it names the search space. OptunaGen names each trial's
    folder after these parameters, so lists (the tiny network) go into the data-source YAML instead."""

    def get_hyperparameters(self) -> dict:
        return {"learning_rate": self.trial.suggest_float("learning_rate", 0.001, 0.01, log=True),
                **MONAI_TRAINING_PARAMS}


def test_optunagen_trials_train_in_their_own_bundles(tmp_path):
    datalist = small_dataset(tmp_path / "data")
    stats = tmp_path / "datastats.yaml"
    DataAnalyzer(str(datalist), str(datalist.parent), output_path=str(stats), device="cpu",
                 worker=0).get_all_case_stats()
    data_src = tmp_path / "data_src.yaml"
    data_src.write_text(yaml.safe_dump({"modality": "CT", "datalist": str(datalist), "dataroot": str(datalist.parent),
                                        **TINY_TRAINING}))
    work = tmp_path / "work"
    gen = BundleGen(algo_path=str(work), algos=["segresnet2d"], templates_path_or_url=str(TEMPLATES),
                    data_stats_filename=str(stats), data_src_cfg_name=str(data_src))
    gen.generate(str(work), num_fold=2)
    original = gen.get_history()[1][AlgoKeys.ALGO]  # fold 1: the trials must keep it
    original.device_setting["CMD_PREFIX"] = sys.executable

    trials = TrialGen(algo=original)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda trial: trials(trial, trials.get_obj_filename(), str(work), str(TEMPLATES)), n_trials=2)

    assert len(study.trials) == 2 and all(0.0 <= t.value <= 1.0 for t in study.trials)
    folders = sorted(p for p in work.iterdir() if p.name.startswith("segresnet2d_1_"))
    assert len(folders) == 2
    for folder in folders:
        config = yaml.safe_load((folder / "configs" / "hyper_parameters.yaml").read_text())
        assert config["bundle_root"] == str(folder) and config["fold"] == 1
        assert (folder / "model" / "progress.yaml").is_file()
    assert not (work / "segresnet2d_1" / "model").exists()  # the original bundle is untouched
