"""Read a CT/MR volume (and its label) once, check it, and turn it to RAS axis order.

RAS order puts the axial axis last with slices running foot to head, so adjacent-slice
channels mean the same thing for every file. Only axes are permuted and flipped, never
resampled: the network sees each axial slice at its native resolution, and predictions are
turned back to the file's own array order, so they share its grid and header.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

AFFINE_TOLERANCE_MM = 1e-3
MIN_TRAINING_SLICES = 2  # one slice has no neighbours: its adjacent-slice channels would all be copies of it
HU_EXPORT_MAX = 255  # CT whose values all lie in 0..255 has no air (-1000 HU): a 0-1 or 0-255 export, not HU
HU_AIR_MAX = -500  # a head CT in HU holds air (about -1000 HU) around the head: its lowest value lies below this
DISTILL_TARGET_KEY = "foreground"  # the array of a distillation target file: the teacher's P(any lesion) as levels
DISTILL_TARGET_LEVELS = 255  # probability = level / 255 (uint8)


class VolumeError(ValueError):
    """A case that cannot be used as it is; the message names the case and the fix."""


def describe_files(image_path: str | Path, label_path: str | Path | None) -> str:
    """How messages name a case's files: "<image>" or "<image>, label <label>"."""
    return f"{image_path}" + (f", label {label_path}" if label_path is not None else "")


@dataclass
class Volume:
    name: str
    image: np.ndarray  # (R, A, S): axial slices along the last axis; int16 HU for CT, float32 otherwise
    label: np.ndarray | None  # (R, A, S) uint8 class indices
    affine: np.ndarray  # the image file's affine (file array order)
    source: str = ""  # the file(s) it was read from, for messages
    soft_target: np.ndarray | None = None  # (R, A, S) uint8 teacher levels (distillation, training cases only)

    @property
    def num_slices(self) -> int:
        return self.image.shape[-1]


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(X, Y, Z) in file order -> RAS order by axis permutation and flips only."""
    return orientations.apply_orientation(array, orientations.io_orientation(affine))


def from_ras(channels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of to_ras for channel-first (C, R, A, S) arrays: back to (C, X, Y, Z) file order."""
    ras = orientations.axcodes2ornt(("R", "A", "S"))
    back = orientations.ornt_transform(ras, orientations.io_orientation(affine))
    moved = orientations.apply_orientation(np.moveaxis(channels, 0, -1), back)
    return np.ascontiguousarray(np.moveaxis(moved, -1, 0))


def file_shape(ras_shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, ...]:
    """The shape in file array order of an array that to_ras turned into `ras_shape`."""
    return tuple(int(ras_shape[int(axis)]) for axis in orientations.io_orientation(affine)[:, 0])


def case_name(path: str | Path) -> str:
    """A NIfTI file's name without .nii.gz or .nii (the driver's autoseg2d.datalist.case_name does the same)."""
    name = Path(path).name
    suffix = next((s for s in (".nii.gz", ".nii") if name.endswith(s)), "")
    return name[: len(name) - len(suffix)]


def read_image(path: str | Path, case: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"case {case}: file not found: {path}. Check the datalist entry and --dataroot.")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise VolumeError(
            f"case {case}: cannot read {path} ({type(err).__name__}: {err}); is it a NIfTI file?") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        fix = "give the whole 3D series" if data.ndim < 3 else "save the one CT channel (or time point) as its own file"
        raise VolumeError(
            f"case {case}: {path} has shape {data.shape}; a single-channel 3D volume (X, Y, Z) is expected: {fix}"
        )
    return data, img.affine, img.header


def load_volume(image_path: str | Path, label_path: str | Path | None = None, modality: str = "ct") -> Volume:
    """Read, check and reorient one case; the image becomes int16 HU for CT, z-scored float32 otherwise."""
    case = case_name(image_path)
    data, affine, _ = read_image(image_path, case)
    label = None
    if label_path is not None:
        label = to_ras(_load_label(label_path, case, data.shape, affine), affine)
    return volume_from_array(case, data, affine, modality, label, describe_files(image_path, label_path))


def volume_from_array(case: str, data: np.ndarray, affine: np.ndarray, modality: str, label: np.ndarray | None,
                      source: str) -> Volume:
    """Check, normalise and reorient a 3D image however it was read (a NIfTI file here, LoadImage in the
    exported bundle); `label` is already in RAS order."""
    if not np.all(np.isfinite(data)):
        raise VolumeError(f"case {case}: {source} contains NaN or inf voxels; fix or exclude the scan")
    image = np.ascontiguousarray(to_ras(normalise_modality(data, modality), affine))
    return Volume(case, image, label, affine, source)


def normalise_modality(data: np.ndarray, modality: str) -> np.ndarray:
    """CT keeps Hounsfield units (windowed later, per channel); other modalities are z-scored on nonzero voxels."""
    if modality.lower() == "ct":
        return np.clip(data, -32768, 32767).astype(np.int16)
    data = data.astype(np.float32)
    body = data[data != 0]
    if body.size == 0:
        return data
    return ((data - body.mean()) / max(float(body.std()), 1e-6)).astype(np.float32)


def _load_label(path: str | Path, case: str, shape: tuple, affine: np.ndarray) -> np.ndarray:
    label, label_affine, _ = read_image(path, case)
    if label.shape != shape:
        raise VolumeError(f"case {case}: label shape {label.shape} differs from image shape {shape} ({path})")
    if not np.allclose(label_affine, affine, atol=AFFINE_TOLERANCE_MM):
        raise VolumeError(
            f"case {case}: label affine differs from the image affine by more than {AFFINE_TOLERANCE_MM} mm ({path});"
            " the label must be drawn on the image's own grid"
        )
    values = np.unique(label)
    integral = np.all(np.isfinite(values)) and np.all(values == np.round(values))
    if not integral or values.min() < 0 or values.max() > 255:
        raise VolumeError(
            f"case {case}: label values {values[:10].tolist()} are not class indices 0..N ({path});"
            " labels must be integers (e.g. 0/1, not 0/255 or probabilities)"
        )
    return label.astype(np.uint8)


def check_label_classes(volume: Volume, num_classes: int) -> None:
    if volume.label is not None and int(volume.label.max()) >= num_classes:
        found = np.unique(volume.label).tolist()
        raise VolumeError(
            f"case {volume.name} ({volume.source}): label values {found} exceed the {num_classes - 1} foreground"
            " classes of this bundle (output_classes); 0/255 masks must be converted to 0/1"
        )


def check_ct_range(volume: Volume, modality: str) -> None:
    """Raise when a 'ct' image cannot be in Hounsfield units.

    A head CT holds air around the head (about -1000 HU) and bone (> 300 HU); values that all
    lie in 0..255 come from a 0-1 or 0-255 export (PNG, a normalised array), which the HU
    windows would flatten to a few grey levels. A scan with no value below HU_AIR_MAX holds no
    air: most often stored values without the rescale intercept (0..4095, air at 0), which the
    windows would shift by about 1000 HU and air-slice skipping would not see.
    """
    if modality.lower() != "ct" or volume.image.size == 0:
        return
    low, high = int(volume.image.min()), int(volume.image.max())
    fix = (" Convert the scan to HU (from DICOM: stored value x RescaleSlope + RescaleIntercept), or set modality"
           " to 'mri' to z-score intensities instead of windowing them")
    if low >= 0 and high <= HU_EXPORT_MAX:
        raise VolumeError(
            f"case {volume.name} ({volume.source}): modality is ct but the voxel values span {low}..{high},"
            " not Hounsfield units (air is about -1000 HU, bone above 300 HU); this looks like 0-1 or 0-255"
            " exported data." + fix
        )
    if low > HU_AIR_MAX:
        raise VolumeError(
            f"case {volume.name} ({volume.source}): modality is ct but the voxel values span {low}..{high}, with"
            f" nothing below {HU_AIR_MAX} HU: no air (about -1000 HU), so not Hounsfield units; this looks like"
            " stored values without the rescale intercept (e.g. 0..4095 with air at 0)." + fix
        )


def check_training_case(volume: Volume, num_classes: int, modality: str) -> list[str]:
    """Raise VolumeError for a case that cannot be trained on; return notes on usable oddities for the log."""
    check_label_classes(volume, num_classes)
    check_ct_range(volume, modality)
    if volume.num_slices < MIN_TRAINING_SLICES:
        raise VolumeError(
            f"case {volume.name} ({volume.source}): the image has {volume.num_slices} axial slice;"
            f" training needs at least {MIN_TRAINING_SLICES} (each input stacks neighbouring slices, and one"
            " slice has none)."
            " Give the whole 3D series, or move the case to testing, where a single slice is predicted on its own"
        )
    if volume.label is not None and not volume.label.any():
        return [f"case {volume.name} ({volume.source}): the label is empty (no foreground voxel); "
                "it is used as a background-only case"]
    return []


def distill_target_path(folder: str | Path, case: str) -> Path:
    return Path(folder) / f"{case}.npz"


def read_distill_target(folder: str | Path, volume: Volume) -> np.ndarray:
    """The teacher's foreground levels of one training case, in RAS order like its image and label.

    The file holds them in the image file's own array order and shape (what a prediction written
    in the image's grid has), so the image's affine turns them exactly as it turns the label.
    """
    path = distill_target_path(folder, volume.name)
    expected = file_shape(volume.label.shape, volume.affine)
    fix = (f"write it with np.savez_compressed(..., {DISTILL_TARGET_KEY}=levels), levels a uint8 array of the image"
           f" file's shape {expected} (0..{DISTILL_TARGET_LEVELS}), or set distill_targets to null")
    if not path.is_file():
        raise VolumeError(f"case {volume.name}: no distillation target {path}; {fix}")
    try:
        with np.load(path) as stored:
            if DISTILL_TARGET_KEY not in stored.files:
                raise VolumeError(f"case {volume.name}: {path} holds {stored.files}, not '{DISTILL_TARGET_KEY}'; {fix}")
            levels = stored[DISTILL_TARGET_KEY]
    except VolumeError:
        raise
    except Exception as err:  # numpy raises several types for files that are not npz archives
        raise VolumeError(f"case {volume.name}: cannot read {path} ({type(err).__name__}: {err}); {fix}") from err
    if levels.shape != expected or levels.dtype != np.uint8:
        raise VolumeError(f"case {volume.name}: {path} holds a {levels.dtype} array of shape {levels.shape}, not uint8"
                          f" of the label's shape {expected} ({volume.source}); {fix}")
    return np.ascontiguousarray(to_ras(levels, volume.affine))
