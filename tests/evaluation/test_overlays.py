"""Overlay pictures: files exist, contours sit on mask edges, slices are chosen as promised."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import imread

from autoseg2d.evaluation.overlays import (
    CONTACT_TILE_WIDTH_PX,
    MIN_PANEL_PX,
    TITLE_HEIGHT_PX,
    choose_slices,
    render_case_overlay,
    render_contact_sheet,
)

SIZE_X, SIZE_Y, SIZE_Z = 40, 24, 5  # not square, so a transposed drawing would be caught
SCALE = math.ceil(MIN_PANEL_PX / SIZE_X)


def _l_shaped_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(35, 5, (SIZE_X, SIZE_Y, SIZE_Z)).astype(np.int16)
    truth = np.zeros((SIZE_X, SIZE_Y, SIZE_Z), np.uint8)
    truth[8:30, 4:9, 2] = 1
    truth[8:13, 4:20, 2] = 1
    truth[10:14, 10:14, 1] = 1
    pred = np.zeros_like(truth)
    pred[18:38, 12:22, 3] = 1  # a 200-voxel false positive: the worst-error slice is z=3
    return image, truth, pred


def _colour_pixels(panel: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
    """(x, y) voxel coordinates of the panel pixels drawn exactly in `rgb`."""
    rows, cols = np.nonzero(np.all(np.abs(panel[..., :3] - rgb) < 0.02, axis=-1))
    x = (cols + 0.5) / SCALE - 0.5
    y = (panel.shape[0] - rows - 0.5) / SCALE - 0.5  # image rows run downwards, y upwards
    return np.stack([x, y], axis=1)


def _distance_to_mask_edges(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Distance from each point to the nearest voxel edge that separates mask from background."""
    padded = np.pad(mask.astype(bool), 1)
    segments = []  # (x0, y0, x1, y1) in voxel-centre coordinates of the unpadded mask
    for i, j in np.argwhere(padded[1:, :] != padded[:-1, :]):
        segments.append((i - 0.5, j - 1.5, i - 0.5, j - 0.5))
    for i, j in np.argwhere(padded[:, 1:] != padded[:, :-1]):
        segments.append((i - 1.5, j - 0.5, i - 0.5, j - 0.5))
    seg = np.array(segments)
    start, end = seg[:, :2], seg[:, 2:]
    direction = end - start
    t = np.clip(np.einsum("psk,sk->ps", points[:, None] - start, direction) / (direction**2).sum(1), 0, 1)
    nearest = start + t[..., None] * direction
    return np.linalg.norm(points[:, None] - nearest, axis=-1).min(axis=1)


def _assert_on_edges(points: np.ndarray, mask: np.ndarray) -> None:
    """Lines are ~1.4 px wide; only corner joins reach 2-3 px off. A one-voxel shift would be SCALE px off."""
    distance_px = _distance_to_mask_edges(points, mask) * SCALE
    assert distance_px.max() <= 3.0
    assert np.mean(distance_px <= 1.0) > 0.9


def test_choose_slices():
    _, truth, pred = _l_shaped_case()
    assert choose_slices(truth.astype(bool), pred.astype(bool)) == (2, 3)
    empty = np.zeros((4, 4, 6), bool)
    assert choose_slices(empty, empty) == (3, 3)


def test_contours_lie_on_the_mask_edges(tmp_path):
    image, truth, pred = _l_shaped_case()
    path = render_case_overlay(image, truth, pred, tmp_path / "ct_1.png", "ct_1", (0.45, 0.45, 5.0))
    picture = imread(str(path))
    panel_w, panel_h = SIZE_X * SCALE, SIZE_Y * SCALE
    assert picture.shape[:2] == (panel_h + TITLE_HEIGHT_PX, 2 * panel_w)
    most_hemorrhage = picture[TITLE_HEIGHT_PX:, :panel_w]
    worst_error = picture[TITLE_HEIGHT_PX:, panel_w:]

    truth_points = _colour_pixels(most_hemorrhage, (0.0, 1.0, 0.0))
    perimeter_voxels = 2 * (22 + 16)  # the L has the perimeter of its bounding box
    assert len(truth_points) > 0.8 * perimeter_voxels * SCALE
    _assert_on_edges(truth_points, truth[..., 2])

    pred_points = _colour_pixels(worst_error, (1.0, 0.0, 1.0))
    assert len(pred_points) > 0.8 * 2 * (20 + 10) * SCALE
    _assert_on_edges(pred_points, pred[..., 3])
    assert len(_colour_pixels(most_hemorrhage, (1.0, 0.0, 1.0))) == 0  # no prediction on z=2


def test_contact_sheet_tiles_the_pictures(tmp_path):
    image, truth, pred = _l_shaped_case()
    paths = [render_case_overlay(image, truth, pred, tmp_path / f"c{i}.png", f"c{i}", (1, 1, 1)) for i in range(3)]
    sheet = imread(str(render_contact_sheet(paths, tmp_path / "sheet.png", columns=2)))
    tile = imread(str(paths[0]))
    step = math.ceil(tile.shape[1] / CONTACT_TILE_WIDTH_PX)
    tile_h, tile_w = math.ceil(tile.shape[0] / step), math.ceil(tile.shape[1] / step)
    assert sheet.shape[:2] == (2 * tile_h, 2 * tile_w)  # 3 pictures in 2 columns: 2 rows
    assert np.all(sheet[tile_h:, tile_w:, :3] == 1.0)  # the empty fourth cell stays white
    assert np.allclose(sheet[:tile_h, :tile_w, :3], tile[::step, ::step, :3], atol=1 / 255)


def test_mismatched_shapes_name_the_case(tmp_path):
    image, truth, pred = _l_shaped_case()
    with pytest.raises(ValueError, match="case 'ct_9'"):
        render_case_overlay(image[:-1], truth, pred, tmp_path / "x.png", "ct_9", (1, 1, 1))


def test_a_failed_picture_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from autoseg2d.atomic_files import atomic_path

    target = tmp_path / "case.png"
    target.write_bytes(b"old picture")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            assert temporary.suffix == ".png" and temporary.parent == tmp_path
            temporary.write_bytes(b"half a pic")
            raise RuntimeError("renderer crashed")
    assert target.read_bytes() == b"old picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.png"]
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"new picture")
    assert target.read_bytes() == b"new picture" and len(list(tmp_path.iterdir())) == 1

    volume = tmp_path / "case_001.nii.gz"
    with atomic_path(volume) as temporary:
        # nibabel picks NIfTI + gzip from the extension, so the temporary name keeps it
        assert temporary.name.endswith(".nii.gz") and temporary.name != volume.name
        temporary.write_bytes(b"volume")
    assert volume.read_bytes() == b"volume"
