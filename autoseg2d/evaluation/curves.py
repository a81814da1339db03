"""Training curves (loss, validation Dice, learning rate per epoch) from the trainer's log CSV.

The trainer writes training_log.csv in its bundle's ckpt_path with the columns that the
template's bundle_contract.LOG_COLUMNS names; ``val_dice`` is empty on epochs without validation.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from autoseg2d.atomic_files import atomic_path
from autoseg2d.templates import CONTRACT, template_module

CURVES_PNG = "training_curves.png"


def read_training_log(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of the log as float arrays; an empty cell (no validation that epoch) becomes NaN."""
    path = Path(path)
    columns = template_module(CONTRACT).LOG_COLUMNS
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"training log {str(path)!r} lacks columns {missing}; expected header {','.join(columns)}."
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"training log {str(path)!r} has a header but no epochs yet; plot after the first epoch.")
    log: dict[str, np.ndarray] = {}
    for column in columns:
        try:
            log[column] = np.array([float(row[column]) if row[column].strip() else math.nan for row in rows])
        except ValueError as error:
            raise ValueError(f"training log {str(path)!r}, column {column!r}: {error}") from error
    return log


def plot_training_curves(log_csv: str | Path, output_png: str | Path | None = None) -> Path:
    """Three stacked panels sharing the epoch axis; defaults to training_curves.png beside the log.

    The learning rate is drawn on a log axis when it stays positive, because schedules such
    as cosine or warm-up span orders of magnitude.
    """
    log = read_training_log(log_csv)
    output_png = Path(output_png) if output_png is not None else Path(log_csv).with_name(CURVES_PNG)
    figure = Figure(figsize=(7, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, dice_axes, lr_axes = figure.subplots(3, 1, sharex=True)
    loss_axes.plot(log["epoch"], log["loss"], color="tab:blue")
    loss_axes.set_ylabel("training loss")
    validated = ~np.isnan(log["val_dice"])
    dice_axes.plot(log["epoch"][validated], log["val_dice"][validated], color="tab:green", marker="o")
    if validated.any():
        best = int(np.nanargmax(log["val_dice"]))
        dice_axes.set_title(f"best validation Dice {log['val_dice'][best]:.4f} at epoch {log['epoch'][best]:g}",
                            fontsize=9)
    dice_axes.set_ylabel("validation Dice")
    lr_axes.plot(log["epoch"], log["learning_rate"], color="tab:orange")
    if np.all(log["learning_rate"] > 0):
        lr_axes.set_yscale("log")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("epoch")
    for axes in (loss_axes, dice_axes, lr_axes):
        axes.grid(alpha=0.3)
    with atomic_path(output_png) as temporary:
        figure.savefig(temporary)
    return output_png
