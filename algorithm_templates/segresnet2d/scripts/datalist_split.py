"""Read a MONAI datalist and split its training cases by fold, with errors that say how to fix the file."""

from __future__ import annotations

import json
import os
from pathlib import Path


class DatalistError(ValueError):
    pass


def read_datalist(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"datalist not found: {path} (config key data_list_file_path)")
    try:
        datalist = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatalistError(f"datalist {path} is not valid JSON: {err}") from err
    if not isinstance(datalist, dict) or not isinstance(datalist.get("training"), list):
        raise DatalistError(f"datalist {path} needs a 'training' list of {{'image', 'label', 'fold'}} entries")
    return datalist


def _resolve(entry: dict, key: str, base_dir: str) -> str:
    value = entry[key]
    return value if os.path.isabs(value) else os.path.join(base_dir, value)


def split_by_fold(datalist: dict, base_dir: str, fold: int, source: str = "datalist") -> tuple[list, list]:
    """(training, validation) lists of {'image', 'label'} absolute paths for one cross-validation fold.

    A negative fold, one no case can have, trains on every case with no validation (MONAI's datafold_read
    convention): a final model, or a student distilled from the cross-validated ensemble.
    """
    training, validation = [], []
    for i, entry in enumerate(datalist["training"]):
        missing = [k for k in ("image", "label", "fold") if k not in entry]
        if missing:
            raise DatalistError(
                f"{source}: training entry {i} ({entry.get('image', '?')}) has no {', '.join(missing)};"
                " add folds with `python run_autoseg.py datalist` or give every entry image, label and fold"
            )
        case = {"image": _resolve(entry, "image", base_dir), "label": _resolve(entry, "label", base_dir)}
        (validation if fold >= 0 and int(entry["fold"]) == fold else training).append(case)
    if fold < 0:
        if not training:
            raise DatalistError(f"{source}: the 'training' list is empty; fold {fold} trains on every training case")
        return training, validation
    folds = sorted({int(e["fold"]) for e in datalist["training"]})
    if not validation:
        raise DatalistError(f"{source}: no training case has fold {fold}; the folds present are {folds}"
                            " (fold -1 trains on every case without validation)")
    if not training:
        raise DatalistError(f"{source}: every training case is in fold {fold}; nothing is left to train on")
    return training, validation


def testing_files(datalist: dict, base_dir: str) -> list[dict]:
    return [{"image": _resolve(e, "image", base_dir)} for e in datalist.get("testing", [])]
