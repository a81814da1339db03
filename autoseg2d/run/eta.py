"""How long the run has left: the trainings still to come times the measured time per training.

The count starts from the profile (sweep_trials x sweep folds; cv_top_variants x cv_runs x folds,
less the sweep's folds that cross-validation reuses: seed 0 of a chosen configuration is the sweep's
own bundle) and is made exact as each stage learns its own (the sweep its unfinished trials,
cross-validation its untrained bundles). The time per training is the mean wall time from one
training's end to the next one's, so bundle generation and each fold's evaluation are in it; a
pruned trial counts as one (shorter) training, as later ones may be. A stage whose trainings run a
larger budget (the students: `cost` distill.BUDGET_FACTOR) counts each as that many member trainings, in what is left
and in the time measured. The ensemble and predict stages train nothing and are not in the estimate.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from autoseg2d.run.bundles import TrainingStopped

logger = logging.getLogger(__name__)

STAGE_WORDS = {"sweep": "sweep", "crossval": "cross-validation", "distill": "student"}


def planned_trainings(profile: dict, num_folds: int) -> dict[str, int]:
    """Trainings per stage as the profile plans them, before any stage has run."""
    sweep_folds = len(profile["sweep_folds"])
    crossval = profile["cv_top_variants"] * profile["cv_runs"] * num_folds
    planned = {"sweep": profile["sweep_trials"] * sweep_folds,
               "crossval": max(crossval - profile["cv_top_variants"] * sweep_folds, 0)}
    if profile["distill"]:  # one student per fold, then one on every case
        planned["distill"] = num_folds + 1
    return planned


def format_duration(seconds: float) -> str:
    """'45 s', '2.5 min', '40 min', '1 h 40 min': as precise as a reader of an estimate needs."""
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class RunClock:
    """Counts the trainings left per stage and times the ones that run; logs the estimate after each."""

    def __init__(self, left: dict[str, int], is_trained: Callable[[Path], bool], *, enabled: bool = True,
                 now: Callable[[], float] = time.monotonic, cost: dict[str, float] | None = None):
        self.left, self.is_trained, self.enabled, self.now = dict(left), is_trained, enabled, now
        self.cost = dict(cost or {})  # stage -> one of its trainings in member trainings (absent: 1)
        self.cycles: list[float] = []  # seconds per member training, each measured one divided by its cost
        self.mark: float | None = None

    def cost_of(self, stage: str) -> float:
        return self.cost.get(stage, 1)

    def start(self) -> None:
        """Trainings are timed from here on (not the analysis before them)."""
        self.mark = self.now()

    def plan(self, stage: str, trainings: int) -> None:
        if self.enabled:
            self.left[stage] = max(int(trainings), 0)

    def plan_bundles(self, stage: str, bundles: Iterable[Path]) -> None:
        """The stage trains these bundles: the ones not yet trained (or not yet generated) are left."""
        if self.enabled:
            self.plan(stage, sum(not (Path(b).exists() and self.is_trained(Path(b))) for b in bundles))

    @contextlib.contextmanager
    def training(self, stage: str, bundle: Path) -> Iterator[None]:
        """Around one training of `stage`: it is done once it ends or is stopped (pruned); an error leaves it
        to come. A bundle trained before was not in the stage's count and is not timed."""
        runs = self.enabled and not self.is_trained(Path(bundle))
        try:
            yield
        except TrainingStopped:
            self.finished(stage, runs)
            raise
        self.finished(stage, runs)

    def finished(self, stage: str, ran: bool) -> None:
        """ran: a training ran (False: its bundle was trained before); the next timing starts now either way."""
        if not self.enabled:
            return
        now = self.now()
        if ran:
            self.left[stage] = max(self.left.get(stage, 0) - 1, 0)
            if self.mark is not None:
                self.cycles.append((now - self.mark) / self.cost_of(stage))
        self.mark = now
        line = self.describe()
        if ran and line:
            logger.info(line)

    def describe(self) -> str | None:
        """'~1 h 36 min left: 12 trainings x ~8.0 min (...)'; None before the first timed training."""
        if not self.cycles:
            return None
        left = sum(self.left.values())
        if not left:
            return "no trainings left; then the stages that train nothing"
        each = sum(self.cycles) / len(self.cycles)
        units = sum(n * self.cost_of(stage) for stage, n in self.left.items())
        parts = ", ".join(f"{n} {STAGE_WORDS.get(stage, stage)}"
                          + (f" at {self.cost_of(stage):g}x" if self.cost_of(stage) != 1 else "")
                          for stage, n in self.left.items() if n)
        return (f"~{format_duration(units * each)} left: {left} training{'s' if left > 1 else ''} x "
                f"~{format_duration(each)} ({parts}; then the stages that train nothing)")


NO_CLOCK = RunClock({}, lambda bundle: False, enabled=False)  # for callers that keep no estimate
