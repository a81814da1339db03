"""kill -9 during training, rerun the same command: it continues and ends exactly like an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST_TRAINING

NUM_EPOCHS = 12
KILL_AFTER_EPOCH = 5
TIMEOUT_S = 600  # two trainings share the cores; a bound for a hang, ~10x their time on a loaded machine


def train_command(bundle: Path) -> list[str]:
    """The command MONAI runs for a bundle, with fast settings; validation every epoch so the best Dice moves."""
    settings = {**FAST_TRAINING, "num_epochs": NUM_EPOCHS, "num_epochs_per_validation": 1}
    return [sys.executable, str(bundle / "scripts" / "train.py"), "run",
            f"--config_file={bundle / 'configs' / 'hyper_parameters.yaml'}",
            *(f"--{key}={json.dumps(value)}" for key, value in settings.items())]


def start(bundle: Path) -> subprocess.Popen:
    """One intra-op thread per run: the reference and the killed run share the cores without oversubscription
    (CPU results are bit-identical for a fixed thread count; sums are split differently across threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(train_command(bundle), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, output[-3000:]
    return output


def epochs_saved(bundle: Path) -> int:
    """Epochs in model_last.pt; it is replaced atomically, so whatever is there is a whole checkpoint."""
    path = bundle / "model" / "model_last.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"] if path.exists() else 0


def kill_after(process: subprocess.Popen, bundle: Path, epoch: int) -> int:
    deadline = time.monotonic() + TIMEOUT_S
    while epochs_saved(bundle) < epoch:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training never reached the epoch to kill at"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return epochs_saved(bundle)


def log_rows(bundle: Path) -> list[dict]:
    rows = list(csv.DictReader((bundle / "model" / "training_log.csv").open()))
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in rows]


def checkpoint(bundle: Path, name: str) -> dict:
    return torch.load(bundle / "model" / name, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_then_rerun_matches_an_uninterrupted_run(bundle):
    killed = bundle.parent / "killed" / bundle.name
    shutil.copytree(bundle, killed)  # bundle_root follows the config file, so the copy trains into itself

    reference = start(bundle)
    interrupted = start(killed)
    epochs_before_kill = kill_after(interrupted, killed, KILL_AFTER_EPOCH)
    assert KILL_AFTER_EPOCH <= epochs_before_kill < NUM_EPOCHS
    resumed_output = finish(start(killed))
    finish(reference)

    assert f"resumed from {killed / 'model' / 'model_last.pt'} after epoch {epochs_before_kill}" in resumed_output
    assert log_rows(killed) == log_rows(bundle)  # same losses, validation Dice and learning rates, epoch by epoch
    progress = [(bundle / "model" / "progress.yaml").read_text(), (killed / "model" / "progress.yaml").read_text()]
    assert progress[0] == progress[1]
    best, resumed_best = checkpoint(bundle, "model.pt"), checkpoint(killed, "model.pt")
    assert resumed_best["best_avg_dice_score"] == best["best_avg_dice_score"]
    assert_same_tensors(resumed_best["state_dict"], best["state_dict"])
    assert_same_tensors(checkpoint(killed, "model_last.pt")["model"], checkpoint(bundle, "model_last.pt")["model"])
    print(f"killed after epoch {epochs_before_kill}/{NUM_EPOCHS}; best Dice {best['best_avg_dice_score']:.6f} "
          f"at epoch {best['epoch']} in both runs")
