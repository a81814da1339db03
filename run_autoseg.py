"""Command line for the segresnet2d Auto3DSeg pipeline; each subcommand calls one library function.

    python run_autoseg.py datalist --root /data/instance22 --output datalist.json
    python run_autoseg.py evaluate --pred preds/ --gt labels/
"""

from __future__ import annotations

import fire

from autoseg2d.datalist import build_datalist
from autoseg2d.evaluation.evaluate import evaluate_folders

COMMANDS = {
    "datalist": build_datalist,
    "evaluate": evaluate_folders,
}

if __name__ == "__main__":
    fire.Fire(COMMANDS)
