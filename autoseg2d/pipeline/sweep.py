"""Stage 3/7: an Optuna sweep over input variants and training settings, resumable from its storage.

Each trial trains the profile's sweep folds in bundles named by its settings; the study
lives in SQLite in the work dir by default, or in any Optuna RDB URL (--storage) shared by
several machines. Hopeless trials are pruned at their validation epochs (median rule), but
only after a warm-up: early Dice favours fast starters (high learning rates) over the
configurations that end best.

Each input variant's first trial runs at the values the bundle trains with (the paper's learning
rate), queued once by the process that creates the study; the sampler draws the rest. However many
processes share the study, it runs exactly `num_trials` trials: a trial runs only when fewer than
that many trials that are not failed come before it in the storage's numbering (place_in_sweep).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import optuna

from autoseg2d.run import work_queue

logger = logging.getLogger(__name__)

STUDY_NAME = "segresnet2d"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
EPOCHS_PER_FOLD_STEP = 100_000  # report steps: fold index * this + epoch
PRUNE_WARMUP_FRACTION = 0.25  # no trial is pruned before this share of its epochs
POLL_S = 5  # how often a process whose trials are done looks whether the others' have finished
QUEUED = "first_trials_queued"  # study attribute: the creator has queued each variant's first trial
SURPLUS = "surplus"  # trial attribute: it lost the race for the last place and did not run


def suggest(trial: optuna.Trial, search_space: dict) -> dict:
    """Sample one value per search-space entry: {choices: [...]} or {low, high, log}."""
    params = {}
    for name, space in search_space.items():
        if "choices" in space:
            params[name] = trial.suggest_categorical(name, list(space["choices"]))
        elif isinstance(space.get("low"), int) and isinstance(space.get("high"), int):
            params[name] = trial.suggest_int(name, space["low"], space["high"], log=space.get("log", False))
        else:
            params[name] = trial.suggest_float(name, space["low"], space["high"], log=space.get("log", False))
    return params


def open_study(storage: str, shared: bool = False) -> optuna.Study:
    """shared: several processes use the storage; then the sampler is unseeded (a fixed seed would make
    them all draw the same parameters and train the same bundles) and trials keep heartbeats."""
    return _create_or_load(storage, shared)[0]


def _create_or_load(storage: str, shared: bool) -> tuple[optuna.Study, bool]:
    """The study and whether this process created it (the storage refuses a second one: one creator)."""
    options = dict(study_name=STUDY_NAME, storage=work_queue.shared_storage(storage) if shared else storage,
                   sampler=optuna.samplers.TPESampler(seed=None if shared else 0),
                   pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    try:
        return optuna.create_study(direction="maximize", **options), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**options), False


def requeue_interrupted(study: optuna.Study) -> None:
    """Trials left RUNNING by a killed run are failed and queued again with the same parameters;
    their bundles are found by name, so training continues where it stopped."""
    for trial in study.get_trials(deepcopy=True, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        study.enqueue_trial(params, user_attrs=trial.user_attrs, skip_if_exists=False)
        logger.info(f"sweep: trial {trial.number} was interrupted; queued again with {params}")


def first_trials(search_space: dict, first_params: dict) -> list[dict]:
    """One trial per input variant (or one, without variants), each at the values the bundle trains with
    (first_params, e.g. the template's learning_rate), before the sampler draws any."""
    variants = search_space.get("input_variant", {}).get("choices", [])
    if not variants:
        return [dict(first_params)] if first_params else []
    return [{"input_variant": variant, **first_params} for variant in variants]


def place_in_sweep(study: optuna.Study, number: int) -> int:
    """How many trials come before trial `number` in the sweep: those with a smaller number that are neither
    failed (a failed trial's copy queued again counts instead) nor surplus.

    Trial numbers are given out by the storage, one at a time, so every process ranks the trials alike:
    a trial runs only when fewer than `num_trials` come before it. Running and waiting trials count, so
    N processes never run more than `num_trials` between them, and a dead machine's trial, failed by its
    stale heartbeat, leaves its place to its queued copy.
    """
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and _counts(t))


def _counts(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state != optuna.trial.TrialState.FAIL and not trial.user_attrs.get(SURPLUS)


def run_sweep(storage: str, search_space: dict, num_trials: int, folds: list[int],
              train_fold: Callable[[dict, int, Callable[[int, float, int], bool]], float],
              single_owner: bool = True, first_params: dict | None = None,
              on_trial_start: Callable[[int], None] = lambda trials_left: None) -> optuna.Study:
    """Run trials until num_trials are complete or pruned, on this process and any other sharing the storage.

    train_fold(params, fold, on_validation) -> best Dice (runner.train_trial_fold in a run), where
    on_validation(epoch, dice, num_epochs) returns True when the trial is to stop (pruned). first_params:
    the values each input variant's first trial takes (profiles.first_trial_params); the sampler draws the
    rest. on_trial_start(trials left, this one included) is called as each trial starts. With several
    processes this one waits for the others' last trials (it takes over a dead one's).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, created = _create_or_load(storage, shared=not single_owner)
    if single_owner:
        requeue_interrupted(study)
    if created or single_owner:
        if not study.trials:
            for params in first_trials(search_space, first_params or {}):
                study.enqueue_trial(params)  # every variant is tried at least once, at the bundle's own settings
        study.set_user_attr(QUEUED, True)
    else:
        _wait_for_first_trials(study)

    def objective(trial: optuna.Trial) -> float:
        place = place_in_sweep(study, trial.number)
        if place >= num_trials:  # another process took the last place first
            _give_back(study, trial)
            raise optuna.TrialPruned()
        params = suggest(trial, search_space)
        logger.info(f"sweep: trial {trial.number} ({place + 1}/{num_trials}) {params}")
        on_trial_start(num_trials - place)
        scores = []
        for index, fold in enumerate(folds):
            def on_validation(epoch: int, dice: float, num_epochs: int, index: int = index) -> bool:
                trial.report(dice, index * EPOCHS_PER_FOLD_STEP + epoch)
                return past_warmup(epoch, num_epochs) and trial.should_prune()

            scores.append(train_fold(params, fold, on_validation))
        value = sum(scores) / len(scores)
        if len(folds) > 1:  # one fold's best Dice was said by its own line
            logger.info(f"sweep: trial {trial.number} mean best Dice {value:.4f} over folds {folds}")
        return value

    if _finished(study) >= num_trials:
        logger.info(f"sweep: {num_trials} trials already finished")
    while _finished(study) < num_trials:
        with warnings.catch_warnings():  # experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead machine's trial is queued again
        started = [t for t in study.get_trials(deepcopy=False) if _counts(t)
                   and t.state != optuna.trial.TrialState.WAITING]
        if len(started) < num_trials:
            study.optimize(objective, n_trials=1, catch=())
        else:
            time.sleep(POLL_S)  # the last trials run on other processes
    return study


def _finished(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if _counts(t))


def _give_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark a trial that lost the race for the last place as surplus (pruned, never counted); one that was
    queued (a variant's first trial, a dead machine's copy) goes back into the queue for a later run."""
    trial.set_user_attr(SURPLUS, True)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    fixed = frozen.system_attrs.get("fixed_params")
    if fixed is not None:
        study.enqueue_trial(fixed, user_attrs={k: v for k, v in trial.user_attrs.items() if k != SURPLUS},
                            skip_if_exists=False)


def _wait_for_first_trials(study: optuna.Study) -> None:
    """A process that did not create the study waits (at most the grace period) until the creator has queued
    the first trials, so that it does not draw a sampled trial in their place."""
    waited = 0.0
    while QUEUED not in study.user_attrs and not study.trials and waited < work_queue.GRACE_PERIOD_S:
        time.sleep(POLL_S)
        waited += POLL_S


def past_warmup(epoch: int, num_epochs: int) -> bool:
    """Whether a validation at `epoch` (1-based) of `num_epochs` may prune its trial."""
    return epoch >= PRUNE_WARMUP_FRACTION * num_epochs


def best_per_variant(study: optuna.Study, top: int) -> list[dict]:
    """Parameters of the best complete trial of each input variant, best variants first."""
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        variant = trial.params.get("input_variant", "default")
        if variant not in best or trial.value > best[variant].value:
            best[variant] = trial
    ranked = sorted(best.values(), key=lambda t: t.value, reverse=True)[:top]
    return [dict(t.params) for t in ranked]
