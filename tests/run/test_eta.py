"""The run's time-left estimate: trainings counted from the profile and the stages, timed with a fake clock."""

from __future__ import annotations

import logging

import pytest

from autoseg2d.run.bundles import TrainingError, TrainingStopped
from autoseg2d.run.eta import RunClock, format_duration, planned_trainings
from autoseg2d.run.profiles import load_profile
from autoseg2d.pipeline.sweep import run_sweep
from tests.pipeline.test_sweep import SPACE, fake_training


class FakeTime:
    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def clock_with(left: dict, trained: set = frozenset()) -> tuple[RunClock, FakeTime]:
    time = FakeTime()
    clock = RunClock(left, lambda bundle: str(bundle) in trained, now=time)
    clock.start()
    return clock, time


def train(clock: RunClock, time: FakeTime, stage: str, seconds: float, bundle: str = "b") -> None:
    with clock.training(stage, bundle):
        time.seconds += seconds


def test_the_profile_counts_sweep_and_crossval_trainings_less_the_reused_sweep_folds():
    assert planned_trainings(load_profile("demo"), num_folds=2) == {"sweep": 3, "crossval": 2}  # 2 x 1 x 2 - 2
    assert planned_trainings(load_profile("gpu"), num_folds=5) == {"sweep": 12, "crossval": 42}  # 3 x 3 x 5 - 3


@pytest.mark.parametrize("seconds, text", [(20, "20 s"), (150, "2.5 min"), (2400, "40 min"), (6000, "1 h 40 min")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert format_duration(seconds) == text


def test_no_estimate_before_the_first_training_then_one_line_per_training(caplog):
    clock, time = clock_with({"sweep": 4, "crossval": 9})
    assert clock.describe() is None
    with caplog.at_level(logging.INFO, logger="autoseg2d.run.eta"):
        train(clock, time, "sweep", 480)
        train(clock, time, "sweep", 240)
    assert [r.getMessage() for r in caplog.records] == [
        "~1 h 36 min left: 12 trainings x ~8.0 min (3 sweep, 9 cross-validation; then the stages that train nothing)",
        "~1 h 6 min left: 11 trainings x ~6.0 min (2 sweep, 9 cross-validation; then the stages that train nothing)",
    ]


def test_a_bundle_trained_before_is_neither_counted_nor_timed(caplog):
    """Cross-validation's plan leaves out the bundles the sweep trained; it meets them among its jobs."""
    clock, time = clock_with({"crossval": 2}, trained={"done"})
    with caplog.at_level(logging.INFO, logger="autoseg2d.run.eta"):
        train(clock, time, "crossval", 300)
        train(clock, time, "crossval", 1, bundle="done")
        assert clock.left == {"crossval": 1}
        train(clock, time, "crossval", 100)
    assert clock.cycles == [300, 100]  # the next timing starts where the skipped one ended
    assert clock.left == {"crossval": 0} and len(caplog.records) == 2
    assert caplog.records[-1].getMessage().startswith("no trainings left")


def test_a_pruned_training_counts_and_a_failed_one_is_still_to_come():
    clock, time = clock_with({"sweep": 3})
    with pytest.raises(TrainingStopped), clock.training("sweep", "b"):
        time.seconds += 60
        raise TrainingStopped("pruned")
    assert clock.left == {"sweep": 2} and clock.cycles == [60]
    with pytest.raises(TrainingError), clock.training("sweep", "b"):
        raise TrainingError("exit code 1")
    assert clock.left == {"sweep": 2}


def test_stages_replace_the_planned_count_with_their_own(tmp_path):
    clock, time = clock_with({"sweep": 12, "crossval": 42})
    trained = tmp_path / "trained"
    trained.mkdir()
    clock.is_trained = lambda bundle: bundle == trained
    clock.plan_bundles("crossval", [trained, tmp_path / "not_generated", tmp_path / "also_not"])
    assert clock.left["crossval"] == 2

    trials_left = []
    run_sweep(f"sqlite:///{tmp_path / 'optuna.db'}", SPACE, 3, [0], fake_training([]),
              on_trial_start=trials_left.append)
    assert trials_left == [3, 2, 1]


def test_a_clock_that_is_off_says_nothing(caplog):
    time = FakeTime()
    clock = RunClock({"sweep": 2}, lambda bundle: False, enabled=False, now=time)
    clock.start()
    with caplog.at_level(logging.INFO):
        train(clock, time, "sweep", 100)
    assert not caplog.records and clock.left == {"sweep": 2}


def test_a_stage_at_twice_the_budget_counts_each_training_twice(caplog):
    """The students train BUDGET_FACTOR times a member's steps: what is left and the time measured say so."""
    time = FakeTime()
    clock = RunClock({"crossval": 1, "distill": 3}, lambda bundle: False, now=time, cost={"distill": 2})
    clock.start()
    with caplog.at_level(logging.INFO, logger="autoseg2d.run.eta"):
        train(clock, time, "crossval", 300)
        train(clock, time, "distill", 660)
    assert clock.cycles == [300, 330]
    assert [r.getMessage() for r in caplog.records] == [
        "~30 min left: 3 trainings x ~5.0 min (3 student at 2x; then the stages that train nothing)",
        "~21 min left: 2 trainings x ~5.2 min (2 student at 2x; then the stages that train nothing)",
    ]
