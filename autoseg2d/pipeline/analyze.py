"""Stage 2/7: MONAI's DataAnalyzer, run once per work dir."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

import torch
import yaml
from monai.apps.auto3dseg import DataAnalyzer

from autoseg2d import run_log
from autoseg2d.run.workdir import WorkDir
from autoseg2d.templates import template_config, template_module

logger = logging.getLogger(__name__)


def by_case_file(datastats: Path) -> Path:
    return datastats.with_name(datastats.stem + "_by_case.yaml")


def analyze(work: WorkDir, datalist: Path, dataroot: Path) -> Path:
    """Write datastats.yaml (and its by-case file) unless a finished analysis is there."""
    if work.datastats.exists() and by_case_file(work.datastats).exists():
        logger.info(f"analysis: reusing {work.relative(work.datastats)}")
        return work.datastats
    scratch = work.root / f".analysis-{socket.gethostname()}-{os.getpid()}"  # machines sharing the work dir
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info(f"analysis: DataAnalyzer on {datalist.name} ({device})")
    with run_log.stderr_to_log("monai.apps.auto3dseg.data_analyzer"):  # its progress bar: the log file's
        DataAnalyzer(str(datalist), str(dataroot), output_path=str(scratch / "datastats.yaml"), device=device,
                     worker=0).get_all_case_stats()
    os.replace(by_case_file(scratch / "datastats.yaml"), by_case_file(work.datastats))
    os.replace(scratch / "datastats.yaml", work.datastats)  # last: its presence marks the stage done
    shutil.rmtree(scratch, ignore_errors=True)
    return work.datastats


def settings_for_slice_thickness(datastats: Path, train_overrides: dict) -> dict:
    """{"force_2d": True} when slices are thinner than the template's min_anisotropy asks for, else {}.

    The template's own rule skips 2D for such data inside a multi-algorithm AutoRunner, where a 3D
    algorithm takes over; run_autoseg.py exists to train this template, so it says so once and trains.
    A profile whose train_overrides set force_2d: false refuses such data instead.
    """
    config = template_module("bundle_config").load_config(str(template_config()), **train_overrides)
    if config["force_2d"]:
        return {}
    ratio, note = template_module("planning").derive_anisotropy(yaml.safe_load(datastats.read_text()))
    if ratio >= config["min_anisotropy"]:
        return {}
    below = f"{note} < min_anisotropy {config['min_anisotropy']:g}"
    if "force_2d" in train_overrides:
        raise ValueError(f"{below}, and the profile's train_overrides set force_2d: false, which refuses such data; "
                         "remove force_2d from the profile to train 2D anyway")
    logger.info(f"analysis: {below}: thin slices for a 2D model (a 3D one sees context that 2D does not); "
                "training 2D anyway (put force_2d: false in the profile's train_overrides to refuse such data)")
    return {"force_2d": True}
