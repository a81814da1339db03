"""A queue of jobs shared by several machines through the Optuna RDB storage of the sweep (--storage).

Cross-validation puts one job per bundle in the queue; every machine takes the next waiting job
(Optuna hands a waiting trial to one process only), so N machines train about N times faster.
A job runs as a trial with a heartbeat: when a machine dies, its job is failed after the sweep's
grace period by whichever machine looks next, and queued again for another one. A machine killed
before its trial's first heartbeat leaves nothing to go stale, so such a trial counts from its start.
A job that raised (an error, a full disk, Ctrl-C) is failed; each run queues every failed job again
once, at its start, so fixing the cause and running the same command again retries the failed jobs
and keeps the complete ones, while a job that fails every time fails each run once, not forever.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta

import optuna
import sqlalchemy
from optuna.storages._rdb import models


logger = logging.getLogger(__name__)

QUEUE_PREFIX = "segresnet2d-queue"
POLL_S = 5  # how often a machine with nothing left to take looks whether the others have finished
JOB = "job"  # the trial parameter holding the job's index
# Shared storage: each running trial records a heartbeat; one silent for GRACE_PERIOD_S (its machine died)
# is failed by whichever process looks next, and queued again with the same parameters.
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 300


class QueueError(RuntimeError):
    pass


def queue_name(kind: str, jobs: list[str]) -> str:
    """Another list of jobs is another queue; the same list (a rerun, another machine) is the same one."""
    digest = hashlib.sha256(json.dumps(jobs).encode()).hexdigest()[:10]
    return f"{QUEUE_PREFIX}-{kind}-{digest}"


def connect(storage: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The shared storage; machines that start together race to create its tables, and the losers retry."""
    for attempt in range(attempts):
        try:
            return shared_storage(storage)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):  # tables half made by another
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


def shared_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """An RDB storage whose running trials keep heartbeats; a stale one is failed and queued again. Machines that
    start together race to create its tables; the losers retry."""
    for attempt in range(attempts - 1):
        try:
            return _heartbeat_storage(url)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):  # tables half made by another
            time.sleep(1 + attempt)
    return _heartbeat_storage(url)


def _heartbeat_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))


def open_queue(storage: str, kind: str, jobs: list[str], prepare: Callable[[], None]) -> optuna.Study:
    """The queue's study; the one machine that creates it runs prepare() and then fills the queue, the
    others wait until it is filled (creating a study is atomic: the storage refuses a second one)."""
    name, rdb = queue_name(kind, jobs), connect(storage)
    try:
        study = optuna.create_study(study_name=name, storage=rdb, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=rdb)
        while "queued" not in study.user_attrs:
            logger.info(f"{kind}: waiting for the machine that fills the queue {name}")
            time.sleep(POLL_S)
        return study
    try:
        prepare()
        for index, job in enumerate(jobs):
            study.enqueue_trial({JOB: index}, user_attrs={JOB: job})
        study.set_user_attr("queued", len(jobs))
    except BaseException:  # a queue never filled would keep every later machine and rerun waiting forever
        optuna.delete_study(study_name=name, storage=rdb)
        raise
    return study


def job_states(study: optuna.Study, jobs: list[str]) -> dict[str, dict[int, float | None]]:
    """For each state (complete, running, waiting, failed): job index -> the trial's value.

    A job queued again has several trials; it counts once, by its most advanced one (complete, then
    running, then waiting), so "failed" holds only the jobs whose every trial failed.
    """
    names = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.RUNNING: "running",
             optuna.trial.TrialState.WAITING: "waiting", optuna.trial.TrialState.FAIL: "failed"}
    rank = list(names)
    best: dict[int, optuna.trial.FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=tuple(names)):
        if trial.user_attrs.get(JOB) in jobs:
            index = jobs.index(trial.user_attrs[JOB])
            if index not in best or rank.index(trial.state) <= rank.index(best[index].state):
                best[index] = trial
    states: dict[str, dict[int, float | None]] = {name: {} for name in names.values()}
    for index, trial in sorted(best.items()):
        states[names[trial.state]][index] = trial.value
    return states


def requeue_failed(study: optuna.Study, kind: str, jobs: list[str]) -> list[int]:
    """Queue again, once, each job whose every trial failed; return their indices.

    Machines starting together may each queue a job again; a newer copy is not run while an older one
    runs or has completed (is_duplicate), so a job that fails every time is tried at most once per
    machine that started in that moment, not forever.
    """
    failed = sorted(job_states(study, jobs)["failed"])
    for index in failed:
        study.enqueue_trial({JOB: index}, user_attrs={JOB: jobs[index]})
    if failed:
        logger.info(f"{kind}: jobs {[jobs[i] for i in failed]} failed in an earlier run; queued again")
    return failed


def is_duplicate(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether the trial's job is complete or taken by an older trial (a job queued again twice at once)."""
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.RUNNING)):
        if other.user_attrs.get(JOB) == trial.user_attrs[JOB] and other.number != trial.number and (
                other.state == optuna.trial.TrialState.COMPLETE or other.number < trial.number):
            return True
    return False


def has_heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> bool:
    """Whether the trial's machine ever stored a heartbeat (Optuna keeps no public accessor for this)."""
    storage = getattr(storage, "_backend", storage)  # a study's storage is a cache in front of the RDB one
    with storage.scoped_session() as session:
        return models.TrialHeartbeatModel.where_trial_id(trial_id, session) is not None


def fail_trials_without_heartbeat(study: optuna.Study, grace_period_s: float) -> list[int]:
    """Fail and queue again the running trials that never stored a heartbeat and started over
    `grace_period_s` ago; return their numbers.

    Optuna's own stale check (fail_stale_trials) skips a trial without a heartbeat, so a machine
    killed between taking a job and its first heartbeat would leave that job running forever.
    The start time is the taking machine's clock (Optuna's datetime_start), so clocks of the
    machines must agree to well within the grace period.
    """
    storage, failed = study._storage, []
    started_before = datetime.now() - timedelta(seconds=grace_period_s)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.datetime_start is None or trial.datetime_start > started_before:
            continue
        if has_heartbeat(storage, trial._trial_id):
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another machine failed it first
            continue
        failed.append(trial.number)
        requeue = storage.get_heartbeat_stale_trial_callback()
        if requeue is not None:
            requeue(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return failed


def run_queue(storage: str, kind: str, jobs: list[str], run_job: Callable[[int], float],
              prepare: Callable[[], None] = lambda: None) -> dict[int, float]:
    """Run waiting jobs until every job is complete on some machine; return {job index: run_job's value}."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_queue(storage, kind, jobs, prepare)
    requeue_failed(study, kind, jobs)  # here only: a job failing during this run is not retried by it

    def objective(trial: optuna.Trial) -> float:
        if JOB not in trial.user_attrs:  # the last waiting job went to another machine first
            raise optuna.TrialPruned()
        index = trial.suggest_int(JOB, 0, len(jobs) - 1)
        if is_duplicate(study, trial):
            logger.info(f"{kind}: {jobs[index]} is complete or taken by an older trial; trial {trial.number} "
                        "is a second copy and not run")
            raise optuna.TrialPruned()
        logger.info(f"{kind}: this machine takes {jobs[index]} (trial {trial.number})")
        return run_job(index)

    while True:
        with warnings.catch_warnings():  # experimental in Optuna 5, and what the sweep's own loop calls
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead machine's job goes back into the queue
        for number in fail_trials_without_heartbeat(study, GRACE_PERIOD_S):
            logger.info(f"{kind}: trial {number} started {GRACE_PERIOD_S} s ago without a heartbeat "
                        "(its machine died at once); queued again")
        states = job_states(study, jobs)
        if len(states["complete"]) == len(jobs):
            return states["complete"]
        if states["waiting"]:
            study.optimize(objective, n_trials=1, catch=())
        elif states["running"]:
            time.sleep(POLL_S)  # the last jobs run on other machines
        else:
            lost = sorted(set(range(len(jobs))) - set(states["complete"]))
            raise QueueError(f"{kind}: jobs {[jobs[i] for i in lost]} failed during this run on the machine that "
                             f"ran them (queue {study.study_name}); its log says why. Fix the cause and run the "
                             "same command again: the failed jobs are retried, the complete ones are kept")
