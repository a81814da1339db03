"""The head of a hard synthetic CT case: layers, ventricles, sulci and hyperdense mimics, in millimetres.

Every structure is a function of head coordinates (X left-right, Y anterior, z up, mm from the centre
of the widest section), so the same head can be sampled at any pixel size, on the whole volume or in
the box around one bleed. Boundaries are soft over one pixel (`soft_inside`), which is the in-plane
partial volume; `hard` adds the partial volume along z by averaging sub-slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoseg2d.synthetic.head_ct import HOUNSFIELD_AIR, HOUNSFIELD_CSF, HOUNSFIELD_SCALP

SKULL_BASE_Z_MM = -28.0  # below this, the floor of the anterior fossa, petrous ridges and clivus appear
LOWER_HEAD_MM = 130.0  # the head narrows slowly below its widest section, fast above it
SULCUS_DEPTH_MM = 10.0


@dataclass(frozen=True)
class Head:
    half_width_mm: float  # outer head at its widest section, left-right
    half_length_mm: float  # the same, anterior-posterior
    top_mm: float  # vertex above the widest section
    scalp_mm: float
    skull_mm: float
    csf_mm: float  # CSF over the brain surface; wider with atrophy
    cortex_mm: float
    white_hu: float
    grey_hu: float
    bone_hu: float
    ventricle_width_mm: float  # half width of a lateral ventricle; wider with atrophy
    sulcus_width_mm: float
    sulci_count: int
    sulci_phase: float
    falx_mm: float
    falx_hu: float
    choroid_mm: float
    choroid_hu: float  # 0: not calcified
    pineal_mm: float
    pineal_hu: float  # 0: not calcified
    base_phase: float

    def mimics(self) -> list[str]:
        """The hyperdense structures this head has besides its skull (streaks are added per case)."""
        present = {"falx": True, "choroid_plexus": self.choroid_hu > 0, "pineal": self.pineal_hu > 0,
                   "skull_base": True}
        return [name for name, yes in present.items() if yes]


@dataclass(frozen=True)
class HeadFields:
    """Per sub-voxel values of a head on a grid (x, y: 2D in-plane, z: 1D sub-slices; others 3D)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    theta: np.ndarray  # in-plane angle around the head centre
    hu: np.ndarray
    mimic: np.ndarray  # fraction of falx, calcifications and skull-base bone
    intracranial: np.ndarray  # fraction inside the inner table, skull base excluded
    parenchyma: np.ndarray  # brain tissue: no CSF, ventricles, falx or bone
    csf_space: np.ndarray  # CSF over the brain surface and in the sulci
    ventricle: np.ndarray
    inner_depth_mm: np.ndarray  # distance inward from the inner table
    brain_depth_mm: np.ndarray  # distance inward from the brain surface


def draw_head(rng: np.random.Generator) -> Head:
    """Head size, tissue contrast, atrophy and calcifications of one patient."""
    atrophy = rng.uniform(0, 1)
    white = rng.uniform(24, 30)
    return Head(
        half_width_mm=rng.uniform(64, 74), half_length_mm=rng.uniform(82, 92), top_mm=rng.uniform(92, 104),
        scalp_mm=rng.uniform(3, 6), skull_mm=rng.uniform(5, 8), csf_mm=1.0 + 2.5 * atrophy,
        cortex_mm=rng.uniform(2.5, 3.5), white_hu=white, grey_hu=white + rng.uniform(6, 10),
        bone_hu=rng.uniform(1100, 1500), ventricle_width_mm=3.0 + 5.0 * atrophy,
        sulcus_width_mm=0.6 + 2.0 * atrophy, sulci_count=int(rng.integers(36, 50)), sulci_phase=rng.uniform(0, 6.3),
        falx_mm=rng.uniform(1.0, 2.0), falx_hu=rng.uniform(60, 110),
        choroid_mm=rng.uniform(1.5, 3.5), choroid_hu=rng.uniform(100, 400) if rng.uniform() < 0.75 else 0.0,
        pineal_mm=rng.uniform(2.0, 4.0), pineal_hu=rng.uniform(100, 300) if rng.uniform() < 0.7 else 0.0,
        base_phase=rng.uniform(0, 6.3),
    )


def soft_inside(distance_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Fraction of a voxel inside a boundary `distance_mm` away (positive inside): partial volume over one pixel."""
    fraction = distance_mm * np.float32(1 / edge_mm)
    fraction += np.float32(0.5)
    return np.clip(fraction, 0, 1, out=fraction)


def section_scale(head: Head, z: np.ndarray) -> np.ndarray:
    """Size of the head's axial section at height z relative to its widest section (0 above the vertex)."""
    above, below = np.maximum(z, 0) / head.top_mm, np.minimum(z, 0) / LOWER_HEAD_MM
    return np.sqrt(np.clip(1 - above ** 2, 0, None) * np.clip(1 - below ** 2, 0, None)).astype(np.float32)


def _paint(hu: np.ndarray, value, fraction) -> None:
    """Lay a structure over what is there: hu = hu * (1 - f) + value * f."""
    hu += fraction * (value - hu)


def _sin_of_sum(in_plane: np.ndarray, along_z: np.ndarray) -> np.ndarray:
    """sin(a + b) for a 2D `a` and 1D `b`, from 2D and 1D sines only (a 3D sine costs ten times more)."""
    result = np.sin(in_plane)[..., None] * np.cos(along_z)
    result += np.cos(in_plane)[..., None] * np.sin(along_z)
    return result


def _spans(z: np.ndarray, low: float, high: float) -> bool:
    return bool(z.min() <= high and z.max() >= low)


def _ellipsoid(x, y, z, centre, radii, edge_mm: float) -> np.ndarray:
    rho = np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                  + ((z - centre[2]) / radii[2]) ** 2)
    return soft_inside((1 - rho) * min(radii), edge_mm)


def _ventricles(head: Head, x, y, z, edge_mm: float):
    """Lateral ventricles (diverging towards the atria) and the third ventricle."""
    width = head.ventricle_width_mm
    fraction = np.float32(0)
    if not _spans(z, -13, 26):
        return fraction
    for side in (-1.0, 1.0):
        centre_x = side * (width + 3 + 0.25 * np.maximum(0, -y - 5))
        fraction = np.maximum(fraction, _ellipsoid(x - centre_x, y, z, (0, -5, 12), (width, 34, 13), edge_mm))
    third = 0.3 * width + 0.8
    return np.maximum(fraction, _ellipsoid(x, y, z, (0, -3, -4), (third, 12, 9), edge_mm))


def _choroid_centre_x(head: Head, side: float) -> float:
    return side * (head.ventricle_width_mm + 3 + 0.25 * 23)


def _calcifications(head: Head, x, y, z, edge_mm: float):
    """(fraction, HU) of calcified choroid plexus (in the atria) and pineal (behind the third ventricle)."""
    spots = [((0.0, -20.0, 1.0), head.pineal_mm, head.pineal_hu)]
    spots += [((_choroid_centre_x(head, side), -28.0, 10.0), head.choroid_mm, head.choroid_hu) for side in (-1, 1)]
    fraction, hu = np.float32(0), np.float32(0)
    for centre, radius, value in spots:
        if value > 0 and _spans(z, centre[2] - radius - 3, centre[2] + radius + 3):
            spot = _ellipsoid(x, y, z, centre, (radius, radius, radius), edge_mm)
            hu = np.where(spot > fraction, np.float32(value), hu)
            fraction = np.maximum(fraction, spot)
    return fraction, hu


def _skull_base(head: Head, x, y, z, edge_mm: float):
    """(bone, air) fractions of the anterior fossa floor with its sinuses, the petrous ridges and the clivus."""
    if z.min() > SKULL_BASE_Z_MM:
        return np.float32(0), np.float32(0)
    below = (z < SKULL_BASE_Z_MM).astype(np.float32)
    floor_y = head.half_length_mm * (0.72 + 0.02 * (z - SKULL_BASE_Z_MM)) + 4 * np.cos(x / 9 + head.base_phase)
    anterior = soft_inside(y - floor_y, edge_mm) * below
    cells = np.cos(x / 3.5 + head.base_phase) * np.cos(y / 4) * np.cos(z / 3) > 0.25
    air = anterior * soft_inside(y - floor_y - 5, edge_mm) * (cells & (np.abs(x) < 22))
    bone = anterior - air
    if z.min() < -36:
        in_petrous = ((z > -62) & (z < -36)).astype(np.float32)
        for side in (-1.0, 1.0):  # a ridge from (ax, ay) laterally to (ax + dx, ay + dy) by the clivus
            ax, ay = side * 0.7 * head.half_width_mm, -0.15 * head.half_length_mm
            dx, dy = -side * 0.55 * head.half_width_mm, 0.23 * head.half_length_mm
            t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
            distance = np.hypot(x - ax - t * dx, y - ay - t * dy)
            bone = np.maximum(bone, soft_inside(5.0 + np.cos(distance + z / 4) - distance, edge_mm) * in_petrous)
        clivus = _ellipsoid(x, y, z, (0, 0.05 * head.half_length_mm, -60), (7, 10, 20), edge_mm)
        bone = np.maximum(bone, clivus)
    return bone, air


def head_fields(head: Head, x: np.ndarray, y: np.ndarray, z: np.ndarray, edge_mm: float) -> HeadFields:
    """The head sampled at in-plane points (x, y: 2D) on sub-slices z (1D), all in mm."""
    theta = np.arctan2(y, x)
    radius = np.hypot(x, y)
    across, along = head.half_width_mm, head.half_length_mm
    outline = across * along / np.hypot(along * np.cos(theta), across * np.sin(theta))  # ellipse radius at theta
    scale = section_scale(head, z)
    x, y, z, theta3 = x[..., None], y[..., None], z[None, None, :], theta[..., None]
    depth = outline[..., None] * scale - radius[..., None]
    inner = depth - np.float32(head.scalp_mm + head.skull_mm)
    brain_depth = inner - np.float32(head.csf_mm)

    hu = np.full(depth.shape, HOUNSFIELD_AIR, np.float32)
    _paint(hu, HOUNSFIELD_SCALP, soft_inside(depth, edge_mm))
    diploe = np.clip(1 - ((depth - head.scalp_mm - head.skull_mm / 2) / (head.skull_mm / 3)) ** 2, 0, 1)
    diploe = head.bone_hu - 450 * diploe * diploe  # the cancellous middle of the skull is less dense
    _paint(hu, diploe, soft_inside(depth - head.scalp_mm, edge_mm))
    inside = soft_inside(inner, edge_mm)
    _paint(hu, HOUNSFIELD_CSF, inside)
    brain = soft_inside(brain_depth, edge_mm)
    tissue = head.white_hu + (head.grey_hu - head.white_hu) * soft_inside(head.cortex_mm - brain_depth, edge_mm)
    if _spans(z, -12, 8):
        for side in (-1.0, 1.0):  # basal ganglia and thalami
            _paint(tissue, head.grey_hu, _ellipsoid(x, y, z, (side * 16, -2, -2), (8, 16, 10), edge_mm))
    _paint(hu, tissue, brain)

    phase = head.sulci_count * theta3 + z / 8  # gyri wind, and move between slices
    phase += 3 * _sin_of_sum(3 * theta + head.sulci_phase, z / 20)
    phase += 2 * _sin_of_sum(7 * theta - head.sulci_phase, -z / 13)
    sulcus_gap = np.abs(np.mod(phase + np.pi, 2 * np.pi) - np.pi) * (radius[..., None] / head.sulci_count)
    sulcus = soft_inside(head.sulcus_width_mm / 2 - sulcus_gap, edge_mm)
    sulcus *= soft_inside(SULCUS_DEPTH_MM - brain_depth, edge_mm) * brain
    _paint(hu, HOUNSFIELD_CSF, sulcus)
    ventricle = _ventricles(head, x, y, z, edge_mm) * brain
    _paint(hu, HOUNSFIELD_CSF, ventricle)

    above_callosum = (z > 24) | (np.abs(y) > 38)
    falx = soft_inside(head.falx_mm / 2 - np.abs(x), edge_mm) * soft_inside(inner - 1, edge_mm) * above_callosum
    _paint(hu, head.falx_hu, falx)
    calcified, calcified_hu = _calcifications(head, x, y, z, edge_mm)
    _paint(hu, calcified_hu, calcified)
    base_bone, base_air = _skull_base(head, x, y, z, edge_mm)
    _paint(hu, head.bone_hu, base_bone * inside)
    _paint(hu, HOUNSFIELD_AIR, base_air * inside)

    base = np.clip(base_bone + base_air, 0, 1)
    mimic = np.maximum(np.maximum(falx, calcified), base_bone * inside)
    return HeadFields(
        x=x, y=y, z=z, theta=theta3, hu=hu, mimic=mimic, intracranial=inside * (1 - base),
        parenchyma=brain * (1 - sulcus) * (1 - ventricle) * (1 - falx) * (1 - base),
        csf_space=(inside * (1 - brain) + sulcus) * (1 - base), ventricle=ventricle * (1 - base),
        inner_depth_mm=inner, brain_depth_mm=brain_depth,
    )
