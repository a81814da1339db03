"""Stage 3: an Optuna sweep over input variants and training settings, resumable from its storage.

Each trial trains the profile's sweep folds in bundles named by its settings; the study
lives in SQLite in the work dir by default, or in any Optuna RDB URL (--storage) shared by
several machines. Hopeless trials are pruned at their validation epochs (median rule), but
only after a warm-up: early Dice favours fast starters (high learning rates) over the
configurations that end best.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import optuna

logger = logging.getLogger(__name__)

STUDY_NAME = "segresnet2d"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
EPOCHS_PER_FOLD_STEP = 100_000  # report steps: fold index * this + epoch
PRUNE_WARMUP_FRACTION = 0.25  # no trial is pruned before this share of its epochs
# Shared storage: each running trial records a heartbeat; one silent for GRACE_PERIOD_S (its machine died)
# is failed by whichever process looks next, and queued again with the same parameters.
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 300


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


def shared_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage whose running trials keep heartbeats; a stale one is failed and queued again."""
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))


def open_study(storage: str, shared: bool = False) -> optuna.Study:
    """shared: several processes use the storage; then the sampler is unseeded (a fixed seed would make
    them all draw the same parameters and train the same bundles) and trials keep heartbeats."""
    if shared:
        storage = shared_storage(storage)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="maximize",
                               sampler=optuna.samplers.TPESampler(seed=None if shared else 0),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))


def requeue_interrupted(study: optuna.Study) -> None:
    """Trials left RUNNING by a killed run are failed and queued again with the same parameters;
    their bundles are found by name, so training continues where it stopped."""
    for trial in study.get_trials(deepcopy=True, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        logger.info(f"sweep: trial {trial.number} was interrupted; queued again with {trial.params}")


def run_sweep(storage: str, search_space: dict, num_trials: int, folds: list[int],
              train_fold: Callable[[dict, int, Callable[[int, float, int], bool]], float],
              single_owner: bool = True, on_trial_start: Callable[[int], None] = lambda trials_left: None
              ) -> optuna.Study:
    """Run trials until num_trials are complete or pruned.

    train_fold(params, fold, on_validation) -> best Dice (runner.train_trial_fold in a run), where
    on_validation(epoch, dice, num_epochs) returns True when the trial is to stop (pruned);
    on_trial_start(trials left, this one included) is called as each trial starts.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, shared=not single_owner)
    if single_owner:
        requeue_interrupted(study)
    if not study.trials:
        for variant in search_space.get("input_variant", {}).get("choices", []):
            study.enqueue_trial({"input_variant": variant})  # every variant is tried at least once

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, search_space)
        done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
        logger.info(f"sweep: trial {trial.number} ({done + 1}/{num_trials}) {params}")
        on_trial_start(num_trials - done)
        scores = []
        for index, fold in enumerate(folds):
            def on_validation(epoch: int, dice: float, num_epochs: int, index: int = index) -> bool:
                trial.report(dice, index * EPOCHS_PER_FOLD_STEP + epoch)
                return past_warmup(epoch, num_epochs) and trial.should_prune()

            scores.append(train_fold(params, fold, on_validation))
        value = sum(scores) / len(scores)
        logger.info(f"sweep: trial {trial.number} mean best Dice {value:.4f}")
        return value

    remaining = num_trials - sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(),
                       callbacks=[optuna.study.MaxTrialsCallback(num_trials, states=FINISHED)])
    else:
        logger.info(f"sweep: {num_trials} trials already finished")
    return study


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
