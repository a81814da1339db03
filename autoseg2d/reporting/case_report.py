"""The per-case report a reader gets next to the masks: report.csv, report.json and QA pictures.

One row per case, or per class plus an "any" row when the model has several classes. Both
files are rewritten (write-then-rename) after every case, so a reader can open them while a
long run goes on, and a rerun that keeps finished masks keeps their rows. Slice numbers are
0-based axial slices counted from the feet up (RAS order), the numbers on the QA pictures.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.evaluation.overlays import render_contact_sheet, render_prediction_overlay
from autoseg2d.evaluation.qa import read_ras
from autoseg2d.evaluation.tables import from_json_safe, json_safe
from autoseg2d.reporting.agreement import LOW_AGREEMENT_DICE, low_agreement, member_agreement
from autoseg2d.reporting.geometry import SPACING_TOLERANCE, SpacingRange
from autoseg2d.reporting.measures import BONE_HU, bleed_measures, touches_scan_edge, touches_skull

logger = logging.getLogger(__name__)

REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
QA_DIR = "qa"
CONTACT_SHEET = "contact_sheet.png"
QA_SLICES_AROUND = 2  # slices drawn on each side of the slice with the largest bleed area
ANY_CLASS = "any"
COLUMNS = ("case", "class", "volume_ml", "num_bleeds", "largest_bleed_ml", "largest_bleed_first_slice",
           "largest_bleed_last_slice", "abc2_ml", "abc_a_mm", "abc_b_mm", "abc_c_mm", "member_volume_spread_ml",
           "member_dice_mean", "members_compared", "flags", "rescue_peak_probability", "spacing_mm", "num_slices",
           "seconds", "model", "input", "mask", "qa_picture")
FLAG_EMPTY, FLAG_LOW_AGREEMENT, FLAG_EDGE, FLAG_SKULL = "empty", "low agreement", "touches scan edge", "touches skull"
FLAG_SPACING = "spacing unlike training"
FLAG_RESCUED, FLAG_WOULD_RESCUE = "rescued", "would be rescued"
TEXT_COLUMNS = ("case", "class", "model", "input", "mask", "qa_picture")  # never read back as floats
RECORD_KEY = "written_by"  # in report.json rows: the ensemble, input and rescue setting that wrote the mask
# The model column: "ensemble", or "student" (one network: its agreement columns stay empty, members_compared 1).
DEFAULT_MODEL = "ensemble"


@dataclass(frozen=True)
class Rescue:
    """The never-empty rescue of one case: the ensemble's mask was empty, and the rescue kept (applied) or, with
    it switched off, would have kept a component whose highest probability is `peak` (a vote fraction in vote
    mode)."""

    peak: float
    applied: bool

    @property
    def flag(self) -> str:
        return FLAG_RESCUED if self.applied else FLAG_WOULD_RESCUE

    def describe(self, threshold: float) -> str:
        """One line for the console and the DICOM SEG: what the ensemble found and what the mask is."""
        found = f"the ensemble found no voxel above {threshold:g}"
        if self.applied:
            return (f"{FLAG_RESCUED}: {found}; the mask is the most probable region (peak probability "
                    f"{self.peak:.3f}), kept so that it is never empty")
        return (f"{FLAG_WOULD_RESCUE}: {found}; left empty (never-empty off), the rescue would have kept a region "
                f"of peak probability {self.peak:.3f}")


def rescue_of(rows: Sequence[dict]) -> Rescue | None:
    """A case's rescue as its report rows record it (None: not rescued, nor left empty by --allow_empty)."""
    if not rows or rows[0].get("rescue_peak_probability") is None:
        return None
    return Rescue(float(rows[0]["rescue_peak_probability"]), FLAG_RESCUED in rows[0]["flags"])


def lesion_class_names(config: dict) -> list[str]:
    """The lesion classes' names from a bundle config: its class_names, else "hemorrhage" or class_1, class_2, ..."""
    count = int(config.get("output_classes", 2)) - 1
    names = list(config.get("class_names") or [])
    if len(names) == count:
        return names
    return ["hemorrhage"] if count == 1 else [f"class_{index}" for index in range(1, count + 1)]


def class_rows(class_names: Sequence[str]) -> list[tuple[str, int | None]]:
    """(name, label) per report row: the one lesion class, or each class and then any of them (label None)."""
    if len(class_names) == 1:
        return [(class_names[0], 1)]
    return [(name, index) for index, name in enumerate(class_names, 1)] + [(ANY_CLASS, None)]


def case_rows(case: str, mask_ras: np.ndarray, image_ras: np.ndarray | None, spacing_mm: Sequence[float],
              class_names: Sequence[str], member_masks: Sequence[np.ndarray] = (),
              spacing_unlike: bool = False) -> list[dict]:
    """The report rows of one case from its mask and its members' masks, all (x, y, z) in RAS order; every row
    is flagged where spacing_unlike (the scan's spacing is unlike the training scans': a property of the case)."""
    rows = []
    for name, label in class_rows(class_names):
        selected = mask_ras > 0 if label is None else mask_ras == label
        measured = bleed_measures(selected, spacing_mm)
        agreement = member_agreement(mask_ras, member_masks, spacing_mm, label)
        flags = [FLAG_EMPTY] if measured["num_bleeds"] == 0 else []
        flags += [FLAG_LOW_AGREEMENT] if low_agreement(agreement) else []
        flags += [FLAG_EDGE] if touches_scan_edge(selected) else []
        flags += [FLAG_SKULL] if image_ras is not None and touches_skull(selected, image_ras) else []
        flags += [FLAG_SPACING] if spacing_unlike else []
        rows.append({"case": case, "class": name, **measured, **agreement, "flags": flags,
                     "spacing_mm": [float(s) for s in spacing_mm], "num_slices": int(mask_ras.shape[-1])})
    return rows


class CaseReport:
    """report.csv, report.json and qa/ in `output_dir`, updated case by case."""

    def __init__(self, output_dir: str | Path, class_names: Sequence[str],
                 training_spacing: SpacingRange | None = None):
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.training_spacing = training_spacing
        self.rows: dict[str, list[dict]] = {}
        previous = self.output_dir / REPORT_JSON
        if previous.exists():
            for row in json.loads(previous.read_text())["rows"]:
                self.rows.setdefault(row["case"], []).append(from_json_safe(row, TEXT_COLUMNS))

    def add_case(self, case: str, image: Path, mask_file: Path, mask: np.ndarray,
                 member_masks: Sequence[np.ndarray] = (), seconds: float = math.nan,
                 source: str | None = None, rescue: Rescue | None = None, written_by: dict | None = None) -> list[dict]:
        """Measure one predicted case (mask in the image file's array order), draw its picture, rewrite the report.

        `rescue` flags every row of the case (a property of the case, as its spacing); `written_by` is the record
        a later run compares before keeping the mask (EnsemblePredictor.record)."""
        affine = nib.load(str(image)).affine
        image_ras, spacing = read_ras(image)
        ornt = orientations.io_orientation(affine)
        mask_ras = orientations.apply_orientation(np.asarray(mask), ornt)
        members_ras = [orientations.apply_orientation(np.asarray(m), ornt) for m in member_masks]
        rows = case_rows(case, mask_ras, image_ras, spacing, self.class_names, members_ras,
                         spacing_unlike=self.spacing_unlike(spacing))
        for row in rows:
            row["flags"] += [rescue.flag] if rescue else []
            row["rescue_peak_probability"] = rescue.peak if rescue else None
            row.update({RECORD_KEY: written_by} if written_by else {})
            row["model"] = written_by.get("model", DEFAULT_MODEL) if written_by else None  # None: not known
        picture = self.output_dir / QA_DIR / f"{case}.png"
        self._draw(case, image_ras, mask_ras, rows, picture)
        for row in rows:
            row.update(seconds=float(seconds), input=str(source or image), mask=str(mask_file), qa_picture=str(picture))
        self.rows[case] = rows
        self.write()
        return rows

    def keep_case(self, case: str, image: Path, mask_file: Path, source: str | None = None) -> list[dict]:
        """A case predicted by an earlier run: its row from that run's report, else measured from the saved mask
        (without agreement, which needs the members' outputs)."""
        if case in self.rows:  # flagged again by this run's training range (written with the next write())
            for row in self.rows[case]:
                row["flags"] = [f for f in row["flags"] if f != FLAG_SPACING] + (
                    [FLAG_SPACING] if self.spacing_unlike(row["spacing_mm"]) else [])
            return self.rows[case]
        try:
            mask = np.asanyarray(nib.load(str(mask_file)).dataobj)
        except Exception as error:  # nibabel raises many types for a file that is not NIfTI
            logger.warning(f"report: cannot read the earlier mask {mask_file} ({type(error).__name__}: {error});"
                           " the report has no row for it. Delete the file to predict the case again")
            return []
        return self.add_case(case, image, mask_file, mask, source=source)

    def written_by(self, case: str) -> dict | None:
        """The record of who wrote a case's mask, from the report (None: no row, or a row without one)."""
        rows = self.rows.get(case) or [{}]
        return rows[0].get(RECORD_KEY)

    def forget(self, case: str) -> None:
        """Drop a case's rows (and record) before its mask is written again; the report file is rewritten at once
        where they were in it, so a stopped run leaves no record that vouches for a mask it did not write."""
        if self.rows.pop(case, None) is not None:
            self.write()

    def spacing_unlike(self, spacing_mm: Sequence[float]) -> bool:
        """Whether a case of this spacing (RAS, mm) is flagged: unlike the training scans', where known."""
        return bool(self.training_spacing and self.training_spacing.unlike_axes(spacing_mm))

    def spacing_warning(self, rows: Sequence[dict]) -> str | None:
        """What to tell the reader of a case whose rows are flagged for their spacing (None: not flagged)."""
        return self.training_spacing.describe(rows[0]["spacing_mm"]) if FLAG_SPACING in rows[0]["flags"] else None

    def write(self) -> None:
        rows = [row for case in sorted(self.rows) for row in self.rows[case]]
        settings = {"low_agreement_dice": LOW_AGREEMENT_DICE, "bone_hu": BONE_HU,
                    "slices": "0-based axial slice indices counted from the feet up (RAS order)"}
        if self.training_spacing is not None:
            settings["training_spacing_mm"] = {"min": list(self.training_spacing.low),
                                               "max": list(self.training_spacing.high), "tolerance": SPACING_TOLERANCE}
        write_text_atomic(self.output_dir / REPORT_JSON,
                          json.dumps(json_safe({"settings": settings, "rows": rows}), indent=1, allow_nan=False) + "\n")
        write_text_atomic(self.output_dir / REPORT_CSV, report_csv(rows))

    def write_contact_sheet(self) -> Path | None:
        pictures = [Path(row["qa_picture"]) for case in sorted(self.rows) for row in self.rows[case][:1]]
        pictures = [p for p in pictures if p.exists()]
        return render_contact_sheet(pictures, self.output_dir / QA_DIR / CONTACT_SHEET) if pictures else None

    def _draw(self, case: str, image_ras: np.ndarray, mask_ras: np.ndarray, rows: list[dict], picture: Path) -> None:
        per_slice = np.count_nonzero(mask_ras, axis=(0, 1))
        centre = int(np.argmax(per_slice)) if per_slice.any() else mask_ras.shape[-1] // 2
        slices = range(max(0, centre - QA_SLICES_AROUND), min(mask_ras.shape[-1], centre + QA_SLICES_AROUND + 1))
        total = rows[-1]
        flags = f"  [{', '.join(total['flags'])}]" if total["flags"] else ""
        title = f"{case}   {total['volume_ml']:.2f} mL   ABC/2 {total['abc2_ml']:.2f} mL{flags}"
        render_prediction_overlay(image_ras, mask_ras, picture, title, list(slices))


def report_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(key, value) for key, value in row.items()})
    return buffer.getvalue()


def _cell(key: str, value):
    if key == "flags":
        return "; ".join(value)
    if key == "spacing_mm":
        return " x ".join(f"{s:g}" for s in value)
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, 4)
    return "" if value is None else value
