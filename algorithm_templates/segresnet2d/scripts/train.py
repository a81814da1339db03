"""Entry point MONAI runs: ``python scripts/train.py run --config_file=configs/hyper_parameters.yaml [--key=value]``."""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules; MONAI runs this as a plain file

import fire  # noqa: E402

from bundle_config import load_config  # noqa: E402
from distributed import leave_finished_process, session  # noqa: E402
from trainer import Trainer  # noqa: E402

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config_file: str | list[str] | None = None, **override) -> float:
    """Train one fold; returns the best validation Dice. Any config key can be overridden: --num_epochs=10.

    Under torchrun (``torchrun --nproc_per_node=N scripts/train.py run ...``, which MONAI starts
    itself when several GPUs are visible) every process trains its share of each batch (DDP).
    """
    config_file = config_file or os.path.join(BUNDLE_ROOT, "configs", "hyper_parameters.yaml")
    with session() as processes:
        return Trainer(load_config(config_file, **override), processes).fit()


def stop_on_terminate(signum: int, frame) -> None:
    """SIGTERM (the driver pruning a trial, a job scheduler, torchrun stopping its workers) unwinds the training
    as Ctrl-C does, so its trackers record the run as stopped instead of leaving it running."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_on_terminate)
    fire.Fire({"run": run})
    leave_finished_process()  # reached only when training finished: an error has raised out of fire already
