"""DICOM series in, NIfTI mask and DICOM SEG out: the same mask as the NIfTI route, and a SEG that reads back."""

from __future__ import annotations

import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from autoseg2d.dicom.predict import predict_dicom
from autoseg2d.pipeline.predict import EnsemblePredictor, predict_images
from autoseg2d.synthetic.head_ct import HOUNSFIELD_BLOOD, make_head_ct, write_case
from tests.dicom.series_writer import write_series


class ThresholdInferer:
    """Stands in for a member: 'hemorrhage' where the scan is near blood density, computed from the file itself,
    so any difference in how the DICOM and NIfTI routes read the scan shows in the mask."""

    config = {"output_classes": 2, "class_names": ["hemorrhage"]}

    def infer(self, image):
        import torch

        data = np.asanyarray(nib.load(str(image)).dataobj).astype(np.float32)
        lesion = np.clip((data - (HOUNSFIELD_BLOOD - 20)) / 20, 0, 1) * (data < 150)
        return torch.from_numpy(np.stack([1 - lesion, lesion]))


def predictor() -> EnsemblePredictor:
    ensemble = EnsemblePredictor.__new__(EnsemblePredictor)
    ensemble.members, ensemble.mode = [ThresholdInferer(), ThresholdInferer()], "mean"
    ensemble.postprocessing, ensemble.screen = None, None
    return ensemble


@pytest.fixture
def scans(tmp_path):
    """Two cases, each as NIfTI and as a DICOM series folder."""
    for index in range(2):
        write_case(make_head_ct(size=32, num_slices=6, seed=index, num_lesions=2), tmp_path / "nifti" /
                   f"case{index}.nii.gz", None)
        write_series(tmp_path / "nifti" / f"case{index}.nii.gz", tmp_path / "dicom" / f"case{index}")
    return tmp_path


def test_dicom_and_nifti_give_the_same_mask_in_the_same_place(scans):
    predict_images(predictor(), sorted((scans / "nifti").iterdir()), scans / "from_nifti")
    predict_dicom(predictor(), scans / "dicom", scans / "from_dicom")
    for index in range(2):
        ours = nib.as_closest_canonical(nib.load(str(scans / "from_dicom" / f"case{index}.nii.gz")))
        theirs = nib.as_closest_canonical(nib.load(str(scans / "from_nifti" / f"case{index}.nii.gz")))
        assert np.asanyarray(theirs.dataobj).any()
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-5)
    rows = json.loads((scans / "from_dicom" / "report.json").read_text())["rows"]
    assert [r["input"] for r in rows] == [str(scans / "dicom" / f"case{i}") for i in range(2)]
    nifti_rows = json.loads((scans / "from_nifti" / "report.json").read_text())["rows"]
    assert [r["volume_ml"] for r in rows] == pytest.approx([r["volume_ml"] for r in nifti_rows])


def test_dicom_seg_references_the_series_and_its_frames_match_the_mask(scans):
    series = scans / "dicom" / "case0"
    predict_dicom(predictor(), series, scans / "out", dicom_seg=True)  # one series folder given directly
    seg = hd.seg.segread(str(scans / "out" / "case0.seg.dcm"))
    sources = sorted((pydicom.dcmread(str(p)) for p in series.iterdir()),
                     key=lambda ds: -float(ds.ImagePositionPatient[2]))  # the volume's slice order (see reader)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.get_segment_description(1).segment_label == "hemorrhage"
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], segment_numbers=[1])[..., 0]
    mask = np.asanyarray(nib.load(str(scans / "out" / "case0.nii.gz")).dataobj)  # (columns, rows, slices)
    assert frames.any()
    np.testing.assert_array_equal(frames, np.transpose(mask, (2, 1, 0)))
