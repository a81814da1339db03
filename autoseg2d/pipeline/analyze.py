"""Stage 1: MONAI's DataAnalyzer, run once per work dir."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

import torch
from monai.apps.auto3dseg import DataAnalyzer

from autoseg2d.pipeline.workdir import WorkDir

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
    DataAnalyzer(str(datalist), str(dataroot), output_path=str(scratch / "datastats.yaml"), device=device,
                 worker=0).get_all_case_stats()
    os.replace(by_case_file(scratch / "datastats.yaml"), by_case_file(work.datastats))
    os.replace(scratch / "datastats.yaml", work.datastats)  # last: its presence marks the stage done
    shutil.rmtree(scratch, ignore_errors=True)
    return work.datastats
