"""The Optuna sweep: every variant tried, finished trials kept, an interrupted trial continued."""

from __future__ import annotations

import logging

import optuna

from autoseg2d.pipeline.sweep import best_per_variant, open_study, run_sweep, suggest

SPACE = {
    "input_variant": {"choices": ["slices", "windows", "both"]},
    "learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
}


def fake_training(calls: list):
    """Stands in for training: the Dice depends on the variant, and every call is recorded."""
    def train_fold(params, fold, report):
        calls.append(params["input_variant"])
        report(1, 0.5, 4)
        return {"slices": 0.6, "windows": 0.7, "both": 0.8}[params["input_variant"]]

    return train_fold


def test_every_variant_first_then_resume_keeps_finished_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    calls: list = []
    run_sweep(storage, SPACE, 2, [0], fake_training(calls))
    assert calls == ["slices", "windows"]
    study = run_sweep(storage, SPACE, 4, [0], fake_training(calls))
    assert calls[:3] == ["slices", "windows", "both"]  # the queued third variant comes next
    assert len(calls) == 4
    assert len(study.trials) == 4
    assert [p["input_variant"] for p in best_per_variant(study, 2)] == ["both", "windows"]


def test_a_trial_killed_mid_run_is_run_again_with_its_parameters(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study(storage)
    study.enqueue_trial({"input_variant": "windows", "learning_rate": 3e-4})
    suggest(study.ask(), SPACE)  # parameters drawn, then the process is killed: the trial stays RUNNING
    calls: list = []
    study = run_sweep(storage, SPACE, 1, [0], fake_training(calls))
    assert calls == ["windows"]
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert complete[0].params == {"input_variant": "windows", "learning_rate": 3e-4}


# A machine of a shared sweep: starts a trial, says so once its heartbeat is stored (a trial without one never goes
# stale, and a loaded CPU may start the heartbeat thread late), then hangs until it is killed.
DYING_MACHINE = """
import sqlite3, sys, time
from autoseg2d.pipeline import sweep
from autoseg2d.run import work_queue
work_queue.HEARTBEAT_INTERVAL_S, work_queue.GRACE_PERIOD_S = 1, 2
def hang(params, fold, report):
    database = sqlite3.connect(sys.argv[1].removeprefix("sqlite:///"))
    while not database.execute("SELECT COUNT(*) FROM trial_heartbeats").fetchone()[0]:
        time.sleep(0.05)
    print(params["input_variant"], flush=True)
    time.sleep(600)
sweep.run_sweep(sys.argv[1], {space!r}, 3, [0], hang, single_owner=False)
"""


def test_a_shared_sweep_retries_the_trial_of_a_machine_that_died(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    from autoseg2d.run import work_queue

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    machine = subprocess.Popen([sys.executable, "-c", DYING_MACHINE.format(space=SPACE), storage],
                               stdout=subprocess.PIPE, text=True)
    died_in = machine.stdout.readline().strip()
    assert died_in == "slices"
    machine.send_signal(signal.SIGKILL)
    machine.wait()
    monkeypatch.setattr(work_queue, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(work_queue, "GRACE_PERIOD_S", 2)
    time.sleep(work_queue.GRACE_PERIOD_S + 1)  # past the grace period since its last heartbeat, however loaded the CPU
    calls: list = []
    study = run_sweep(storage, SPACE, 3, [0], fake_training(calls), single_owner=False)
    assert sorted(calls) == ["both", "slices", "windows"]  # the dead machine's trial ran again, here
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 3


def test_no_trial_is_pruned_before_a_quarter_of_its_epochs(tmp_path):
    """Three good trials, then one that is bad from the start: it may be pruned at epoch 5 of 20, not before."""
    pruned_at: list = []

    def train_fold(params, fold, report):
        bad = len(pruned_at) == 3
        for epoch in range(1, 21):
            if report(epoch, 0.1 if bad else 0.8, 20):
                pruned_at.append(epoch)
                return 0.1
        pruned_at.append(None)
        return 0.8

    run_sweep(f"sqlite:///{tmp_path / 'optuna.db'}", SPACE, 4, [0], train_fold)
    assert pruned_at == [None, None, None, 5]


def test_each_variants_first_trial_runs_the_bundles_learning_rate_then_the_sampler_draws(tmp_path):
    seen: list = []

    def train_fold(params, fold, report):
        seen.append(dict(params))
        return 0.5

    run_sweep(f"sqlite:///{tmp_path / 'optuna.db'}", SPACE, 5, [0], train_fold, first_params={"learning_rate": 2e-4})
    assert seen[:3] == [{"input_variant": v, "learning_rate": 2e-4} for v in ("slices", "windows", "both")]
    assert all(p["learning_rate"] != 2e-4 for p in seen[3:]) and len(seen) == 5


# One of two processes sharing a sweep: waits for the test's go, then runs the sweep with a training that takes
# a while, printing what it trained; the test reads both outputs.
SHARING_PROCESS = """
import logging, pathlib, sys, time
from autoseg2d.pipeline import sweep
logging.basicConfig(level=logging.INFO, format="%(message)s")
sweep.POLL_S = 0.2
go = pathlib.Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.05)
def train(params, fold, report):
    time.sleep(float(sys.argv[3]))
    print("trained", params["input_variant"], params["learning_rate"], flush=True)
    return {{"slices": 0.6, "windows": 0.7, "both": 0.8}}[params["input_variant"]]
sweep.run_sweep(sys.argv[1], {space!r}, 3, [0], train, single_owner=False, first_params={{"learning_rate": 2e-4}})
print("done", flush=True)
"""


def test_two_processes_sharing_a_sweep_run_exactly_its_trials(tmp_path):
    """Both processes start together and train for the same time, so each finishes a trial while the other's
    runs: a process that counted only finished trials would start a fourth."""
    import subprocess
    import sys

    storage, go = f"sqlite:///{tmp_path / 'shared.db'}", tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", SHARING_PROCESS.format(space=SPACE), storage, str(go), "2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        assert process.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    trained = [line.split()[1:] for out, _ in outputs for line in out.splitlines() if line.startswith("trained")]
    assert sorted(trained) == sorted([[v, "0.0002"] for v in ("slices", "windows", "both")])
    assert all(out.splitlines()[-1] == "done" for out, _ in outputs)
    places = sorted(line.split("(")[1].split(")")[0] for _, err in outputs for line in err.splitlines()
                    if line.startswith("sweep: trial") and "/3)" in line)
    assert places == ["1/3", "2/3", "3/3"]
    study = open_study(storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3


def test_a_trials_place_counts_the_running_and_waiting_trials_before_it_not_the_failed_or_surplus(tmp_path):
    from autoseg2d.pipeline.sweep import SURPLUS, place_in_sweep

    study = open_study(f"sqlite:///{tmp_path / 'optuna.db'}")
    states = optuna.trial.TrialState
    for state, attrs in ((states.COMPLETE, {}), (states.FAIL, {}), (states.PRUNED, {SURPLUS: True}),
                         (states.PRUNED, {}), (states.RUNNING, {}), (states.WAITING, {})):
        study.add_trial(optuna.trial.create_trial(state=state, value=0.5 if state == states.COMPLETE else None,
                                                  user_attrs=attrs))
    assert [place_in_sweep(study, number) for number in range(7)] == [0, 1, 1, 1, 2, 3, 4]


def test_a_trials_mean_is_logged_only_over_several_folds(tmp_path, caplog):
    """With one sweep fold the fold's own line already says the trial's best Dice."""
    with caplog.at_level(logging.INFO, logger="autoseg2d.pipeline.sweep"):
        run_sweep(f"sqlite:///{tmp_path / 'one.db'}", SPACE, 1, [0], fake_training([]))
        assert not [r for r in caplog.records if "mean best Dice" in r.getMessage()]
        run_sweep(f"sqlite:///{tmp_path / 'two.db'}", SPACE, 1, [0, 1], fake_training([]))
    assert [r.getMessage() for r in caplog.records if "mean best Dice" in r.getMessage()] == [
        "sweep: trial 0 mean best Dice 0.6000 over folds [0, 1]"]
