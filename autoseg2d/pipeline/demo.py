"""The built-in demo: a generated head-CT set, the whole pipeline on the demo profile, held-back scores."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from autoseg2d.datalist import read_datalist
from autoseg2d.evaluation.evaluate import evaluate_folders
from autoseg2d.pipeline.runner import run_pipeline
from autoseg2d.synthetic.head_ct import write_dataset

logger = logging.getLogger(__name__)

DEMO_CASES = {"num_train": 10, "num_test": 4, "num_folds": 2, "size": 64, "num_slices": 12}
# Stand-in names for the generated lesion classes (they differ only in their label id), in BHSD's order.
DEMO_CLASS_NAMES = ("IPH", "IVH", "SAH", "SDH", "EDH")


def run_demo(work_dir: str = "demo_work", profile: str = "demo", until: str = "predict", num_classes: int = 1) -> dict:
    """Generate synthetic CT in work_dir/demo_data, run every stage, score the ensemble on the held-back cases.

    --until STAGE stops after that stage (then nothing is scored). --num_classes N (up to 5) labels the
    lesions 1..N like hemorrhage subtypes, named IPH, IVH, ... in the datalist."""
    most = len(DEMO_CLASS_NAMES)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= most:
        raise ValueError(f"--num_classes {num_classes!r}: the demo generates 1 to {most} lesion classes")
    started = time.time()
    data = Path(work_dir).resolve() / ("demo_data" if num_classes == 1 else f"demo_data_{num_classes}_classes")
    datalist = data / "datalist.json"
    if not datalist.exists():
        names = list(DEMO_CLASS_NAMES[:num_classes]) if num_classes > 1 else None
        write_dataset(data, **DEMO_CASES, num_classes=num_classes, class_names=names)
        logger.info(f"demo: generated {DEMO_CASES['num_train']} training and {DEMO_CASES['num_test']} held-back "
                    f"cases ({DEMO_CASES['size']}x{DEMO_CASES['size']}x{DEMO_CASES['num_slices']}) in {data}"
                    + (f" with {num_classes} lesion classes ({', '.join(names)})" if names else ""))
    summary = run_pipeline(str(datalist), str(data), work_dir=work_dir, profile=profile, until=until)
    if until != "predict":
        return summary
    held_back = Path(summary["work_dir"]) / "reports" / "held_back"
    names = read_datalist(datalist).get("class_names")
    scores = evaluate_folders(summary["predictions"], str(data / "labelsTs"), output=str(held_back),
                              images=str(data / "imagesTs"), class_names=names)
    print("\nHeld-back cases scored against their generated labels:", flush=True)
    print((held_back / "summary.md").read_text(), flush=True)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min\n"
          f"  cross-validation table: {summary['cross_validation']}\n"
          f"  ensemble (members, post-processing): {summary['ensemble']}\n"
          f"  held-back predictions: {summary['predictions']}\n"
          f"  held-back scores and QA overlays: {held_back}", flush=True)
    return {**summary, "held_back": scores}
