"""Evaluation results as text people read: per-case CSV, summary JSON and Markdown tables.

The callers write them with autoseg2d.atomic_files, so a crash never leaves half a report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence

import numpy as np

from autoseg2d.evaluation.metrics import CLASS_MEAN, summarize_classes, summarize_metrics

CASE_COLUMNS = ("case", "status", "dice", "rvd", "nsd", "hd_mm", "pred_volume_ml", "true_volume_ml", "note")
SUMMARY_COLUMNS = (
    ("Dice", "dice_mean"), ("RVD", "rvd_mean"), ("NSD", "nsd_mean"), ("HD mm", "hd_mm_mean"), ("HD inf", "num_hd_inf"),
)
CLASS_METRICS = ("dice", "rvd", "nsd", "hd_mm", "pred_volume_ml", "true_volume_ml")
CLASS_COLUMNS = (*SUMMARY_COLUMNS, ("true mL", "true_volume_ml_mean"), ("pred mL", "pred_volume_ml_mean"))


def json_safe(value):
    """Strict JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan" (as the organizers' vectors do)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


NON_FINITE = ("nan", "inf", "-inf")


def from_json_safe(value, text_keys: Sequence[str] = ()):
    """json_safe's inverse, read back from a file: the strings "inf", "-inf", "nan" become floats again, at any
    depth, except under `text_keys` (names, paths: a case may be called "nan")."""
    if isinstance(value, str) and value in NON_FINITE:
        return float(value)
    if isinstance(value, dict):
        return {key: item if key in text_keys else from_json_safe(item, text_keys) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json_safe(item, text_keys) for item in value]
    return value


def summary_json(summary: dict) -> str:
    return json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n"


def per_case_csv(rows: Sequence[dict]) -> str:
    """One row per case with full-precision numbers (inf and nan as Python prints them); with several
    classes, each class's metrics follow as <metric>_<class> columns (empty where the case lacks the class)."""
    names = _class_names(rows)
    class_columns = [f"{metric}_{name}" for name in names for metric in CLASS_METRICS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CASE_COLUMNS, *class_columns], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {key: _csv_cell(value) for key, value in row.items()}
        for name, metrics in (row.get("classes") or {}).items():
            flat.update({f"{metric}_{name}": _csv_cell(metrics[metric]) for metric in CLASS_METRICS} if metrics else {})
        writer.writerow(flat)
    return buffer.getvalue()


def _class_names(rows: Sequence[dict]) -> list[str]:
    return list(next((row["classes"] for row in rows if row.get("classes")), {}))


def class_table(per_case: Sequence[dict], label: Sequence = ()) -> list[list]:
    """Rows of [*label, class, cases, Dice, RVD, NSD, HD mm, HD inf, true mL, pred mL], the last the mean over
    classes; [] for binary results."""
    rows = []
    for name, summary in summarize_classes(per_case).items():
        if summary is None:
            rows.append([*label, name, 0, *("-" for _ in CLASS_COLUMNS)])
        else:
            rows.append([*label, name, summary.get("num_cases", "-"), *(summary[key] for _, key in CLASS_COLUMNS)])
    return rows


CLASS_HEADER = ["class", "cases", *(name for name, _ in CLASS_COLUMNS)]
CLASS_NOTE = (f"Each class is scored on the cases whose truth or prediction holds it; '{CLASS_MEAN}' averages the "
              "classes' means.")


def summary_markdown(summary: dict, rows: Sequence[dict]) -> str:
    """Summary line plus a per-case table, for a pull request or a lab notebook."""
    lines = [
        "# Evaluation",
        "",
        _markdown_table(["cases", *(name for name, _ in SUMMARY_COLUMNS), "RVD NaN", "missing"],
                        [[summary["num_cases"], *(summary[key] for _, key in SUMMARY_COLUMNS),
                          summary["num_rvd_nan"], summary.get("num_missing_predictions", 0)]]),
        "",
        f"NSD tolerance {summary.get('nsd_tolerance_mm', '?')} mm. Mean HD is inf when any case is inf "
        f"(mean over finite cases: {_cell(summary['hd_mm_mean_finite'])} mm).",
        "",
        *_class_section(rows),
        "## Cases",
        "",
        _markdown_table(list(CASE_COLUMNS), [[row.get(key, "") for key in CASE_COLUMNS] for row in rows]),
        "",
    ]
    return "\n".join(lines)


def _class_section(rows: Sequence[dict]) -> list[str]:
    table = class_table(rows)
    if not table:
        return []
    return ["## Classes", "", _markdown_table(CLASS_HEADER, table), "", CLASS_NOTE, ""]


def _fold_order(record: dict) -> tuple:
    """Folds 0, 1, ..., 10 in numeric order, then any named ones."""
    fold = record["fold"]
    return (0, fold, "") if isinstance(fold, int) else (1, 0, str(fold))


def cross_validation_table(records: list[dict], selection_folds: Sequence = ()) -> str:
    """Markdown table of cross-validation results, one row per (input variant, fold).

    Each record has keys ``variant``, ``fold`` and ``cases`` (the per-case metric dicts from
    :func:`autoseg2d.evaluation.metrics.case_metrics`). Rows are sorted by variant then fold;
    after each variant's folds an "all" row pools its cases, so variants can be compared on
    the same footing as the challenge (mean over cases). Folds in `selection_folds` chose the
    configuration (the sweep scored trials on them), so their scores are optimistic: they are
    marked, and an "other folds" row pools the cases of the folds that did not.
    """
    by_variant: dict[str, list[dict]] = {}
    for index, record in enumerate(records):
        missing = {"variant", "fold", "cases"} - record.keys()
        if missing:
            raise ValueError(
                f"cross-validation record {index} lacks keys {sorted(missing)}; "
                "each record needs 'variant', 'fold' and 'cases' (a list of per-case metric dicts)."
            )
        by_variant.setdefault(str(record["variant"]), []).append(record)
    chose = {str(fold) for fold in selection_folds}
    rows = []
    for variant in sorted(by_variant):
        folds = sorted(by_variant[variant], key=_fold_order)
        for record in folds:
            marker = " (chose config)" if str(record["fold"]) in chose else ""
            rows.append(_cv_row(variant, f"{record['fold']}{marker}", record["cases"]))
        if len(folds) > 1:
            rows.append(_cv_row(variant, "all", [case for record in folds for case in record["cases"]]))
        held_out = [record for record in folds if str(record["fold"]) not in chose]
        if chose and held_out and len(held_out) < len(folds):
            rows.append(_cv_row(variant, "other folds", [case for record in held_out for case in record["cases"]]))
    header = ["variant", "fold", "cases", *(name for name, _ in SUMMARY_COLUMNS)]
    note = ""
    if chose:
        note = (f"\nFolds marked \"chose config\" ({', '.join(sorted(chose))}) scored the sweep's trials, so the "
                "configuration was picked on them and their scores are optimistic; \"other folds\" is the mean over "
                "the cases of the folds that took no part in that choice.\n")
    table = _markdown_table(header, rows) + "\n" + note
    by_class = [row for variant in sorted(by_variant) for row in
                class_table([case for record in by_variant[variant] for case in record["cases"]], [variant])]
    if by_class:
        table += ("\nPer class, all folds pooled:\n\n" + _markdown_table(["variant", *CLASS_HEADER], by_class)
                  + f"\n\n{CLASS_NOTE}\n")
    return table


def _cv_row(variant: str, fold, cases: Sequence[dict]) -> list:
    summary = summarize_metrics(cases)
    return [variant, fold, summary["num_cases"], *(summary[key] for _, key in SUMMARY_COLUMNS)]


def _csv_cell(value):
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return value


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")
