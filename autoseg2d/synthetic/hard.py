"""Harder synthetic non-contrast head CT: the cases where hemorrhage models fail, with a known truth.

`head_ct.py` draws bright round blobs on a clean head; a model learns them in a minute. Real
head CT is hard for other reasons, and each is modelled here so that a benchmark exercises it:

- size: most bleeds are small (volumes drawn from a log-normal law, median about 1 mL, clipped to
  0.1-60 mL), and a small bleed on 5 mm slices is only partly in any slice;
- shape: four kinds, each where it occurs in the head: intraparenchymal (irregular blobs in brain
  tissue), intraventricular (blood settling in the posterior, dependent part of a ventricle),
  subarachnoid (thin, in the sulci and the CSF over the brain surface) and subdural (a crescent
  along the inner table of the skull);
- hyperdense mimics labelled 0: calcified choroid plexus and pineal (100-400 HU), the falx (a
  thin bright midline line), bone edges at the skull base and beam-hardening streaks next to it;
- acquisition: partial volume along z (anatomy is built on 1.25 mm sub-slices and averaged to
  5 mm), in-plane partial volume (edges one pixel wide), scanner noise of 3-12 HU that varies
  between cases and is slightly correlated at fine pixels, -2048 HU outside the reconstruction
  circle in some cases, 18-40 slices.

Anatomy and lesions are defined in millimetres from the head's centre, and the field of view is
that of a 512 px scan at 0.4-0.5 mm, so `size_px=128` gives the same head at ~1.8 mm pixels. The
random draws of a case do not depend on `size_px` (only the scanner noise does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from autoseg2d.synthetic.head_ct import (HOUNSFIELD_AIR, SyntheticCase, case_files, head_ct_affine,
                                         write_cases_and_datalist)
from autoseg2d.synthetic.anatomy import Head, HeadFields, draw_head, head_fields, section_scale, soft_inside

KINDS = ("IPH", "IVH", "SAH", "SDH")  # with num_classes > 1 the label of a kind is its position + 1
KIND_WEIGHTS = {"IPH": 0.35, "IVH": 0.15, "SAH": 0.25, "SDH": 0.25}
LESIONS_PER_CASE_P = (0.55, 0.3, 0.15)  # 1, 2 or 3 bleeds
LESION_MEDIAN_ML = 1.0
LESION_LOG_SD = 1.5  # with the median above, about 80 % of bleeds are under 5 mL
LESION_ML_RANGE = (0.1, 60.0)
BLOOD_HU_RANGE = (50.0, 90.0)  # acute blood
BLOOD_TEXTURE_HU = 4.0
NOISE_SD_HU_RANGE = (3.0, 12.0)
NOISE_CORRELATION_MM = (0.3, 0.9)  # Gaussian sigma of the noise texture
SLICES_RANGE = (18, 40)
SLICE_MM = 5.0
SUBSLICES = 4  # sub-slices per 5 mm slice: partial volume along z
SPACING_AT_512_MM = (0.4, 0.5)
PADDING_HU = -2048  # outside the reconstruction circle, as some scanners write it
PADDING_P = 0.3
LESION_Z_MM = (-25.0, 70.0)  # bleeds are placed above the skull base and below the vertex
METADATA_NAME = "cases.json"


@dataclass(frozen=True)
class HardCase:
    ct: SyntheticCase
    mimic: np.ndarray  # bool (x, y, z): hyperdense voxels that are not hemorrhage (label 0 there)
    intracranial: np.ndarray  # bool (x, y, z): inside the inner table of the skull, skull-base bone excluded
    info: dict  # JSON-ready: slices, spacing, noise, lesions (kind, volume), mimics


@dataclass(frozen=True)
class Grid:
    """Voxel centres in head millimetres: in-plane rotated and shifted, z on sub-slices."""

    size_px: int
    pixel_mm: float
    num_slices: int
    z_start_mm: float  # centre of the first slice
    yaw_rad: float
    shift_mm: tuple[float, float]

    def head_xy(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Head coordinates (X to the left-right, Y anterior) of the pixels in rows x cols."""
        centre = (self.size_px - 1) / 2
        u = ((np.arange(self.size_px)[rows] - centre) * self.pixel_mm).astype(np.float32)[:, None]
        v = ((np.arange(self.size_px)[cols] - centre) * self.pixel_mm).astype(np.float32)[None, :]
        c, s = np.float32(np.cos(self.yaw_rad)), np.float32(np.sin(self.yaw_rad))
        return c * u + s * v - np.float32(self.shift_mm[0]), -s * u + c * v - np.float32(self.shift_mm[1])

    def sub_z(self, slices: slice) -> np.ndarray:
        """Sub-slice centres (mm) of the output slices in `slices`, SUBSLICES per slice, in order."""
        index = np.arange(self.num_slices)[slices]
        offsets = ((np.arange(SUBSLICES) + 0.5) / SUBSLICES - 0.5) * SLICE_MM
        return (self.z_start_mm + SLICE_MM * index[:, None] + offsets[None, :]).ravel().astype(np.float32)

    def lesion_z_mm(self, margin_mm: float) -> tuple[float, float]:
        """Where a bleed centre may lie: above the skull base, below the vertex and inside the scan."""
        last = self.z_start_mm + SLICE_MM * (self.num_slices - 1)
        return max(LESION_Z_MM[0], self.z_start_mm + margin_mm), max(min(LESION_Z_MM[1], last - margin_mm), 0.0)

    def box(self, points_xy: np.ndarray, z_range_mm: tuple[float, float]) -> tuple[slice, slice, slice]:
        """The smallest index box holding head points (N x 2, mm) over a z range, with a 2-pixel margin."""
        c, s = np.cos(self.yaw_rad), np.sin(self.yaw_rad)
        x, y = points_xy[:, 0] + self.shift_mm[0], points_xy[:, 1] + self.shift_mm[1]
        u, v = c * x - s * y, s * x + c * y
        centre = (self.size_px - 1) / 2
        rows, cols = u / self.pixel_mm + centre, v / self.pixel_mm + centre
        first = np.floor((np.array(z_range_mm) - self.z_start_mm) / SLICE_MM + 0.5).astype(int)

        def span(low, high, limit):
            return slice(int(np.clip(low, 0, limit)), int(np.clip(high, 0, limit)))

        n = self.size_px
        return (span(rows.min() - 2, rows.max() + 3, n), span(cols.min() - 2, cols.max() + 3, n),
                span(first[0], first[1] + 1, self.num_slices))


def _average_subslices(fine: np.ndarray) -> np.ndarray:
    """(x, y, slices * SUBSLICES) -> (x, y, slices): what a 5 mm slice integrates."""
    total = fine[..., 0::SUBSLICES].copy()
    for offset in range(1, SUBSLICES):
        total += fine[..., offset::SUBSLICES]  # faster than a reduction over a short last axis
    return total * np.float32(1 / SUBSLICES)


def _fields(head: Head, grid: Grid, box: tuple[slice, slice, slice]) -> HeadFields:
    x, y = grid.head_xy(box[0], box[1])
    return head_fields(head, x, y, grid.sub_z(box[2]), edge_mm=grid.pixel_mm)


def _waves(rng: np.random.Generator, wavelength_mm: float, count: int = 6):
    """A smooth random field of unit spread (a sum of plane waves): cheap and the same at any pixel size."""
    directions = rng.normal(size=(count, 3))
    k = ((2 * np.pi / wavelength_mm) * directions / np.linalg.norm(directions, axis=1, keepdims=True)).tolist()
    phases = rng.uniform(0, 2 * np.pi, count).tolist()

    def field(f: HeadFields) -> np.ndarray:
        total = sum(np.cos(k[i][0] * f.x + k[i][1] * f.y + k[i][2] * f.z + phases[i]) for i in range(count))
        return total * np.float32(np.sqrt(2.0 / count))

    return field


def _fill_to_volume(score: np.ndarray, region: np.ndarray, volume_mm3: float, voxel_mm3: float,
                    edge_mm: float) -> np.ndarray:
    """Fraction of each sub-voxel in the lesion: the `volume_mm3` of `region` where `score` (mm) is highest.

    A quantile of the score sets the threshold, so every kind reaches its drawn volume whatever its shape.
    """
    candidates = score[region > 0.5]
    count = int(min(round(volume_mm3 / voxel_mm3), candidates.size))
    if count == 0:
        return np.zeros_like(score)
    threshold = np.partition(candidates, candidates.size - count)[candidates.size - count]
    return region * soft_inside(score - threshold, edge_mm)


def _lesion_intraparenchymal(rng, head: Head, grid: Grid, volume_mm3: float):
    radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    for _ in range(200):
        centre = (rng.uniform(-0.7, 0.7) * head.half_width_mm, rng.uniform(-0.7, 0.7) * head.half_length_mm,
                  rng.uniform(*grid.lesion_z_mm(margin_mm=radius)))
        probe = head_fields(head, *[np.float32([[c]]) for c in centre[:2]], np.float32([centre[2]]), edge_mm=1.0)
        if probe.parenchyma[0, 0, 0] > 0.99 and probe.brain_depth_mm[0, 0, 0] > min(radius, 15.0):
            break
    half = 1.8 * radius + 3
    corners = np.array([[centre[0] + dx, centre[1] + dy] for dx in (-half, half) for dy in (-half, half)])
    waves = _waves(rng, wavelength_mm=max(1.2 * radius, 4.0))

    def score(f: HeadFields) -> tuple[np.ndarray, np.ndarray]:
        distance = np.sqrt((f.x - centre[0]) ** 2 + (f.y - centre[1]) ** 2 + (f.z - centre[2]) ** 2)
        return radius - distance + 0.35 * radius * waves(f), f.parenchyma

    return corners, (centre[2] - half, centre[2] + half), score


def _lesion_intraventricular(rng, head: Head, grid: Grid, volume_mm3: float):
    side = rng.choice([-1.0, 1.0])
    half_x = head.ventricle_width_mm * 2 + 15
    corners = np.array([[side * 2, -45.0], [side * half_x, 30.0]])
    waves = _waves(rng, wavelength_mm=12.0)

    def score(f: HeadFields) -> tuple[np.ndarray, np.ndarray]:
        return -f.y + 3.0 * waves(f), f.ventricle * (np.sign(f.x) == side)  # blood settles posteriorly

    return corners, (-15.0, 30.0), score


def _surface_patch(rng, head: Head, grid: Grid, area_mm2: float):
    """Centre angle, centre z and half extents (rad, mm) of a patch of the inner skull surface."""
    half_mm = np.sqrt(area_mm2 / np.pi)
    theta, z = rng.uniform(-np.pi, np.pi), rng.uniform(*grid.lesion_z_mm(margin_mm=min(half_mm / 2, 10.0)))
    radius_mm = 0.9 * np.hypot(head.half_width_mm * np.cos(theta), head.half_length_mm * np.sin(theta))
    return theta, z, float(min(half_mm / radius_mm, 2.0)), float(min(half_mm * rng.uniform(0.7, 1.3), 40.0))


def _patch_profile(f: HeadFields, theta: float, z: float, half_theta: float, half_z: float) -> np.ndarray:
    """1 at the patch centre, 0 at its rim, negative outside."""
    d_theta = np.angle(np.exp(1j * (f.theta - theta))).astype(np.float32)
    return 1 - (d_theta / half_theta) ** 2 - ((f.z - z) / half_z) ** 2


def _patch_box(head: Head, theta: float, half_theta: float, depth_mm: float) -> np.ndarray:
    angles = theta + np.linspace(-half_theta, half_theta, 16)
    outer = np.stack([head.half_width_mm * np.cos(angles), head.half_length_mm * np.sin(angles)], axis=1)
    return np.concatenate([outer, outer * (1 - (depth_mm + 20) / head.half_width_mm)])


def _lesion_subdural(rng, head: Head, grid: Grid, volume_mm3: float):
    thickness = float(np.clip(4.4 * (volume_mm3 / 1000) ** (1 / 3), 2.0, 22.0))  # 60 mL: about 17 mm thick
    theta, z, half_theta, half_z = _surface_patch(rng, head, grid, 2 * volume_mm3 / thickness)

    def score(f: HeadFields) -> tuple[np.ndarray, np.ndarray]:
        profile = np.sqrt(np.clip(_patch_profile(f, theta, z, half_theta, half_z), 0, None))
        return thickness * profile - f.inner_depth_mm, f.intracranial * (profile > 0)

    return _patch_box(head, theta, half_theta, thickness), (z - half_z, z + half_z), score


def _lesion_subarachnoid(rng, head: Head, grid: Grid, volume_mm3: float):
    theta, z, half_theta, half_z = _surface_patch(rng, head, grid, volume_mm3 / 3.0)
    waves = _waves(rng, wavelength_mm=15.0)

    def score(f: HeadFields) -> tuple[np.ndarray, np.ndarray]:
        reach = 12.0 * _patch_profile(f, theta, z, half_theta, half_z) + 2.0 * waves(f)
        return reach - f.inner_depth_mm * 0.3, f.csf_space * (f.inner_depth_mm < 14)

    return _patch_box(head, theta, half_theta, 14.0), (z - half_z, z + half_z), score


LESION_BUILDERS = {"IPH": _lesion_intraparenchymal, "IVH": _lesion_intraventricular,
                   "SAH": _lesion_subarachnoid, "SDH": _lesion_subdural}


def draw_lesion_volumes_ml(rng: np.random.Generator, count: int) -> np.ndarray:
    """Bleed volumes (mL): log-normal, so most are small and a few are large, as in hospital series."""
    return np.clip(rng.lognormal(np.log(LESION_MEDIAN_ML), LESION_LOG_SD, size=count), *LESION_ML_RANGE)


def _draw_grid(rng: np.random.Generator, size_px: int) -> Grid:
    num_slices = int(rng.integers(SLICES_RANGE[0], SLICES_RANGE[1] + 1))
    field_of_view_mm = 512 * rng.uniform(*SPACING_AT_512_MM)
    z_start = max(-60.0, 10.0 - 2.5 * num_slices) + rng.uniform(-4, 4)
    return Grid(size_px, field_of_view_mm / size_px, num_slices, z_start, rng.uniform(-0.2, 0.2),
                (rng.uniform(-6, 6), rng.uniform(-6, 6)))


def _add_lesion(rng, kind: str, head: Head, grid: Grid, volume_ml: float, image: np.ndarray) -> tuple:
    """Paint one bleed into the image (partial volume computed on sub-slices); return its box and fraction."""
    corners, z_range, score_of = LESION_BUILDERS[kind](rng, head, grid, volume_ml * 1000)
    box = grid.box(corners, z_range)
    blood_hu, texture = rng.uniform(*BLOOD_HU_RANGE), _waves(rng, wavelength_mm=6.0)
    if any(s.stop <= s.start for s in box):  # the bleed lies outside the scan
        return box, np.zeros(tuple(max(s.stop - s.start, 0) for s in box), np.float32)
    fields = _fields(head, grid, box)
    score, region = score_of(fields)
    fine = _fill_to_volume(score, region * (1 - fields.mimic), volume_ml * 1000,
                           grid.pixel_mm ** 2 * SLICE_MM / SUBSLICES, grid.pixel_mm)
    # image = anatomy * (1 - f) + blood * f on every sub-slice, then averaged over the slice; clots are not uniform
    image[box] += _average_subslices(fine * (blood_hu + BLOOD_TEXTURE_HU * texture(fields) - fields.hu))
    return box, _average_subslices(fine)


def _render_head(head: Head, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, mimic mask and intracranial fraction of the head alone, one slice at a time to bound memory."""
    shape = (grid.size_px, grid.size_px, grid.num_slices)
    image, mimic = np.full(shape, np.float32(HOUNSFIELD_AIR)), np.zeros(shape, bool)
    inside = np.zeros(shape, np.float32)
    for j in range(grid.num_slices):
        scale = float(section_scale(head, grid.sub_z(slice(j, j + 1))).max())
        if scale == 0:
            continue
        half = np.array([head.half_width_mm, head.half_length_mm]) * scale + 2 * grid.pixel_mm
        box = grid.box(np.array([[sx * half[0], sy * half[1]] for sx in (-1, 1) for sy in (-1, 1)]), (0, 0))
        box = (box[0], box[1], slice(j, j + 1))
        fields = _fields(head, grid, box)
        image[box] = _average_subslices(fields.hu)
        mimic[box] = _average_subslices(fields.mimic) >= 0.5
        inside[box] = _average_subslices(fields.intracranial)
    return image, mimic, inside


def _streaks(rng, head: Head, grid: Grid, image: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Beam-hardening streaks across the slices by the skull base; returns where they add >= 20 HU."""
    bright = np.zeros(image.shape, bool)
    rows, cols = (np.nonzero(inside.any(axis=axes))[0] for axes in ((1, 2), (0, 2)))
    if rows.size == 0:
        return bright
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # streaks are drawn inside the skull only
    x, y = grid.head_xy(*box)
    for j, z in enumerate(grid.sub_z(slice(None))[SUBSLICES // 2::SUBSLICES]):
        if z > -25:
            continue
        for _ in range(int(rng.integers(3, 7))):
            px, py = float(rng.choice([-1, 1]) * rng.uniform(10, 30)), rng.uniform(-20, 10)
            angle = rng.uniform(0, np.pi)
            distance = np.abs((x - px) * math.sin(angle) - (y - py) * math.cos(angle))
            profile = np.clip(1 - (distance / rng.uniform(1.5, 4.0)) ** 2, 0, 1)
            streak = rng.uniform(-45, 45) * (profile * profile) * inside[box + (j,)]
            image[box + (j,)] += streak
            bright[box + (j,)] |= streak >= 20
    return bright


def make_hard_head_ct(seed: int | list[int], size_px: int = 128, num_classes: int = 1,
                      normal: bool = False) -> HardCase:
    """One hard case; `normal` gives the same kind of scan without any bleed (mimics only)."""
    if not 1 <= num_classes <= len(KINDS):
        raise ValueError(f"num_classes={num_classes}: use 1 (all kinds merged) to {len(KINDS)} ({', '.join(KINDS)})")
    anatomy_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(anatomy_seq)
    head, grid = draw_head(rng), _draw_grid(rng, size_px)
    image, mimic, inside = _render_head(head, grid)
    kinds = KINDS if num_classes == 1 else KINDS[:num_classes]
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    count = 0 if normal else int(rng.choice(len(LESIONS_PER_CASE_P), p=LESIONS_PER_CASE_P)) + 1
    label = np.zeros(image.shape, np.uint8)
    lesions = []
    for volume_ml in draw_lesion_volumes_ml(rng, count):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        box, fraction = _add_lesion(rng, kind, head, grid, float(volume_ml), image)
        visible = np.where(mimic[box], 0.0, fraction)
        voxels = visible >= 0.5
        if not voxels.any() and visible.any():
            # under half a voxel everywhere, yet visible: an annotator marks about its volume of its fullest voxels
            fullest = np.sort(visible, axis=None)[-max(1, round(float(visible.sum())))]
            voxels = (visible >= fullest) & (visible > 0)
        label[box][voxels] = 1 if num_classes == 1 else kinds.index(kind) + 1
        lesions.append({"kind": kind, "drawn_ml": round(float(volume_ml), 3),
                        "volume_ml": round(float(voxels.sum()) * grid.pixel_mm ** 2 * SLICE_MM / 1000, 3)})
    streaks = _streaks(rng, head, grid, image, inside) & (label == 0)
    mimic |= streaks
    noise_sd = rng.uniform(*NOISE_SD_HU_RANGE)
    padded = rng.uniform() < PADDING_P
    image += _scanner_noise(np.random.default_rng(noise_seq), image.shape, noise_sd,
                            rng.uniform(*NOISE_CORRELATION_MM) / grid.pixel_mm)
    if padded:
        image[_outside_circle(size_px)] = np.float32(PADDING_HU)
    image_hu = np.clip(np.rint(image), PADDING_HU, 3071).astype(np.int16)
    spacing = (grid.pixel_mm, grid.pixel_mm, SLICE_MM)
    info = {"num_slices": grid.num_slices, "spacing_mm": [round(s, 4) for s in spacing],
            "noise_sd_hu": round(noise_sd, 2), "padding_hu": PADDING_HU if padded else None,
            "normal": normal, "lesions": lesions,
            "lesion_volume_ml": round(float((label > 0).sum()) * grid.pixel_mm ** 2 * SLICE_MM / 1000, 3),
            "mimics": head.mimics() + (["beam_hardening_streaks"] if streaks.any() else [])}
    return HardCase(SyntheticCase(image_hu, label, head_ct_affine(spacing)), mimic, inside >= 0.5, info)


def _scanner_noise(rng, shape: tuple, sd_hu: float, correlation_px: float) -> np.ndarray:
    """Gaussian noise of `sd_hu`, smoothed in-plane where the pixels are finer than the noise texture."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if correlation_px >= 0.3:
        noise = gaussian_filter(noise, sigma=(correlation_px, correlation_px, 0), truncate=2.5)
        noise /= noise.std()
    return noise * np.float32(sd_hu)


def _outside_circle(size_px: int) -> np.ndarray:
    centre = (size_px - 1) / 2
    u, v = np.ogrid[:size_px, :size_px]
    return (u - centre) ** 2 + (v - centre) ** 2 > (size_px / 2) ** 2


def write_hard_dataset(root: Path, num_train: int = 18, num_test: int = 6, num_folds: int = 5, size_px: int = 128,
                       num_classes: int = 1, seed: int = 0, num_normal_test: int = 0) -> Path:
    """Write hard cases as imagesTr/labelsTr/imagesTs/labelsTs, datalist.json and cases.json; return the datalist.

    The last `num_normal_test` testing cases have no bleed, to measure false positives on normal scans.
    cases.json holds, per case, the kinds and volumes of its bleeds, its noise and its mimics.
    """
    if not 0 <= num_normal_test <= num_test:
        raise ValueError(f"num_normal_test={num_normal_test} must be between 0 and num_test={num_test}")
    root = Path(root)
    metadata = {}

    def cases():
        for index in range(num_train + num_test):
            normal = index >= num_train + num_test - num_normal_test
            case = make_hard_head_ct([seed, index], size_px=size_px, num_classes=num_classes, normal=normal)
            image, _ = case_files(index, training=index < num_train)
            metadata[image] = {"split": "training" if index < num_train else "testing", **case.info}
            yield case.ct

    datalist = write_cases_and_datalist(root, cases(), num_train=num_train, num_folds=num_folds)
    (root / METADATA_NAME).write_text(json.dumps(metadata, indent=1))
    return datalist
