"""QA pictures for a folder of cases: one overlay per case (axial, RAS order) and a contact sheet."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from autoseg2d.evaluation.overlays import render_case_overlay, render_contact_sheet


def read_ras(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array in RAS order (axial axis last) and its spacing, by axis permutation and flips only."""
    image = nib.load(str(path))
    ornt = orientations.io_orientation(image.affine)
    data = orientations.apply_orientation(np.asanyarray(image.dataobj), ornt)
    zooms = image.header.get_zooms()[:3]
    return data, tuple(float(zooms[int(axis)]) for axis in ornt[:, 0].argsort())


def render_overlays(cases: dict[str, dict[str, Path | None]], output_dir: str | Path) -> list[Path]:
    """cases: name -> {'image', 'label', 'pred'} paths (pred None = missing, drawn empty). Returns the PNGs."""
    output_dir = Path(output_dir)
    pictures = []
    for name, paths in sorted(cases.items()):
        image, spacing = read_ras(paths["image"])
        truth = (read_ras(paths["label"])[0] > 0).astype(np.uint8)
        pred = (read_ras(paths["pred"])[0] > 0).astype(np.uint8) if paths.get("pred") else np.zeros_like(truth)
        pictures.append(render_case_overlay(image, truth, pred, output_dir / f"{name}.png", name, spacing))
    if pictures:
        render_contact_sheet(pictures, output_dir / "contact_sheet.png")
    return pictures
