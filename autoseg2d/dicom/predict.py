"""Predict DICOM CT series: each series is read and checked, predicted like a NIfTI scan, optionally saved as SEG.

Every series is read and checked before the first is predicted, so a bad folder stops the
run at once rather than hours in. The masks are NIfTI files named after the series folder,
in the series' geometry; with dicom_seg, <folder>.seg.dcm beside them references the slices.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from autoseg2d.dicom.seg import write_dicom_seg
from autoseg2d.dicom.series import read_series, series_folders
from autoseg2d.pipeline.postprocess import PROBABILITY_THRESHOLD
from autoseg2d.pipeline.predict import EnsemblePredictor, predict_images
from autoseg2d.reporting.case_report import REPORT_JSON, rescue_of
from autoseg2d.reporting.geometry import SpacingRange

logger = logging.getLogger(__name__)

SEG_SUFFIX = ".seg.dcm"


def predict_dicom(predictor: EnsemblePredictor, input_dir: Path, output_dir: Path, dicom_seg: bool = False,
                  training_spacing: SpacingRange | None = None) -> list[dict]:
    folders = series_folders(input_dir)
    with tempfile.TemporaryDirectory(prefix="dicom-series-") as scratch:
        images, sources, slice_files = [], {}, {}
        for folder in folders:
            series = read_series(folder)
            image = Path(scratch) / f"{series.name}.nii.gz"
            nib.save(nib.Nifti1Image(series.image_hu, series.affine), str(image))
            images.append(image)
            sources[series.name], slice_files[series.name] = str(folder), series.files
            logger.info(f"DICOM {folder}: {series.image_hu.shape[-1]} CT slices, checked")
        results = predict_images(predictor, images, output_dir, sources, training_spacing)
    if dicom_seg:
        classes, predicted = predictor.class_names(), {result["case"] for result in results}
        rows = json.loads((output_dir / REPORT_JSON).read_text())["rows"]
        for name, files in slice_files.items():
            target = output_dir / f"{name}{SEG_SUFFIX}"
            if name in predicted or not target.exists():  # a mask predicted again gets its SEG again
                mask = np.asanyarray(nib.load(str(output_dir / f"{name}.nii.gz")).dataobj)
                rescue = rescue_of([row for row in rows if row["case"] == name])
                note = rescue.describe(PROBABILITY_THRESHOLD) if rescue and rescue.applied else None
                write_dicom_seg(mask, files, classes, target, note, model=predictor.model)
                logger.info(f"DICOM SEG {target} (on {len(files)} slices of {sources[name]})")
    return results
