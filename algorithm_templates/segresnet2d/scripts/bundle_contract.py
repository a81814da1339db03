"""The bundle's files and their formats, for the scripts that write them and the driver that reads them.

Every file a trained bundle holds is found from its config's ``ckpt_path`` (MONAI's
``BundleAlgo.get_score`` looks for progress.yaml there too). The trainer writes them; the
driver loads this module from the bundle's own scripts and reads them only through it, so
both sides always agree on names and formats. Only the standard library, numpy, nibabel and
yaml are imported: the driver can load this file without the rest of the template.

Formats:
- training_log.csv: one row per epoch, columns LOG_COLUMNS; val_dice is empty on epochs without validation.
- progress.yaml: a list with one entry per new best model; MONAI reads SCORE_KEY of the last entry.
  The trainer adds FINISHED_KEYS to the last entry when the whole budget ran. A training without
  validation (fold -1) writes one entry at the end, its SCORE_KEY null.
- events.jsonl: one JSON object per finished epoch with EVENT_KEYS (val_dice null when the epoch did
  not validate), appended while the trainer runs: the live signal for progress bars and pruning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

LOG_COLUMNS = ("epoch", "loss", "val_dice", "learning_rate", "epoch_time_s")
SCORE_KEY = "best_avg_dice_score"  # MONAI's name (BundleAlgo.get_score)
FINISHED_KEYS = ("finished", "num_epochs", "num_steps")  # added to the last progress.yaml entry at the end
EVENT_KEYS = ("epoch", "num_epochs", "loss", "val_dice")


@dataclass(frozen=True)
class BundleFiles:
    """The files of one bundle, all in its ckpt_path folder."""

    ckpt_path: Path

    @property
    def model(self) -> Path:
        """Best weights (MONAI's name), with the inputs the model was trained on."""
        return Path(self.ckpt_path) / "model.pt"

    @property
    def last_model(self) -> Path:
        """Everything needed to resume after the last finished epoch."""
        return Path(self.ckpt_path) / "model_last.pt"

    @property
    def progress(self) -> Path:
        return Path(self.ckpt_path) / "progress.yaml"

    @property
    def training_log(self) -> Path:
        return Path(self.ckpt_path) / "training_log.csv"

    @property
    def text_log(self) -> Path:
        """The trainer's human-readable lines (what its console shows)."""
        return Path(self.ckpt_path) / "training.log"

    @property
    def events(self) -> Path:
        return Path(self.ckpt_path) / "events.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (scripts/tracking.py), where tensorboard is installed."""
        return Path(self.ckpt_path) / "tensorboard"

    @property
    def mlflow_run_id(self) -> Path:
        """The id of the bundle's MLflow run, so that a resumed training continues it."""
        return Path(self.ckpt_path) / "mlflow_run_id.txt"

    @property
    def openvino_model(self) -> Path:
        """The network converted by OpenVINO (with a .bin beside it), kept next to model.pt and marked with
        model.pt's sha256 (runtime.py)."""
        return Path(self.ckpt_path) / "model_openvino.xml"

    @property
    def cv_metrics(self) -> Path:
        """The driver's per-case cross-validation metrics of this fold model."""
        return Path(self.ckpt_path) / "cv_metrics.json"


def launch_command(script_command: list[str], num_devices: int) -> list[str]:
    """How a bundle script is started: with this interpreter, under torchrun when several GPUs of one node train.

    torchrun runs as ``python -m torch.distributed.run`` of this interpreter, not a ``torchrun`` found on
    PATH that may belong to another environment (MONAI's BundleAlgo._run_cmd runs the latter).
    """
    if num_devices <= 1:
        return [sys.executable, *script_command]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(num_devices),
            *script_command]


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside target, renamed onto it when the block succeeds (removed when it fails).

    A crash or a reader in another process sees the old file or the new one, never half of one. The
    temporary name keeps the file's name at its end (nibabel and OpenVINO pick the format from it) and
    carries host and process id, so DDP ranks and machines sharing a folder never collide.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp_{socket.gethostname()}-{os.getpid()}_{target.name}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_mask(mask: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, target: str | Path) -> Path:
    """A label mask as uint8 NIfTI with the source image's affine and header (no intensity scaling)."""
    header = header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1, 0
    with atomic_path(target) as temporary:
        nib.save(nib.Nifti1Image(np.asarray(mask).astype(np.uint8), affine, header), str(temporary))
    return Path(target)


def save_openvino_model(model, xml_path: str | Path) -> Path:
    """An OpenVINO model as xml_path and the .bin beside it, each written under a temporary name first.

    OpenVINO writes the .bin beside the .xml it is given, so the two temporary names pair up the same
    way; the .bin is renamed first, and a reader never finds a new .xml beside old weights.
    """
    import openvino as ov

    xml_path = Path(xml_path)
    with atomic_path(xml_path) as temporary, atomic_path(xml_path.with_suffix(".bin")):
        ov.save_model(model, str(temporary), compress_to_fp16=False)
    return xml_path


def checkpoint_sha256(path: str | Path) -> str | None:
    """sha256 of a checkpoint's bytes (None without one): what a kept conversion was made from. Not its
    file time, which a copy without -p, an unzip, a restore or a container build resets."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_progress(path: str | Path) -> list[dict]:
    """progress.yaml as a list of entries ([] when the file is missing or empty)."""
    path = Path(path)
    return (yaml.safe_load(path.read_text()) or []) if path.exists() else []


def write_progress(path: str | Path, progress: list[dict]) -> None:
    write_text_atomic(path, yaml.safe_dump(progress, sort_keys=False))


def mark_finished(progress: list[dict], num_epochs: int, num_steps: int) -> None:
    """Mark the last entry (the one MONAI's get_score reads): the whole budget of epochs and steps ran."""
    progress[-1].update(finished=True, num_epochs=num_epochs, num_steps=num_steps)


def is_finished(progress: list[dict]) -> bool:
    """The trainer marked the last entry: the whole budget ran."""
    return bool(progress) and bool(progress[-1].get("finished"))


def best_score(progress: list[dict], source: str | Path) -> float:
    """The best validation Dice: SCORE_KEY of the last entry, as MONAI's get_score reads it; NaN for a bundle
    trained without validation (fold -1), whose entry holds null."""
    if not progress or SCORE_KEY not in progress[-1]:
        raise ValueError(f"{source} has no '{SCORE_KEY}' in its last entry: the bundle has not validated yet; "
                         "train it first (scripts/train.py)")
    score = progress[-1][SCORE_KEY]
    return float("nan") if score is None else float(score)


def append_event(path: str | Path, epoch: int, num_epochs: int, loss: float, val_dice: float | None) -> None:
    """One finished epoch (1-based), appended in a single write so a reader never sees half a line."""
    event = {"epoch": int(epoch), "num_epochs": int(num_epochs), "loss": float(loss),
             "val_dice": None if val_dice is None else float(val_dice)}
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(event) + "\n")


def events_end(path: str | Path) -> int:
    """The offset after the last event written so far: a reader starting there sees only newer ones."""
    path = Path(path)
    return path.stat().st_size if path.exists() else 0


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """The events appended since byte offset, and the offset to read from next time.

    A line still being written (no newline yet) is left for the next call.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as stream:
        stream.seek(offset)
        data = stream.read()
    complete = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:complete].splitlines() if line.strip()]
    for event in events:
        missing = [key for key in EVENT_KEYS if key not in event]
        if missing:
            raise ValueError(f"{path}: event {event} lacks {missing}; events carry {', '.join(EVENT_KEYS)} "
                             "(the trainer that wrote it is from another template version)")
    return events, offset + complete
