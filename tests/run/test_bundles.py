"""train_bundle as the console shows it, and the bundle's files read through the bundle's own contract."""

from __future__ import annotations

import csv
import shutil
import sys

import pytest
import yaml

from bundle_config import set_nested

from autoseg2d.run import bundles
from autoseg2d.run.bundles import (TrainingError, TrainingStopped, bundle_score, describe, is_trained,
                                   train_bundle, train_command)
from autoseg2d.templates import bundle_files
from tests.conftest import FAST_TRAINING, TEMPLATES


def test_a_failed_training_shows_its_last_lines(bundle, tmp_path):
    missing = tmp_path / "moved_away.json"
    with pytest.raises(TrainingError) as raised:
        train_bundle(bundle, "trial slices fold 0", datalist=missing, dataroot=tmp_path)
    message = str(raised.value)
    assert message.startswith("trial slices fold 0: training failed (exit code 1); its last lines:")
    assert str(missing) in message and f"full log: {bundle / 'model' / 'training.log'}" in message


def test_short_labels():
    assert describe({"input_variant": "both", "learning_rate": 0.0029257, "seed": 0}) == "both lr 2.9e-03"
    assert describe({"input_variant": "slices", "seed": 2}) == "slices seed 2"


def set_config(bundle, settings: dict) -> None:
    """Write settings ('a#b' reaches nested keys) into the bundle's config file, as BundleGen would have."""
    config_file = bundle / "configs" / "hyper_parameters.yaml"
    config = yaml.safe_load(config_file.read_text())
    for key, value in settings.items():
        set_nested(config, key, value, str(config_file))
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))


def finished_progress(folder, score: float) -> None:
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "progress.yaml").write_text(yaml.safe_dump([{"best_avg_dice_score": score - 0.1, "best_epoch": 2},
                                                          {"best_avg_dice_score": score, "best_epoch": 4,
                                                           "finished": True, "num_epochs": 4}]))


def test_a_bundle_trained_before_the_contract_counts_as_trained(bundle):
    """Old scripts (no bundle_contract.py) and no events file: model/progress.yaml still holds the score."""
    (bundle / "scripts" / "bundle_contract.py").unlink()
    assert not is_trained(bundle)
    finished_progress(bundle / "model", 0.71)
    assert is_trained(bundle) and bundle_score(bundle) == 0.71


def test_the_files_are_where_the_bundle_config_puts_them(bundle):
    set_config(bundle, {"ckpt_path": "$@bundle_root + '/weights'"})
    finished_progress(bundle / "model", 0.5)  # where they would be by default: not this bundle's
    assert not is_trained(bundle)
    finished_progress(bundle / "weights", 0.6)
    assert bundle_files(bundle).progress == bundle / "weights" / "progress.yaml"
    assert is_trained(bundle) and bundle_score(bundle) == 0.6


def test_a_moved_bundle_reads_its_own_files(bundle, tmp_path):
    moved = shutil.copytree(bundle, tmp_path / "elsewhere" / bundle.name)  # its config names the old bundle_root
    finished_progress(moved / "model", 0.6)
    assert is_trained(moved) and not is_trained(bundle)


def test_the_driver_launches_training_as_the_algo_does(bundle, monkeypatch):
    """One torchrun launch: the driver's command is the one Segresnet2dAlgo._run_cmd runs for the same script."""
    import importlib

    monkeypatch.syspath_prepend(str(TEMPLATES))  # algo.py is imported as a package, as BundleGen does
    algo_module = importlib.import_module("segresnet2d.scripts.algo")
    monkeypatch.setattr(bundles.torch.cuda, "device_count", lambda: 2)
    driver = train_command(bundle, {"fold": 1})
    runs = []
    monkeypatch.setattr(algo_module.subprocess, "run", lambda command, **kw: runs.append(command))
    algo = algo_module.Segresnet2dAlgo(template_path=str(TEMPLATES))
    algo.device_setting.update({"CUDA_VISIBLE_DEVICES": "0,1", "n_devices": 2, "NUM_NODES": 1})
    algo._run_cmd(" ".join(driver[7:]))  # the script part: what MONAI's _create_cmd writes
    assert runs == [driver]
    assert driver[:7] == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]


def validations(bundle) -> dict[int, float]:
    rows = csv.DictReader(bundle_files(bundle).training_log.open())
    return {int(row["epoch"]): float(row["val_dice"]) for row in rows if row["val_dice"]}


def test_pruning_and_the_progress_follow_the_trainers_validations(bundle, ct_dataset, monkeypatch):
    """A real short training: stopped at its first validation, then continued; on_validation gets the
    trainer's own epochs and Dice (training_log.csv), and only those of the run it watches."""
    monkeypatch.setattr(bundles, "EVENT_POLL_S", 0.05)
    set_config(bundle, {**FAST_TRAINING, "num_epochs": 4, "num_epochs_per_validation": 2})
    data = {"datalist": ct_dataset, "dataroot": ct_dataset.parent}
    first: list = []
    with pytest.raises(TrainingStopped):
        train_bundle(bundle, "trial fold 0", **data, on_validation=lambda *call: first.append(call) or True)
    assert first == [(2, pytest.approx(validations(bundle)[2], abs=1e-5), 4)]
    assert not is_trained(bundle) and max(validations(bundle)) < 4  # stopped before its end

    calls: list = []
    best = train_bundle(bundle, "trial fold 0", **data, on_validation=lambda *call: calls.append(call) or False)
    done = validations(bundle)
    assert sorted(done) == [2, 4]
    assert calls == [(4, pytest.approx(done[4], abs=1e-5), 4)]  # not epoch 2 again: that was the pruned run's
    assert is_trained(bundle) and best == pytest.approx(max(done.values()), abs=1e-5)


def test_the_drivers_reader_understands_the_trainers_events(bundle):
    """The trainer's event file, read by the driver's loop: every epoch, the Dice of every validation."""
    import subprocess

    from bundle_config import load_config
    from trainer import Trainer

    from autoseg2d.templates import bundle_contract

    settings = {**FAST_TRAINING, "num_epochs": 2, "num_epochs_per_validation": 2}
    Trainer(load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **settings)).fit()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    calls: list = []
    bar = bundles.tqdm(total=1, disable=True)
    stopped, epochs = bundles.follow_events(finished, bundle_contract(bundle), bundle_files(bundle).events, 0, bar,
                                            lambda *call: calls.append(call) or False)
    assert (stopped, epochs, bar.total) == (False, 2, 2)
    assert calls == [(2, pytest.approx(validations(bundle)[2], abs=1e-5), 2)]  # epoch 1 did not validate
