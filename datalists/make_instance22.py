"""Write datalists/instance22.json from the reference fold file (case id -> fold).

    python -m datalists.make_instance22 /path/to/instance22_reference_folds.json datalists/instance22.json
"""

from __future__ import annotations

import json
import sys

from autoseg2d.atomic_files import write_json_atomic
from autoseg2d.datalist import validate_folds

DESCRIPTION = (
    "INSTANCE 2022: 100 training cases with the reference 5-fold split of the published 2D SegResNet "
    "cross-validation, and the 30 validation images as testing. Paths are relative to --dataroot."
)


def instance22_datalist(reference: dict) -> dict:
    training = [
        {"image": f"train/data/{case}.nii.gz", "label": f"train/label/{case}.nii.gz", "fold": int(fold)}
        for case, fold in sorted(reference["folds"].items())
    ]
    testing = [{"image": f"evaluation/{case}.nii.gz"} for case in sorted(reference["testing"])]
    datalist = {"description": DESCRIPTION, "training": training, "testing": testing}
    validate_folds(datalist, 5)
    return datalist


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        write_json_atomic(instance22_datalist(json.load(f)), sys.argv[2])
