"""kill -9 during training, rerun the same command: it continues and ends exactly like an uninterrupted run; a
SIGTERM (a pruned trial, a scheduler) stops it with its tracked run marked stopped."""

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


def train_command(bundle: Path, **more) -> list[str]:
    """The command MONAI runs for a bundle, with fast settings; validation every epoch so the best Dice moves."""
    settings = {**FAST_TRAINING, "num_epochs": NUM_EPOCHS, "num_epochs_per_validation": 1, **more}
    return [sys.executable, str(bundle / "scripts" / "train.py"), "run",
            f"--config_file={bundle / 'configs' / 'hyper_parameters.yaml'}",
            *(f"--{key}={json.dumps(value)}" for key, value in settings.items())]


def start(bundle: Path, env: dict | None = None, **more) -> subprocess.Popen:
    """One intra-op thread per run: the reference and the killed run share the cores without oversubscription
    (CPU results are bit-identical for a fixed thread count; sums are split differently across threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(train_command(bundle, **more), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, output[-3000:]
    return output


def epochs_saved(bundle: Path) -> int:
    """Epochs in model_last.pt; it is replaced atomically, so whatever is there is a whole checkpoint."""
    path = bundle / "model" / "model_last.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"] if path.exists() else 0


def kill_after(process: subprocess.Popen, bundle: Path, epoch: int, sig: int = signal.SIGKILL) -> int:
    deadline = time.monotonic() + TIMEOUT_S
    while epochs_saved(bundle) < epoch:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training never reached the epoch to kill at"
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=TIMEOUT_S)
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
    assert interrupted.returncode == -signal.SIGKILL
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


# Stands in for mlflow in the trainer's process (first on its path): records the calls MlflowSink makes.
FAKE_MLFLOW = """
import json, os, types

def _record(call, **kwargs):
    with open(os.environ["FAKE_MLFLOW_CALLS"], "a") as calls:
        calls.write(json.dumps([call, kwargs]) + "\\n")

def set_tracking_uri(uri): _record("set_tracking_uri", uri=uri)
def set_experiment(name): _record("set_experiment", name=name)
def start_run(run_id=None, run_name=None):
    _record("start_run", run_id=run_id, run_name=run_name)
    return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))
def log_params(params): _record("log_params")
def log_metrics(metrics, step=None, synchronous=True): _record("log_metrics", step=step)
def log_metric(key, value): _record("log_metric", key=key)
def end_run(status="FINISHED"): _record("end_run", status=status)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM handling is POSIX")
def test_sigterm_stops_training_with_its_mlflow_run_ended_killed_not_left_running(bundle, tmp_path):
    """The driver prunes a trial with SIGTERM; without a handler the process died at once and its MLflow run stayed
    RUNNING for good. Now it unwinds: the run is ended KILLED, the log says where it stopped, a rerun continues."""
    fake, calls = tmp_path / "fake_mlflow", tmp_path / "calls.jsonl"
    fake.mkdir()
    (fake / "mlflow.py").write_text(FAKE_MLFLOW)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])),
           "FAKE_MLFLOW_CALLS": str(calls)}
    process = start(bundle, env=env, mlflow_tracking_uri="file:///unused")
    stopped_after = kill_after(process, bundle, 2, sig=signal.SIGTERM)
    output = process.communicate()[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert recorded[0] == ["set_tracking_uri", {"uri": "file:///unused"}]
    assert recorded[-1] == ["end_run", {"status": "KILLED"}]
    assert [name for name, _ in recorded].count("end_run") == 1
    log = (bundle / "model" / "training.log").read_text()
    assert f"stopped after epoch {stopped_after}/{NUM_EPOCHS}; training this bundle again continues" in log

    calls.unlink()
    resumed = finish(start(bundle, env=env, mlflow_tracking_uri="file:///unused"))
    assert f"after epoch {stopped_after}" in resumed
    assert ["start_run", {"run_id": "run-1", "run_name": None}] in [json.loads(line) for line in
                                                                    calls.read_text().splitlines()]
    assert json.loads(calls.read_text().splitlines()[-1]) == ["end_run", {"status": "FINISHED"}]
