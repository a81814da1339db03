"""Write a NIfTI CT as a folder of DICOM CT slices (pydicom), for tests; options make the usual faults."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(image: Path, folder: Path, slope: float = 1.0, intercept: float = -1024.0, modality: str = "CT",
                 tilt_mm_per_slice: float = 0.0, skip_slices: tuple = (), image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 series_uid: str | None = None, study_uid: str | None = None, prefix: str = "IM") -> list[Path]:
    """One file per axial slice, named so that file-name order is not slice order; returns the files."""
    source = nib.load(str(image))
    data, lps = np.asanyarray(source.dataobj), RAS_TO_LPS @ source.affine
    spacing_x, spacing_y = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row, column = lps[:3, 0] / spacing_x, lps[:3, 1] / spacing_y
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    frame_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    count = data.shape[2]
    for k in range(count):
        if k in skip_slices:
            continue
        position = (lps @ np.array([0, 0, k, 1.0]))[:3] + np.array([0, tilt_mm_per_slice * k, 0])
        stored = np.round((data[:, :, k].T.astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds = slice_dataset(stored, row, column, position, (spacing_y, spacing_x), slope, intercept, modality,
                           image_type, series_uid, study_uid, frame_uid, k + 1)
        path = folder / f"{prefix}{(k * 7) % count:04d}_{k}"  # no .dcm suffix, shuffled names: as PACS exports look
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files


def slice_dataset(stored, row, column, position, pixel_spacing, slope, intercept, modality, image_type, series_uid,
                  study_uid, frame_uid, number) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Synthetic", "SYN001", "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", \
        "1", "A1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = modality, 2, number, "synthetic"
    ds.ImageType = list(image_type)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *column)]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = "5"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
    ds.PixelData = stored.tobytes()
    return ds
