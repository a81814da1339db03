"""Read one CT series from a folder of DICOM slices into a HU volume and a NIfTI (RAS) affine.

Read with pydicom: it is the maintained pure-Python DICOM library (highdicom, which writes
the SEG, is built on it), it reads every header so each check below can name the file it
failed on, and it installs with pip everywhere. SimpleITK's ImageSeriesReader sorts and
stacks silently (a localizer, a gap or gantry tilt goes through unnoticed), and dcm2niix is
a compiled converter with heuristics of its own whose output we would have to re-check.

Slices are sorted by ImagePositionPatient projected on the slice normal (never by file name
or InstanceNumber); stored values become HU through RescaleSlope/RescaleIntercept; DICOM's
LPS patient axes become NIfTI's RAS by flipping x and y.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4  # direction cosines that differ by less are the same orientation
TILT_TOLERANCE_DEG = 0.5  # slice positions may stray this far from the slice normal (rounding in headers)
SPACING_TOLERANCE_MM = 0.01  # slice steps that differ by more mean a missing (or extra) slice
NON_HU_MAX = 255  # a CT whose values all lie in 0..255 has no air (-1000 HU): a screenshot or 8-bit export
IGNORED_FILES = ("DICOMDIR",)


class DicomError(ValueError):
    """A DICOM folder that cannot be read as one CT series; the message names the folder or file and the fix."""


@dataclass
class DicomSeries:
    name: str
    folder: Path
    image_hu: np.ndarray  # int16 (columns, rows, slices), slices sorted along the slice normal
    affine: np.ndarray  # 4 x 4 voxel -> RAS mm, as NIfTI stores it
    files: list[Path]  # the slice files in the volume's slice order


def candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in IGNORED_FILES)


def holds_dicom(folder: Path) -> bool:
    """True when any file directly in `folder` is a DICOM file (has the DICM preamble)."""
    return any(pydicom.misc.is_dicom(p) for p in candidate_files(folder))


def series_folders(input_dir: str | Path) -> list[Path]:
    """The series to predict: `input_dir` itself when it holds DICOM slices, else each subfolder that does."""
    input_dir = Path(input_dir)
    if holds_dicom(input_dir):
        return [input_dir]
    folders = sorted(p for p in input_dir.iterdir() if p.is_dir() and holds_dicom(p))
    if not folders:
        raise DicomError(f"no DICOM files in {input_dir} or its subfolders; give a folder of one series' slices,"
                         " a folder of series folders (one case each), or NIfTI files")
    return folders


def read_series(folder: str | Path) -> DicomSeries:
    folder = Path(folder)
    headers = [read_header(path) for path in candidate_files(folder)]
    if not headers:
        raise DicomError(f"no DICOM files in {folder}; give the folder that holds the series' slices")
    check_ct(headers)
    check_no_localizers(headers, folder)
    check_one_series(headers, folder)
    row, column, normal = orientation(headers, folder)
    headers.sort(key=lambda h: float(np.dot(_position(h), normal)))
    step = slice_step(headers, normal, folder)
    spacing_row, spacing_column = (float(v) for v in headers[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * spacing_column, column * spacing_row, step
    lps[:3, 3] = _position(headers[0])
    volume = np.stack([hounsfield(h) for h in headers], axis=-1)
    check_hounsfield(volume, folder)
    return DicomSeries(folder.name, folder, volume, LPS_TO_RAS @ lps, [Path(h.filename) for h in headers])


def read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise DicomError(f"cannot read {path} as DICOM ({type(error).__name__}: {error}); remove the file from"
                         f" {path.parent} or replace it with an intact copy of the slice") from error


def check_ct(headers: list[pydicom.Dataset]) -> None:
    for header in headers:
        modality = header.get("Modality", "")
        if modality != "CT":
            raise DicomError(f"{header.filename} has modality {modality or '(none)'!r}, not CT: this model segments"
                             " non-contrast head CT only; remove non-CT files from the folder")
        if "PixelData" not in header or int(header.get("SamplesPerPixel", 1)) != 1:
            raise DicomError(f"{header.filename} holds no single-channel image (a report, a screenshot or a colour"
                             " capture?); remove it from the series folder")


def check_no_localizers(headers: list[pydicom.Dataset], folder: Path) -> None:
    scouts = [h for h in headers if "LOCALIZER" in [str(v).upper() for v in h.get("ImageType", [])]]
    if scouts:
        raise DicomError(f"{folder} holds {len(scouts)} localizer (scout) image(s), e.g. {scouts[0].filename}"
                         " (ImageType LOCALIZER); move them out of the series folder and keep only the axial slices")


def check_one_series(headers: list[pydicom.Dataset], folder: Path) -> None:
    counts = Counter(str(h.get("SeriesInstanceUID", "")) for h in headers)
    if len(counts) > 1:
        example = {str(h.get("SeriesInstanceUID", "")): h.filename for h in headers}
        listed = "; ".join(f"{uid} ({count} files, e.g. {example[uid]})" for uid, count in counts.most_common())
        raise DicomError(f"{folder} mixes {len(counts)} series ({listed}); put each series in its own folder,"
                         " one case per folder")


def orientation(headers: list[pydicom.Dataset], folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column direction cosines shared by every slice, and the slice normal (LPS)."""
    cosines = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    odd = np.flatnonzero(np.abs(cosines - cosines[0]).max(axis=1) > ORIENTATION_TOLERANCE)
    if odd.size:
        raise DicomError(f"{headers[odd[0]].filename} is oriented differently from {headers[0].filename}"
                         " (ImageOrientationPatient); a localizer or a reformatted slice is mixed into"
                         f" {folder}: move it out")
    row, column = cosines[0, :3], cosines[0, 3:]
    return row, column, np.cross(row, column)


def slice_step(headers: list[pydicom.Dataset], normal: np.ndarray, folder: Path) -> np.ndarray:
    """The vector from one slice to the next; refuses tilt, repeated positions and uneven spacing."""
    if len(headers) == 1:
        thickness = float(headers[0].get("SpacingBetweenSlices", headers[0].get("SliceThickness", 1.0)))
        return normal * thickness
    positions = np.array([_position(h) for h in headers])
    along = positions @ normal
    gaps = np.diff(along)
    if gaps.min() < SPACING_TOLERANCE_MM:
        index = int(np.argmin(gaps))
        raise DicomError(f"{headers[index].filename} and {headers[index + 1].filename} lie at the same position;"
                         f" {folder} holds a slice twice or two acquisitions: keep one copy of each slice")
    step = (positions[-1] - positions[0]) / (len(headers) - 1)
    tilt = np.degrees(np.arccos(np.clip(abs(np.dot(step, normal)) / np.linalg.norm(step), -1, 1)))
    if tilt > TILT_TOLERANCE_DEG:
        raise DicomError(f"{folder} was acquired with gantry tilt ({tilt:.1f} degrees between the slice normal and"
                         " the slice positions); resample it to an untilted grid first (e.g. dcm2niix corrects"
                         " tilt) and predict the NIfTI it writes")
    if gaps.max() - gaps.min() > SPACING_TOLERANCE_MM:
        index = int(np.argmax(gaps))
        raise DicomError(f"uneven slice spacing in {folder}: {gaps.min():.2f} mm mostly, {gaps.max():.2f} mm between"
                         f" {headers[index].filename} and {headers[index + 1].filename}; slices are missing there."
                         " Export the complete series")
    return step


def hounsfield(header: pydicom.Dataset) -> np.ndarray:
    """One slice as int16 HU, (columns, rows) so the first array axis follows the row direction."""
    slope, intercept = float(header.get("RescaleSlope", 1)), float(header.get("RescaleIntercept", 0))
    try:
        stored = header.pixel_array
    except Exception as error:  # pydicom raises many types for pixel data it cannot decode
        raise DicomError(f"cannot decode the pixels of {header.filename} ({type(error).__name__}: {error}); export"
                         " the series uncompressed or install the decoder pydicom names") from error
    return np.clip(np.round(stored * slope + intercept), -32768, 32767).astype(np.int16).T


def check_hounsfield(volume: np.ndarray, folder: Path) -> None:
    low, high = int(volume.min()), int(volume.max())
    if low >= 0 and high <= NON_HU_MAX:
        raise DicomError(f"the slices in {folder} span {low}..{high} after RescaleSlope/RescaleIntercept, not"
                         " Hounsfield units (air is about -1000 HU): an 8-bit export or screenshot. Export the"
                         " original CT series from the scanner or PACS")


def _position(header: pydicom.Dataset) -> np.ndarray:
    return np.array([float(v) for v in header.ImagePositionPatient])
