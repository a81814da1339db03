"""Score a folder of predicted masks against a folder of labels, the way the INSTANCE 2022 organizers do.

Files are matched by case name (file name without .nii / .nii.gz). Every label is scored:
a missing prediction is a failed case with Dice 0, never skipped, because skipping failures
flatters the mean. Spacing is read from the label header; only array shapes are compared.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.datalist import case_name, is_nifti
from autoseg2d.evaluation.metrics import (
    NSD_TOLERANCE_MM,
    case_metrics,
    class_case_metrics,
    default_class_names,
    summarize_classes,
    summarize_metrics,
)
from autoseg2d.evaluation.tables import (
    cross_validation_table,
    per_case_csv,
    summary_json,
    summary_markdown,
)
from autoseg2d.evaluation.qa import render_overlays

__all__ = ["evaluate_folders", "evaluate_cases", "find_nifti_cases", "cross_validation_table"]

STATUS_SCORED = "scored"
STATUS_MISSING = "missing_prediction"
CASES_CSV = "metrics_per_case.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def evaluate_folders(
    pred: str, gt: str, output: str | None = None, nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
    images: str | None = None, class_names: str | list[str] | None = None,
) -> dict:
    """Score predicted masks against labels with Dice, RVD, NSD, HD (mm) and volumes (mL).

    Writes metrics_per_case.csv, summary.json and summary.md to OUTPUT and returns the summary.
    Masks must have the label's array shape and hold 0/1, or class ids 0..N when the labels have N > 1
    classes: then the foreground (any class) is scored as above, and each class on its own with the mean
    over classes.

    Args:
        pred: folder of predicted masks, one NIfTI (.nii or .nii.gz) per case, named like the labels.
        gt: folder of label NIfTI files; every label is a case, and its header gives the spacing.
        output: folder for the reports; defaults to PRED/evaluation.
        nsd_tolerance_mm: normalized surface Dice tolerance in mm (INSTANCE 2022 uses 0.42).
        images: optional folder of the CT images (named like the labels); when given, QA overlay
            PNGs (most-hemorrhage and worst-error slices) and a contact sheet go to OUTPUT/overlays.
        class_names: names of label ids 1..N (a list, or comma-separated); default: class_1.. for the ids
            the labels hold.
    """
    pred, gt = str(pred), str(gt)  # fire turns a folder named "2024" into an int
    names = class_names.split(",") if isinstance(class_names, str) else list(class_names or [])
    rows = evaluate_cases(pred, gt, nsd_tolerance_mm, names or None)
    true_cases, pred_cases = find_nifti_cases(gt), find_nifti_cases(pred)
    missing = [row["case"] for row in rows if row["status"] == STATUS_MISSING]
    output_dir = Path(str(output)) if output is not None else Path(pred) / "evaluation"
    summary = {
        **summarize_metrics(rows),
        **({"classes": summarize_classes(rows)} if any(row.get("classes") for row in rows) else {}),
        "num_missing_predictions": len(missing),
        "missing_predictions": missing,
        "unmatched_predictions": sorted(set(pred_cases) - set(true_cases)),
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "pred": str(pred),
        "gt": str(gt),
        "output": str(output_dir),
    }
    write_text_atomic(output_dir / CASES_CSV, per_case_csv(rows))
    write_text_atomic(output_dir / SUMMARY_MD, summary_markdown(summary, rows))
    if images is not None:
        image_cases = find_nifti_cases(str(images))
        cases = {case: {"image": image_cases[case], "label": true_cases[case], "pred": pred_cases.get(case)}
                 for case in true_cases if case in image_cases}
        summary["overlays"] = [str(p) for p in render_overlays(cases, output_dir / "overlays")]
    write_text_atomic(output_dir / SUMMARY_JSON, summary_json(summary))
    return summary


def evaluate_cases(pred: str | Path, gt: str | Path, nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
                   class_names: list[str] | None = None) -> list[dict]:
    """Per-case metric dicts (with ``case`` and ``status``) for every label in `gt`, sorted by case name.

    With class_names, or labels holding ids above 1, each case also gets per-class metrics ("classes").
    """
    true_cases = find_nifti_cases(gt)
    if not true_cases:
        raise ValueError(f"no label files (.nii or .nii.gz) found in gt folder {str(gt)!r}.")
    pred_cases = find_nifti_cases(pred)
    if class_names is None:
        largest = max(int(np.asanyarray(nib.load(path).dataobj).max()) for path in true_cases.values())
        class_names = default_class_names(largest) if largest > 1 else None
    return [
        _score_case(case, true_cases[case], pred_cases.get(case), nsd_tolerance_mm, class_names)
        for case in sorted(true_cases)
    ]


def find_nifti_cases(folder: str | Path) -> dict[str, Path]:
    """Map case name -> NIfTI path for the files directly in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} does not exist or is not a directory.")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_nifti(path) or not path.is_file():
            continue
        case = case_name(path)
        if case in cases:
            raise ValueError(
                f"case {case!r} has two files in {str(folder)!r}: {cases[case].name} and {path.name}; keep one."
            )
        cases[case] = path
    return cases


def _score_case(case: str, truth_path: Path, pred_path: Path | None, nsd_tolerance_mm: float,
                class_names: list[str] | None = None) -> dict:
    truth_image = nib.load(truth_path)
    truth = np.asanyarray(truth_image.dataobj)
    spacing_mm = tuple(float(z) for z in truth_image.header.get_zooms()[: truth.ndim])

    def score(prediction: np.ndarray) -> dict:
        if class_names:
            return class_case_metrics(prediction, truth, spacing_mm, class_names, case, nsd_tolerance_mm)
        return case_metrics(prediction, truth, spacing_mm, case, nsd_tolerance_mm)

    if pred_path is None:
        metrics = score(np.zeros(truth.shape, np.uint8))
        metrics["dice"] = 0.0
        for class_metrics in (metrics.get("classes") or {}).values():
            if class_metrics is not None:
                class_metrics["dice"] = 0.0
        note = "no prediction file for this case in the pred folder; scored as an empty mask with Dice 0"
        return {"case": case, "status": STATUS_MISSING, **metrics, "note": _join(note, metrics["note"])}
    metrics = score(np.asanyarray(nib.load(pred_path).dataobj))
    return {"case": case, "status": STATUS_SCORED, **metrics}


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)
