"""Bleed measurements on masks whose answers are known: counts, volumes, slice ranges, ABC/2, contact."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg2d.reporting.measures import bleed_measures, diameters_mm, touches_scan_edge, touches_skull

SPACING_MM = (0.5, 0.5, 2.5)


def ellipsoid(a_mm: float, b_mm: float, c_mm: float) -> np.ndarray:
    x, y, z = np.meshgrid(np.arange(120) * 0.5 - 30, np.arange(100) * 0.5 - 25, np.arange(24) * 2.5 - 30,
                          indexing="ij")
    return ((x / a_mm) ** 2 + (y / b_mm) ** 2 + (z / c_mm) ** 2) <= 1


def test_abc2_of_an_ellipsoid_measures_its_axes_and_follows_kothari():
    bleed = ellipsoid(20, 12, 15)
    true_ml = 4 / 3 * np.pi * 20 * 12 * 15 / 1000
    measured = bleed_measures(bleed, SPACING_MM)
    assert measured["volume_ml"] == pytest.approx(true_ml, rel=0.02)
    assert measured["abc_a_mm"] == pytest.approx(40, abs=0.5)  # the longest diameter, within a pixel
    assert measured["abc_b_mm"] == pytest.approx(24, abs=0.5)
    # slices z = -7.5..7.5 mm have >= 75 % of the largest area (7 x 1), z = +-10, +-12.5 mm 25-75 % (4 x 0.5)
    assert measured["abc_c_mm"] == pytest.approx(9 * 2.5)
    assert measured["abc2_ml"] == pytest.approx(40.5 * 24.5 * 22.5 / 2 / 1000)
    # Kothari's weighting counts an ellipsoid's tapering ends as half slices or not at all: about 3/4 of the volume
    assert 0.65 < measured["abc2_ml"] / true_ml < 0.85


def test_abc2_of_a_box_is_half_its_volume():
    box = np.zeros((40, 40, 10), bool)
    box[5:25, 10:20, 2:6] = True  # 10 x 5 mm on 4 slices of 2.5 mm
    measured = bleed_measures(box, SPACING_MM)
    assert measured["abc_a_mm"] == pytest.approx(np.hypot(10, 5), rel=0.05)  # the diagonal is the longest axis
    assert measured["abc_c_mm"] == 10.0
    assert measured["volume_ml"] == pytest.approx(10 * 5 * 10 / 1000)


def test_bleeds_are_counted_and_the_largest_is_described():
    mask = np.zeros((30, 30, 8), np.uint8)
    mask[2:6, 2:6, 1:3] = 1  # 32 voxels on slices 1-2
    mask[15:25, 15:25, 3:7] = 1  # 400 voxels on slices 3-6
    measured = bleed_measures(mask, SPACING_MM)
    voxel_ml = 0.5 * 0.5 * 2.5 / 1000
    assert measured["num_bleeds"] == 2
    assert measured["volume_ml"] == pytest.approx(432 * voxel_ml)
    assert measured["largest_bleed_ml"] == pytest.approx(400 * voxel_ml)
    assert (measured["largest_bleed_first_slice"], measured["largest_bleed_last_slice"]) == (3, 6)


def test_an_empty_mask_measures_zero():
    measured = bleed_measures(np.zeros((8, 8, 4), np.uint8), SPACING_MM)
    assert measured["num_bleeds"] == 0 and measured["volume_ml"] == 0 and measured["abc2_ml"] == 0
    assert measured["largest_bleed_first_slice"] is None


def test_diameters_of_one_pixel_and_of_a_line():
    assert diameters_mm(np.ones((1, 1), bool), (0.5, 0.7)) == pytest.approx((0.5, 0.7))
    assert diameters_mm(np.ones((10, 1), bool), (0.5, 0.7)) == pytest.approx((5.0, 0.7))


def test_contact_with_scan_edge_and_skull():
    mask = np.zeros((20, 20, 6), bool)
    mask[8:12, 8:12, 2:4] = True
    image = np.full(mask.shape, 30, np.int16)
    assert not touches_scan_edge(mask) and not touches_skull(mask, image)
    image[12, 9, 2] = 1200  # bone next to the bleed, in plane
    assert touches_skull(mask, image)
    mask[8:12, 8:12, 0] = True  # reaches the first slice: the bleed may go on below the scan
    assert touches_scan_edge(mask)
