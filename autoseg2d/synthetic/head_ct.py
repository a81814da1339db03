"""Synthetic non-contrast head CT with hemorrhage-like lesions, for tests and the demo.

Anatomy is placed in fractions of the field of view, so a 64 x 64 test volume and a
512 x 512 benchmark volume look alike; spacing is recorded in the NIfTI affine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

HOUNSFIELD_AIR = -1000
HOUNSFIELD_SCALP = 40
HOUNSFIELD_SKULL = 1200
HOUNSFIELD_BRAIN = 32
HOUNSFIELD_CSF = 6
HOUNSFIELD_BLOOD = 70
NOISE_SD_HU = 5.0


@dataclass(frozen=True)
class SyntheticCase:
    image_hu: np.ndarray  # int16, (x, y, z)
    label: np.ndarray  # uint8, (x, y, z), 1 = hemorrhage
    affine: np.ndarray  # 4 x 4, voxel -> RAS mm


def head_ct_affine(spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """LPS-like axial CT affine (x flipped, as many scanners write it)."""
    return np.diag([-spacing_mm[0], spacing_mm[1], spacing_mm[2], 1.0])


def make_head_ct(
    size: int = 64,
    num_slices: int = 8,
    spacing_mm: tuple[float, float, float] = (0.45, 0.45, 5.0),
    num_lesions: int | None = None,
    seed: int = 0,
    num_classes: int = 1,
    head_mm: tuple[float, float] | None = None,
) -> SyntheticCase:
    """One head CT: air, scalp, skull ring, brain, ventricles, noise and 1-3 lesions.

    With num_classes > 1 the lesions get labels 1..num_classes in turn (like hemorrhage subtypes).
    head_mm: the head's width and length (mm) at its widest slice; by default it fills 85 % x 95 %
    of the field of view (an adult head is about 150 x 190 mm, a 512 px field of view 230 mm).
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, size), np.linspace(-1, 1, size), np.linspace(-1, 1, num_slices), indexing="ij"
    )
    # head is an ellipsoid that narrows towards the vertex; z in [-1, 1] covers skull base to top
    head_scale = np.sqrt(np.clip(1.0 - (0.8 * z) ** 2, 0.05, None))
    width, length = (0.85, 0.95) if head_mm is None else (head_mm[0] / (size * spacing_mm[0]),
                                                          head_mm[1] / (size * spacing_mm[1]))
    r = np.sqrt((x / width) ** 2 + (y / length) ** 2) / head_scale

    image = np.full(x.shape, HOUNSFIELD_AIR, dtype=np.float32)
    image[r < 1.0] = HOUNSFIELD_SCALP
    image[r < 0.95] = HOUNSFIELD_SKULL
    brain = r < 0.85
    image[brain] = HOUNSFIELD_BRAIN + 4 * np.sin(6 * x[brain]) * np.cos(5 * y[brain])
    ventricles = (((x - 0.12) / 0.08) ** 2 + (y / 0.25) ** 2 < head_scale**2) | (
        ((x + 0.12) / 0.08) ** 2 + (y / 0.25) ** 2 < head_scale**2
    )
    image[brain & ventricles] = HOUNSFIELD_CSF

    label = np.zeros(x.shape, dtype=np.uint8)
    for index in range(num_lesions if num_lesions is not None else int(rng.integers(1, 4))):
        lesion = _lesion_mask(rng, x, y, z, brain & ~ventricles, num_slices) > 0
        label[lesion] = index % num_classes + 1
    image[label > 0] = HOUNSFIELD_BLOOD + rng.normal(0, 3)

    image += rng.normal(0.0, NOISE_SD_HU, size=image.shape).astype(np.float32)
    return SyntheticCase(np.round(image).astype(np.int16), label, head_ct_affine(spacing_mm))


def _lesion_mask(rng, x, y, z, allowed: np.ndarray, num_slices: int) -> np.ndarray:
    """An ellipsoid blob inside the brain spanning about 2-3 slices."""
    inside = np.argwhere(allowed)
    cx, cy, cz = inside[rng.integers(len(inside))]
    radius_xy = rng.uniform(0.08, 0.2)
    radius_z = 1.5 * 2.0 / max(num_slices - 1, 1)  # about 1.5 slices either side
    blob = ((x - x[cx, cy, cz]) / radius_xy) ** 2 + ((y - y[cx, cy, cz]) / (radius_xy * rng.uniform(0.6, 1.4))) ** 2
    blob += ((z - z[cx, cy, cz]) / radius_z) ** 2
    return ((blob < 1.0) & allowed).astype(np.uint8)


def write_case(case: SyntheticCase, image_path: Path, label_path: Path | None) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), image_path)
    if label_path is not None:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(case.label, case.affine), label_path)


def write_dataset(
    root: str | Path,
    num_train: int = 6,
    num_test: int = 2,
    num_folds: int = 2,
    size: int = 64,
    num_slices: int = 8,
    spacing_mm: tuple[float, float, float] = (0.45, 0.45, 5.0),
    seed: int = 0,
    num_classes: int = 1,
    class_names: list[str] | None = None,
) -> Path:
    """Write imagesTr/labelsTr/imagesTs NIfTI files and a MONAI datalist; return the datalist path.

    Test cases also get labels (in labelsTs) so held-back scores can be computed. class_names (one per
    label id 1..num_classes) go into the datalist's "class_names".
    """
    root = Path(root)
    cases = (make_head_ct(size, num_slices, spacing_mm, seed=seed * 10_000 + i, num_classes=num_classes)
             for i in range(num_train + num_test))
    return write_cases_and_datalist(root, cases, num_train=num_train, num_folds=num_folds, class_names=class_names)


def case_files(index: int, training: bool) -> tuple[str, str]:
    """Image and label paths of case `index`, relative to the data root (nnU-Net-like imagesTr/labelsTs folders)."""
    split = "Tr" if training else "Ts"
    return f"images{split}/case_{index:03d}.nii.gz", f"labels{split}/case_{index:03d}.nii.gz"


def write_cases_and_datalist(root: Path, cases: Iterable[SyntheticCase], num_train: int, num_folds: int,
                             class_names: list[str] | None = None) -> Path:
    """Write the cases (the first num_train for training, folds in turn) and datalist.json; return its path.

    Cases may come from a generator, so only one volume is in memory at a time.
    Testing entries keep their label so that held-out cases can be scored; class_names (names of the
    label ids 1..N) go into the datalist's "class_names".
    """
    training, testing = [], []
    for index, case in enumerate(cases):
        image, label = case_files(index, training=index < num_train)
        write_case(case, root / image, root / label)
        if index < num_train:
            training.append({"image": image, "label": label, "fold": index % num_folds})
        else:
            testing.append({"image": image, "label": label})
    datalist = root / "datalist.json"
    names = {"class_names": list(class_names)} if class_names else {}
    datalist.write_text(json.dumps({**names, "training": training, "testing": testing}, indent=2))
    return datalist
