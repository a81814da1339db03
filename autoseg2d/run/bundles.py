"""Bundles for one configuration (settings + seed), made by MONAI's BundleGen, trained as subprocesses.

Bundles live in ``bundles/<variant>-<hash of settings>/segresnet2d_<fold>``: the same settings
always map to the same folder, so a sweep trial and the cross-validation of the same
configuration share their trained folds, and a rerun finds what is already done.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
import torch
import yaml
from monai.apps.auto3dseg import BundleGen
from tqdm import tqdm

from autoseg2d.evaluation.curves import plot_training_curves
from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.templates import ALGO_NAME, BUNDLE_CONFIG, bundle_config, bundle_contract, bundle_files, templates_root
from autoseg2d.run.context import RunContext

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
EVENT_POLL_S = 0.5  # how often the driver reads the trainer's new events
FAILURE_TAIL_LINES = 15  # of the trainer's output, shown when it fails
OUTPUT_DRAIN_S = 10  # wait at most this for the last output after the trainer exits (a stray child may hold it)
QUIET_DURING_GENERATION = ("segresnet2d", "monai.apps.auto3dseg.bundle_gen")  # per-fold lines; notes logged once


class TrainingError(RuntimeError):
    pass


class TrainingStopped(Exception):
    """Raised when the on_validation callback asks to stop (e.g. an Optuna pruning decision)."""


def describe(settings: dict) -> str:
    """A short console prefix for a configuration: input variant, learning rate to two digits, seed."""
    parts = [str(settings.get("input_variant", "default"))]
    if "learning_rate" in settings:
        parts.append(f"lr {float(settings['learning_rate']):.1e}")
    if settings.get("seed"):
        parts.append(f"seed {settings['seed']}")
    return " ".join(parts)


def configuration_name(settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{settings.get('input_variant', 'default')}-{digest}"


def bundle_path(configuration: Path, fold: int) -> Path:
    return configuration / f"{ALGO_NAME}_{fold}"


def generate_bundles(context: RunContext, settings: dict) -> Path:
    """BundleGen with the local template, one bundle per fold of the run; settings reach fill_template_config
    through the data-source YAML."""
    work, num_folds = context.work, context.num_folds
    configuration = work.bundles / configuration_name(settings)
    marker = configuration / "settings.json"
    if marker.exists():
        return configuration
    configuration.mkdir(parents=True, exist_ok=True)
    data_src = configuration / "data_src.yaml"
    source = {"modality": context.modality, "datalist": str(context.datalist), "dataroot": str(context.dataroot)}
    if context.class_names:
        source["class_names"] = list(context.class_names)
    write_text_atomic(data_src, yaml.safe_dump({**source, **settings}, sort_keys=False))
    gen = BundleGen(algo_path=str(configuration), algos=[ALGO_NAME], templates_path_or_url=str(templates_root()),
                    data_stats_filename=str(work.datastats), data_src_cfg_name=str(data_src))
    with _quiet(QUIET_DURING_GENERATION):
        gen.generate(str(configuration), num_fold=num_folds)
    if not bundle_path(configuration, 0).exists():
        raise TrainingError(f"BundleGen skipped {ALGO_NAME} for {configuration.name}: its pre-check refused the data;"
                            f" the reason is in the log above ('{ALGO_NAME} skipped: ...')")
    filled = (bundle_path(configuration, 0) / BUNDLE_CONFIG).read_text()
    notes = planning_note([line[2:] for line in filled.splitlines() if line.startswith("# ")][1:],
                          yaml.safe_load(filled), context.profile["train_overrides"], settings)
    logger.debug(f"{describe(settings)}: planned {configuration.name} ({num_folds} fold bundles):"  # the log file
                 + "".join(f"\n    {note}" for note in notes))
    write_text_atomic(marker, json.dumps(settings, indent=2, sort_keys=True))  # last: marks generation done
    return configuration


NOTE_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w.]*)(\[(?P<index>\d+)\])? (?P<why>.*)$")  # "roi_size [..]: ..."


def planning_note(notes: list[str], config: dict, from_profile: dict, settings: dict) -> list[str]:
    """The template's planning notes as the bundle trains: a derived value that the profile's train_overrides
    (or the configuration's settings, e.g. a trial's) replace shows the value trained with, marked (profile) or
    (configuration), before what planning derived; num_steps > 0 replaces num_epochs; the profile's other keys
    follow, marked (profile). `config` is the bundle's filled hyper_parameters.yaml."""
    def origin(key: str) -> str | None:
        if key in from_profile and settings.get(key, from_profile[key]) == from_profile[key]:
            return "profile"
        return "configuration" if key in settings else None

    def value(key: str, index: str | None = None):
        node = config
        for part in key.split("#"):
            node = node[part]
        return node[int(index)] if index is not None else node

    shown, named = [], set()
    for note in notes:
        match = NOTE_KEY.match(note)
        key, index = (match["key"].replace(".", "#"), match["index"]) if match else ("", None)
        if key == "num_epochs" and int(config.get("num_steps", 0)) > 0:
            key, index = "num_steps", None  # the trainer's budget in optimizer steps replaces the epochs
        source = origin(key) if match else None
        if source is None:
            shown.append(note)
            continue
        named.add(key)
        label = key.replace("#", ".") + ("" if index is None else f"[{index}]")
        shown.append(f"{label} {value(key, index)} ({source}), not planning's {note}")
    shown += [f"{key.replace('#', '.')} {value(key)} (profile)" for key in from_profile
              if key not in named and origin(key) == "profile"]
    return shown


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Only warnings from these loggers while BundleGen fills each fold's bundle (the same notes each time)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def is_trained(bundle: Path) -> bool:
    """Finished when the trainer marked its last progress.yaml entry (the whole budget ran) and model.pt exists."""
    files = bundle_files(bundle)
    contract = bundle_contract(bundle)
    return files.model.exists() and contract.is_finished(contract.read_progress(files.progress))


def bundle_score(bundle: Path) -> float:
    """The best validation Dice: the last progress.yaml entry, as MONAI's BundleAlgo.get_score reads it.

    Not get_score itself: that resolves ckpt_path with the bundle_root written at generation time, so a
    moved or copied work dir would read the old place (bundle_files sets bundle_root to the folder).
    """
    files = bundle_files(bundle)
    contract = bundle_contract(bundle)
    return contract.best_score(contract.read_progress(files.progress), files.progress)


def scored(score: float) -> str:
    """'best Dice 0.8123', or what a bundle of fold -1 (every case trained, none validated: NaN) has instead."""
    return "no validation (trained on every case)" if math.isnan(score) else f"best Dice {score:.4f}"


def train_command(bundle: Path, overrides: dict) -> list[str]:
    """The bundle's train.py started as its algo starts it (bundle_contract.launch_command), on every visible GPU.

    The driver runs this command itself instead of Segresnet2dAlgo.train (MONAI's _create_cmd and _run_cmd),
    because train() blocks until the training ends, while pruning must stop the running process.
    """
    script = [str(bundle / "scripts" / "train.py"), "run", f"--config_file={bundle / BUNDLE_CONFIG}",
              *(f"--{k}={v}" for k, v in overrides.items())]
    return bundle_contract(bundle).launch_command(script, torch.cuda.device_count())


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the driver dies (even by SIGKILL), so a
    killed driver never leaves a trainer writing into the bundle that the next run will train."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def exclusive(bundle: Path) -> Iterator[None]:
    """Hold the bundle's lock file while training it: a second driver on the same work dir (another
    machine on a shared sweep, or a rerun while the first still runs) stops instead of training alongside."""
    with open(bundle / ".training.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"{bundle} is being trained by another process (it holds {lock.name}); "
                                "wait for it to finish or stop it, then run again") from None
        yield


def train_bundle(bundle: Path, label: str, *, datalist: Path, dataroot: Path,
                 on_validation: Callable[[int, float, int], bool] | None = None) -> float:
    """Train (or continue training) one bundle with a progress bar over epochs; returns its best validation Dice.

    The trainer's own lines go to its training.log; the console gets the bar and one line at the end.
    The bar follows the events the trainer appends to its events file while it runs (bundle_contract);
    ``on_validation(epoch, dice, num_epochs)`` is called for every validation there; returning True stops
    the run (it can be continued later) and raises TrainingStopped. The trainer's output is kept only
    for its last lines, shown when it fails.
    """
    if is_trained(bundle):
        score = bundle_score(bundle)
        logger.info(f"{label}: already trained ({scored(score)})")
        return score
    files, contract = bundle_files(bundle), bundle_contract(bundle)
    overrides = {"data_list_file_path": datalist, "data_file_base_dir": dataroot}
    started, tail = time.time(), deque(maxlen=FAILURE_TAIL_LINES)
    with exclusive(bundle):
        offset = contract.events_end(files.events)  # events of earlier runs are not this run's
        process = subprocess.Popen(train_command(bundle, overrides), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=_die_with_parent)
        output = threading.Thread(target=lambda: tail.extend(line.rstrip() for line in process.stdout), daemon=True)
        output.start()
        bar = tqdm(total=int(bundle_config(bundle)["num_epochs"]), desc=label, unit="epoch", leave=False,
                   dynamic_ncols=True, disable=None)  # drawn on a terminal only, not into logs
        try:
            stopped, epochs_done = follow_events(process, contract, files.events, offset, bar, on_validation)
        except BaseException:  # the driver is interrupted (Ctrl-C, an error): the trainer stops too
            process.terminate()
            process.wait()
            raise
        finally:
            bar.close()
        code = process.wait()
        output.join(timeout=OUTPUT_DRAIN_S)
    minutes = (time.time() - started) / 60
    if stopped:
        logger.info(f"{label}: pruned after epoch {epochs_done} ({minutes:.1f} min)")
        raise TrainingStopped(label)
    if code != 0:
        last = "\n".join(f"    {line}" for line in tail)
        raise TrainingError(f"{label}: training failed (exit code {code}); its last lines:\n{last}\n"
                            f"  full log: {files.text_log}")
    plot_training_curves(files.training_log)
    score = bundle_score(bundle)
    done = f"{epochs_done} epochs" if epochs_done else "trained"  # a trainer from before the event file: no count
    logger.info(f"{label}: {scored(score)}, {done} in {minutes:.1f} min (log: {files.text_log})")
    return score


def follow_events(process: subprocess.Popen, contract: ModuleType, events_file: Path, offset: int, bar: tqdm,
                  on_validation: Callable[[int, float, int], bool] | None) -> tuple[bool, int]:
    """Read the trainer's new events until it exits; returns (stopped by on_validation, epochs done).

    The process is polled before the file is read, so the events of a trainer that has just exited are
    all read once more before returning.
    """
    epochs_done = 0
    while True:
        running = process.poll() is None
        events, offset = contract.read_events(events_file, offset)
        for event in events:
            bar.total = event["num_epochs"]  # the trainer's count (num_steps may set it)
            bar.update(event["epoch"] - epochs_done)
            epochs_done = event["epoch"]
            if event["val_dice"] is None:
                continue
            bar.set_postfix_str(f"val Dice {event['val_dice']:.3f}")
            if on_validation and on_validation(event["epoch"], event["val_dice"], event["num_epochs"]):
                process.terminate()  # pruned; the bundle can be continued later
                return True, epochs_done
        if not running:
            return False, epochs_done
        time.sleep(EVENT_POLL_S)
