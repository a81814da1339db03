"""QA pictures: truth and prediction contours on the CT, one PNG per case plus a contact sheet.

Arrays are (x, y, z) with z the axial slice axis, already reoriented by the caller. Each
panel shows one axial slice with x to the right and y upwards, one voxel as a square block
of whole pixels, so a contour pixel can be traced back to the voxel edge it marks.
Figures are drawn on the Agg canvas directly, without pyplot, so no global backend or
window state is touched and nothing needs closing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread, imsave

from autoseg2d.evaluation.metrics import validate_mask, volume_ml
from autoseg2d.atomic_files import atomic_path

BRAIN_WINDOW_HU = (0.0, 80.0)
TRUTH_COLOR = "#00ff00"
PRED_COLOR = "#ff00ff"
LABEL_COLOR = "#ffff00"
MIN_PANEL_PX = 256
TITLE_HEIGHT_PX = 40
DPI = 100
CONTACT_TILE_WIDTH_PX = 512


def choose_slices(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """(slice with the most hemorrhage, slice with the most wrong voxels) along the last axis.

    With an empty truth the prediction's largest slice stands in; with no mask at all, the
    middle slice. Ties go to the lowest slice index.
    """
    per_slice_truth = truth.reshape(-1, truth.shape[-1]).sum(axis=0)
    per_slice_pred = pred.reshape(-1, pred.shape[-1]).sum(axis=0)
    if per_slice_truth.any():
        most = int(np.argmax(per_slice_truth))
    elif per_slice_pred.any():
        most = int(np.argmax(per_slice_pred))
    else:
        most = truth.shape[-1] // 2
    errors = (truth != pred).reshape(-1, truth.shape[-1]).sum(axis=0)
    worst = int(np.argmax(errors)) if errors.any() else most
    return most, worst


def render_case_overlay(
    image_hu: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    path: str | Path,
    case_id: str,
    spacing_mm: Sequence[float],
    window_hu: tuple[float, float] = BRAIN_WINDOW_HU,
) -> Path:
    """Write a two-panel PNG: the slice with most hemorrhage and the slice with the worst error.

    Truth is drawn in green, prediction in magenta, on the CT in a brain window; the title
    gives the case id and both volumes in mL so an outlier is spotted at a glance.
    """
    if not image_hu.shape == truth.shape == pred.shape or image_hu.ndim != 3:
        raise ValueError(
            f"case {case_id!r}: image {image_hu.shape}, truth {truth.shape} and prediction {pred.shape} "
            "must be the same (x, y, z) shape."
        )
    truth_mask = validate_mask(truth, case_id, "truth")
    pred_mask = validate_mask(pred, case_id, "prediction")
    most, worst = choose_slices(truth_mask, pred_mask)
    title = (f"{case_id}   truth {volume_ml(truth_mask, spacing_mm):.2f} mL (green)   "
             f"prediction {volume_ml(pred_mask, spacing_mm):.2f} mL (magenta)")
    return _render_panels(image_hu, truth_mask, pred_mask, [(most, "most hemorrhage"), (worst, "worst error")],
                          title, path, window_hu)


def render_prediction_overlay(
    image_hu: np.ndarray,
    pred: np.ndarray,
    path: str | Path,
    title: str,
    slices: Sequence[int],
    window_hu: tuple[float, float] = BRAIN_WINDOW_HU,
) -> Path:
    """Write one panel per axial slice in `slices` with the prediction outlined (magenta); no truth needed."""
    if image_hu.shape != pred.shape or image_hu.ndim != 3:
        raise ValueError(f"{title}: image {image_hu.shape} and prediction {pred.shape} must be the same (x, y, z) "
                         "shape.")
    if not slices:
        raise ValueError(f"{title}: no slices to draw; pass at least one axial slice index.")
    pred_mask = (np.asarray(pred) > 0).astype(np.uint8)
    panels = [(int(z), f"z={int(z)}") for z in slices]
    return _render_panels(image_hu, np.zeros_like(pred_mask), pred_mask, panels, title, path, window_hu,
                          label_slices=False)


def _render_panels(image_hu: np.ndarray, truth: np.ndarray, pred: np.ndarray, panels: Sequence[tuple[int, str]],
                   title: str, path: str | Path, window_hu: tuple[float, float], label_slices: bool = True) -> Path:
    """Side-by-side axial panels (slice index, label), a title above, written atomically as a PNG."""
    size_x, size_y = image_hu.shape[:2]
    scale = max(1, math.ceil(MIN_PANEL_PX / max(size_x, size_y)))
    panel_w, panel_h = size_x * scale, size_y * scale
    count = len(panels)
    figure = Figure(figsize=(count * panel_w / DPI, (panel_h + TITLE_HEIGHT_PX) / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    bottom_fraction = panel_h / (panel_h + TITLE_HEIGHT_PX)
    for index, (slice_index, label) in enumerate(panels):
        axes = figure.add_axes((index / count, 0.0, 1 / count, bottom_fraction))
        _draw_slice(axes, image_hu[..., slice_index], truth[..., slice_index], pred[..., slice_index], window_hu)
        text = f"z={slice_index}: {label}" if label_slices else label
        axes.text(0.02, 0.98, text, transform=axes.transAxes, color=LABEL_COLOR, fontsize=8, va="top")
    figure.suptitle(title, fontsize=9, y=1 - 0.5 * TITLE_HEIGHT_PX / (panel_h + TITLE_HEIGHT_PX), va="center")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=DPI, facecolor="white")
    return Path(path)


def render_contact_sheet(paths: Sequence[str | Path], path: str | Path, columns: int = 4) -> Path:
    """Tile the per-case PNGs (shrunk to at most 512 px wide) into one picture, in the order given."""
    if not paths:
        raise ValueError("render_contact_sheet got no pictures; pass the per-case PNG paths.")
    tiles = [_thumbnail(imread(str(p))) for p in paths]
    tile_h = max(t.shape[0] for t in tiles)
    tile_w = max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    sheet = np.full((rows * tile_h, min(columns, len(tiles)) * tile_w, 3), 255, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * tile_h, (index % columns) * tile_w
        sheet[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    with atomic_path(path) as temporary:
        imsave(temporary, sheet)
    return Path(path)


def _draw_slice(axes, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, window_hu: tuple[float, float]) -> None:
    size_x, size_y = image.shape
    axes.imshow(image.T, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], origin="lower",
                interpolation="nearest", aspect="auto", extent=(-0.5, size_x - 0.5, -0.5, size_y - 0.5))
    for mask, color in ((truth, TRUTH_COLOR), (pred, PRED_COLOR)):
        if mask.any():
            # pad so lesions touching the array edge get a closed contour
            xs, ys = np.arange(-1, size_x + 1), np.arange(-1, size_y + 1)
            axes.contour(xs, ys, np.pad(mask, 1).T.astype(np.float32), levels=[0.5], colors=[color],
                         linewidths=1.0, antialiased=False)
    axes.set_xlim(-0.5, size_x - 0.5)
    axes.set_ylim(-0.5, size_y - 0.5)
    axes.set_axis_off()


def _thumbnail(image: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(image.shape[1] / CONTACT_TILE_WIDTH_PX))
    rgb = image[::step, ::step, :3]
    return np.round(rgb * 255).astype(np.uint8) if rgb.dtype.kind == "f" else rgb.astype(np.uint8)
