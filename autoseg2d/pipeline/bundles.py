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
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import yaml
from monai.apps.auto3dseg import BundleGen
from tqdm import tqdm

from autoseg2d.evaluation.curves import plot_training_curves
from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.pipeline.context import RunContext
from autoseg2d.templates import ALGO_NAME, templates_root

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
VALIDATION_LINE = re.compile(r"epoch (\d+)/(\d+) .*val_dice ([0-9.]+)")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) ")
FAILURE_TAIL_LINES = 15  # of the trainer's output, shown when it fails
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
    notes = [line[2:] for line in (bundle_path(configuration, 0) / "configs" / "hyper_parameters.yaml").read_text()
             .splitlines() if line.startswith("# ")][1:]
    logger.info(f"{describe(settings)}: planned {configuration.name} ({num_folds} fold bundles):"
                + "".join(f"\n    {note}" for note in notes))
    write_text_atomic(marker, json.dumps(settings, indent=2, sort_keys=True))  # last: marks generation done
    return configuration


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


def bundle_config(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "configs" / "hyper_parameters.yaml").read_text())


def is_trained(bundle: Path) -> bool:
    """Finished when the trainer marked its last progress.yaml entry (the whole budget ran) and model.pt exists."""
    progress_file, model = bundle / "model" / "progress.yaml", bundle / "model" / "model.pt"
    if not (progress_file.exists() and model.exists()):
        return False
    progress = yaml.safe_load(progress_file.read_text()) or []
    return bool(progress) and bool(progress[-1].get("finished"))


def bundle_score(bundle: Path) -> float:
    """The best validation Dice, read like MONAI's BundleAlgo.get_score (last entry of progress.yaml)."""
    progress = yaml.safe_load((bundle / "model" / "progress.yaml").read_text())
    return float(progress[-1]["best_avg_dice_score"])


def train_command(bundle: Path, overrides: dict) -> list[str]:
    """The current interpreter runs train.py; torchrun when several GPUs are visible (as MONAI does)."""
    script = str(bundle / "scripts" / "train.py")
    launcher = [sys.executable]
    if torch.cuda.device_count() > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={torch.cuda.device_count()}"]
    config = str(bundle / "configs" / "hyper_parameters.yaml")
    return [*launcher, script, "run", f"--config_file={config}", *(f"--{k}={v}" for k, v in overrides.items())]


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
    ``on_validation(epoch, dice, num_epochs)`` is called for every validation line; returning True stops
    the run (it can be continued later) and raises TrainingStopped.
    """
    if is_trained(bundle):
        logger.info(f"{label}: already trained (best Dice {bundle_score(bundle):.4f})")
        return bundle_score(bundle)
    overrides = {"data_list_file_path": datalist, "data_file_base_dir": dataroot}
    started, tail = time.time(), deque(maxlen=FAILURE_TAIL_LINES)
    with exclusive(bundle):
        process = subprocess.Popen(train_command(bundle, overrides), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=_die_with_parent)
        bar = tqdm(total=int(bundle_config(bundle)["num_epochs"]), desc=label, unit="epoch", leave=False,
                   dynamic_ncols=True, disable=None)  # drawn on a terminal only, not into logs
        stopped, epochs_done = False, 0
        try:
            for line in process.stdout:
                tail.append(line.rstrip())
                epoch, match = EPOCH_LINE.search(line), VALIDATION_LINE.search(line)
                if epoch:
                    bar.total = int(epoch.group(2))  # the trainer's count (num_steps may set it)
                    bar.update(int(epoch.group(1)) - epochs_done)
                    epochs_done = int(epoch.group(1))
                if match:
                    bar.set_postfix_str(f"val Dice {float(match.group(3)):.3f}")
                if match and on_validation and on_validation(int(match.group(1)), float(match.group(3)),
                                                             int(match.group(2))):
                    stopped = True
                    process.terminate()  # pruned; the bundle can be continued later
                    break
        except BaseException:  # the driver is interrupted (Ctrl-C, an error): the trainer stops too
            process.terminate()
            process.wait()
            raise
        finally:
            bar.close()
        code = process.wait()
    minutes = (time.time() - started) / 60
    if stopped:
        logger.info(f"{label}: pruned after epoch {epochs_done} ({minutes:.1f} min)")
        raise TrainingStopped(label)
    if code != 0:
        last = "\n".join(f"    {line}" for line in tail)
        raise TrainingError(f"{label}: training failed (exit code {code}); its last lines:\n{last}\n"
                            f"  full log: {bundle / 'model' / 'training.log'}")
    plot_training_curves(bundle / "model" / "training_log.csv")
    logger.info(f"{label}: best Dice {bundle_score(bundle):.4f}, {epochs_done} epochs in {minutes:.1f} min "
                f"(log: {bundle / 'model' / 'training.log'})")
    return bundle_score(bundle)
