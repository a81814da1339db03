"""The shared queue of cross-validation bundles: two machines (processes) on one SQLite storage."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoseg2d.run import work_queue
from autoseg2d.run.work_queue import QueueError, run_queue
from tests.conftest import SUBPROCESS_TIMEOUT_S

JOBS = [f"bundles/cfg/segresnet2d_{fold}" for fold in range(6)]
STEP_WAIT_S = 120  # how long a job waits for the other machine to start its next one

# A machine: takes jobs from the queue; each job writes which process ran it. No machine dies while it runs, so
# the grace period is far longer than any stall of a loaded CPU: a live machine's job is never taken over.
# Jobs run in step: a machine's n-th job ends once the other machine has started n jobs (or every job has
# started), so each machine takes half of them however late it starts or slowly it runs.
MACHINE = """
import json, os, sys, time
from pathlib import Path
from autoseg2d.run import work_queue
work_queue.HEARTBEAT_INTERVAL_S, work_queue.GRACE_PERIOD_S, work_queue.POLL_S = 1, 120, 0.2
storage, jobs, out, hang = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "hang"
def prepare():
    (out / f"prepared_{os.getpid()}").write_text("")
def started(mine):
    return len([p for p in out.glob("started_*") if p.name.endswith(f"_{os.getpid()}") == mine])
def job(index):
    if hang:  # die only after the first heartbeat is stored: a trial killed before it has none to go stale
        time.sleep(3 * work_queue.HEARTBEAT_INTERVAL_S)
    print(f"took {index}", flush=True)
    if hang:
        time.sleep(600)
    (out / f"started_{index}_{os.getpid()}").write_text("")
    deadline = time.monotonic() + float(sys.argv[5])
    while started(False) < started(True) < len(jobs) - started(False) and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / f"job_{index}_{os.getpid()}").write_text("")
    return index / 10
values = work_queue.run_queue(storage, "crossval", jobs, job, prepare)
print(json.dumps(values), flush=True)
"""


def machine(storage: str, out: Path, hang: bool = False) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[2]
    return subprocess.Popen([sys.executable, "-c", MACHINE, storage, json.dumps(JOBS), str(out),
                             "hang" if hang else "run", str(STEP_WAIT_S)], stdout=subprocess.PIPE, text=True,
                            cwd=repo)


def runs(out: Path) -> dict[int, list[str]]:
    ran: dict[int, list[str]] = {}
    for marker in out.glob("job_*"):
        _, index, pid = marker.name.split("_")
        ran.setdefault(int(index), []).append(pid)
    return ran


def test_two_machines_share_the_queue_and_train_each_bundle_once(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    machines = [machine(storage, tmp_path), machine(storage, tmp_path)]
    outputs = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0]
    ran = runs(tmp_path)
    assert sorted(ran) == list(range(len(JOBS))) and all(len(pids) == 1 for pids in ran.values())
    per_machine = {pid: sum(p == [pid] for p in ran.values()) for pid in {p[0] for p in ran.values()}}
    assert len(per_machine) == 2 and min(per_machine.values()) == 3, per_machine  # the work was shared
    assert len(list(tmp_path.glob("prepared_*"))) == 1  # one machine generated the bundles
    for output in outputs:  # each machine ends with every job's result
        assert json.loads(output.strip().splitlines()[-1]) == {str(i): i / 10 for i in range(len(JOBS))}


def test_a_dead_machines_bundle_is_taken_over_after_the_grace_period(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    dying = machine(storage, tmp_path, hang=True)
    assert dying.stdout.readline().strip() == "took 0"
    dying.send_signal(signal.SIGKILL)
    dying.wait()
    monkeypatch.setattr(work_queue, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(work_queue, "GRACE_PERIOD_S", 2)
    monkeypatch.setattr(work_queue, "POLL_S", 0.2)
    taken = []
    values = run_queue(storage, "crossval", JOBS, lambda index: taken.append(index) or 1.0)
    assert sorted(taken) == list(range(len(JOBS)))  # job 0, the dead machine's, included
    assert values == {i: 1.0 for i in range(len(JOBS))}


class PollLimit:
    """Stands in for the queue's `time` module: its waits stop the test after `seconds` instead of polling on."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def sleep(self, seconds: float) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the queue still waits for a job nobody runs")
        time.sleep(seconds)


# A machine that takes a job and is killed before Optuna's heartbeat thread stores anything (ask() starts none).
DIES_AT_ONCE = """
import os, signal, sys
from autoseg2d.run import work_queue
study = work_queue.open_queue(sys.argv[1], "crossval", {jobs}, lambda: None)
study.ask()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_machine_killed_before_its_first_heartbeat_has_its_job_taken_over_after_the_grace_period(
        tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    repo = Path(__file__).resolve().parents[2]
    dying = subprocess.run([sys.executable, "-c", DIES_AT_ONCE.format(jobs=json.dumps(JOBS)), storage], cwd=repo,
                           timeout=SUBPROCESS_TIMEOUT_S)
    assert dying.returncode == -signal.SIGKILL
    study = work_queue.open_queue(storage, "crossval", JOBS, lambda: None)
    running = study.get_trials(states=(work_queue.optuna.trial.TrialState.RUNNING,))
    assert len(running) == 1 and not work_queue.has_heartbeat(study._storage, running[0]._trial_id)
    assert work_queue.fail_trials_without_heartbeat(study, grace_period_s=3600) == []  # not yet past the grace
    monkeypatch.setattr(work_queue, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(work_queue, "GRACE_PERIOD_S", 1)
    monkeypatch.setattr(work_queue, "POLL_S", 0.2)
    monkeypatch.setattr(work_queue, "time", PollLimit(seconds=120))  # a job left running fails, not hangs
    taken = []
    values = run_queue(storage, "crossval", JOBS, lambda index: taken.append(index) or 1.0)
    assert sorted(taken) == list(range(len(JOBS)))  # job 0, the dead machine's, included
    assert values == {i: 1.0 for i in range(len(JOBS))}


def test_a_job_that_failed_elsewhere_during_the_run_stops_the_others_with_its_name(tmp_path, monkeypatch):
    """A job another machine fails during this run is not retried by it: the run ends, saying to run again."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setattr(work_queue, "POLL_S", 0.1)
    monkeypatch.setattr(work_queue, "time", PollLimit(seconds=60))  # a job retried forever fails, not hangs
    calls = []

    def job(index: int) -> float:
        calls.append(index)
        other_machine = work_queue.open_queue(storage, "crossval", JOBS[:2], lambda: None)
        taken = other_machine.ask()  # the next waiting job, job 1, and its training raises there
        other_machine.tell(taken, state=work_queue.optuna.trial.TrialState.FAIL)
        return 1.0

    with pytest.raises(QueueError, match=r"jobs \['bundles/cfg/segresnet2d_1'\] failed .* run the same command "
                                         r"again: the failed jobs are retried"):
        run_queue(storage, "crossval", JOBS[:2], job)
    assert calls == [0]


def test_a_job_that_raised_is_retried_by_the_next_run_and_complete_jobs_are_not_run_again(
        tmp_path, monkeypatch, caplog):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setattr(work_queue, "POLL_S", 0.1)
    calls, broken = [], {1}

    def job(index: int) -> float:
        calls.append(index)
        if index in broken:
            raise OSError("No space left on device")
        return index / 10

    with pytest.raises(OSError, match="No space left"):
        run_queue(storage, "crossval", JOBS[:3], job)
    assert calls == [0, 1]
    broken.clear()  # the user freed the disk
    calls.clear()
    with caplog.at_level(logging.INFO, logger=work_queue.__name__):
        assert run_queue(storage, "crossval", JOBS[:3], job) == {0: 0.0, 1: 0.1, 2: 0.2}
    assert sorted(calls) == [1, 2]  # job 0 completed in the first run
    assert "jobs ['bundles/cfg/segresnet2d_1'] failed in an earlier run; queued again" in caplog.text
    calls.clear()
    assert run_queue(storage, "crossval", JOBS[:3], job) == {0: 0.0, 1: 0.1, 2: 0.2}
    assert calls == []


def test_ctrl_c_in_a_job_fails_its_trial_and_the_next_run_retries_it(tmp_path, monkeypatch):
    """Optuna's optimize fails the trial on a KeyboardInterrupt and raises it again; it is not left running."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setattr(work_queue, "POLL_S", 0.1)
    calls = []

    def interrupted(index: int) -> float:
        calls.append(index)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_queue(storage, "crossval", JOBS[:2], interrupted)
    study = work_queue.open_queue(storage, "crossval", JOBS[:2], lambda: None)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]  # failed now, not after the grace
    assert run_queue(storage, "crossval", JOBS[:2], lambda index: calls.append(index) or 1.0) == {0: 1.0, 1: 1.0}
    assert calls == [0, 1, 0]


def test_a_job_queued_again_counts_by_its_newest_trial_and_a_second_copy_is_not_run(tmp_path, monkeypatch):
    """Two machines that start together may both queue a failed job again: one copy runs, the other is skipped."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setattr(work_queue, "POLL_S", 0.1)
    fail = work_queue.optuna.trial.TrialState.FAIL
    study = work_queue.open_queue(storage, "crossval", JOBS[:3], lambda: None)
    for _ in range(3):  # jobs 0, 1, 2 fail on their first try
        study.tell(study.ask(), state=fail)
    study.enqueue_trial({work_queue.JOB: 1}, user_attrs={work_queue.JOB: JOBS[1]})
    study.tell(study.ask(), 0.5)  # job 1 retried and complete
    assert work_queue.job_states(study, JOBS[:3]) == {
        "complete": {1: 0.5}, "running": {}, "waiting": {}, "failed": {0: None, 2: None}}
    for _ in range(2):  # the race: two machines saw job 0 failed before either had queued it again
        study.enqueue_trial({work_queue.JOB: 0}, user_attrs={work_queue.JOB: JOBS[0]})
    assert work_queue.requeue_failed(study, "crossval", JOBS[:3]) == [2]
    assert work_queue.requeue_failed(study, "crossval", JOBS[:3]) == []  # a machine starting later sees them queued
    assert work_queue.job_states(study, JOBS[:3])["waiting"] == {0: None, 2: None}
    other_machine = study.ask()  # takes job 0 (the older copy)
    assert work_queue.job_states(study, JOBS[:3])["running"] == {0: None}
    calls = []

    def job(index: int) -> float:
        calls.append(index)
        if index == 2:
            study.tell(other_machine, 0.7)  # the other machine finishes job 0 meanwhile
        return 1.0

    assert run_queue(storage, "crossval", JOBS[:3], job) == {0: 0.7, 1: 0.5, 2: 1.0}
    assert calls == [2]  # the second copy of job 0 found it taken by the older one and was not run


def test_a_queue_whose_preparation_failed_is_made_again_by_the_next_run(tmp_path, monkeypatch):
    """Before: the study stayed without its 'queued' mark and every later run waited for it forever."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setattr(work_queue, "POLL_S", 0.1)

    def failing_prepare() -> None:
        raise RuntimeError("BundleGen failed")

    with pytest.raises(RuntimeError, match="BundleGen failed"):
        run_queue(storage, "crossval", JOBS[:2], lambda index: 1.0, prepare=failing_prepare)
    monkeypatch.setattr(work_queue, "time", PollLimit(seconds=0))  # the old code would wait here, forever
    assert run_queue(storage, "crossval", JOBS[:2], lambda index: index / 10) == {0: 0.0, 1: 0.1}


def test_crossval_with_a_storage_trains_each_bundle_through_the_queue(tmp_path, monkeypatch):
    from autoseg2d.pipeline import crossval
    from autoseg2d.run.context import RunContext
    from autoseg2d.run.workdir import WorkDir

    work = WorkDir.create(str(tmp_path / "work"))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    context = RunContext(work=work, source_datalist=tmp_path / "datalist.json", datalist=tmp_path / "datalist.json",
                         dataroot=tmp_path, modality="ct", profile_name="demo", profile={}, profile_sha256="",
                         num_folds=2, class_names=(), training=(), testing=(), storage=storage, skip_bad=False)
    trained: list[str] = []
    name = lambda settings: f"{settings['input_variant']}-{settings['seed']}"  # noqa: E731
    monkeypatch.setattr(crossval, "generate_bundles", lambda context, settings: context.work.bundles / name(settings))
    monkeypatch.setattr(crossval, "configuration_name", name)
    monkeypatch.setattr(crossval, "train_bundle",
                        lambda bundle, label, datalist, dataroot: trained.append(bundle.name) or 0.5)
    monkeypatch.setattr(crossval, "evaluate_bundle", lambda bundle, fold, validation: [{"case_id": "c", "dice": 0.5}])
    monkeypatch.setattr(crossval, "cross_validation_table", lambda records, selection_folds=(): "| table |")
    records, table = crossval.run_crossval(context, [{"input_variant": "slices"}], seeds=2)
    assert [(r["seed"], r["fold"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert table == (work.reports / "cross_validation.md").read_text() == "# Cross-validation\n\n| table |"
    assert len(trained) == 8  # through the queue, then once more to gather (a trained bundle returns at once)
    study = work_queue.optuna.load_study(study_name=work_queue.queue_name("crossval", [
        f"bundles/slices-{seed}/segresnet2d_{fold}" for seed in range(2) for fold in range(2)]), storage=storage)
    assert len(study.trials) == 4


# A machine at the ensemble stage; building is replaced by a 2 s stand-in that marks who built.
ENSEMBLE_MACHINE = """
import json, os, sys, time
from autoseg2d.pipeline import ensemble
from autoseg2d.run import work_queue
from autoseg2d.run.workdir import WorkDir
work_queue.HEARTBEAT_INTERVAL_S, work_queue.GRACE_PERIOD_S, work_queue.POLL_S = 1, 120, 0.2  # nobody dies here
def make(work, records, size, mode, selection, tolerance, screen_below, *, training, dataroot):
    (work.root / f"built_{os.getpid()}").write_text("")
    time.sleep(2)
    return {"mode": mode, "selection": selection, "members": records[:size], "built_by": os.getpid()}
ensemble.make_ensemble = make
records = [{"bundle": f"bundles/b{i}", "fold": i % 2, "score": 0.5} for i in range(4)]
built = ensemble.build_ensemble(WorkDir.create(sys.argv[2]), records, 2, "mean", storage=sys.argv[1], training=(),
                                dataroot=None)
print(built["built_by"], flush=True)
"""


def test_machines_sharing_a_storage_build_the_ensemble_once_and_all_read_it(tmp_path):
    storage, work = f"sqlite:///{tmp_path / 'shared.db'}", tmp_path / "work"
    repo = Path(__file__).resolve().parents[2]
    machines = [subprocess.Popen([sys.executable, "-c", ENSEMBLE_MACHINE, storage, str(work)], cwd=repo,
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [m.communicate(timeout=600)[0].split() for m in machines]
    assert [m.returncode for m in machines] == [0, 0]
    builders = [p.name.split("_")[1] for p in work.glob("built_*")]
    assert len(builders) == 1 and outputs == [builders, builders]
    assert json.loads((work / "ensemble" / "ensemble.json").read_text())["built_by"] == int(builders[0])
