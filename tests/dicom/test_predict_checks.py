"""DICOM prediction's guarantees: a series not in HU is refused naming its folder, and a rescued mask's SEG
segment says that it was rescued."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from autoseg2d.dicom.predict import predict_dicom
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.dicom.series_writer import write_series
from tests.ensemble_fakes import RefusingInferer, fake_ensemble

RESCUE = {"threshold": 0.5, "steps": [{"name": "keep_nonempty", "floor": 0.05}]}


def series(tmp_path, offset_hu: int = 0, intercept: float = -1024.0):
    case = make_head_ct(size=32, num_slices=6, seed=0)
    nifti = tmp_path / "nifti" / "case0.nii.gz"
    write_case(case, nifti, None)
    if offset_hu:
        nib.save(nib.Nifti1Image((case.image_hu + offset_hu).astype(np.int16), case.affine), str(nifti))
    write_series(nifti, tmp_path / "dicom" / "case0", intercept=intercept)
    return tmp_path / "dicom" / "case0"


def test_a_series_stored_without_its_intercept_is_refused_naming_its_folder(tmp_path):
    folder = series(tmp_path, offset_hu=1024, intercept=0.0)  # reads as 0..4095 with air at about 0
    with pytest.raises(ValueError, match="not Hounsfield units") as refused:
        predict_dicom(fake_ensemble("mean", RefusingInferer()), folder, tmp_path / "out", dicom_seg=True)
    assert str(folder) in str(refused.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_rescued_mask_says_so_in_its_seg_segment(tmp_path):
    folder = series(tmp_path)
    lesion = np.full((32, 32, 6), 0.001, np.float32)
    lesion[10:13, 10:13, 3] = 0.03
    lesion[11, 11, 3] = 0.04
    ensemble = fake_ensemble("mean", lesion)
    ensemble.postprocessing, ensemble.identity = RESCUE, "A"
    predict_dicom(ensemble, folder, tmp_path / "out", dicom_seg=True)
    segment = hd.seg.segread(str(tmp_path / "out" / "case0.seg.dcm")).get_segment_description(1)
    assert segment.segment_label == "hemorrhage (rescued)"
    assert segment.SegmentDescription.startswith("rescued: the ensemble found no voxel above 0.5")
    assert "peak probability 0.040" in segment.SegmentDescription
    found = lesion.copy()
    found[10:13, 10:13, 3] = 0.9  # another ensemble that finds the bleed: mask and SEG are made again
    ensemble = fake_ensemble("mean", found)
    ensemble.postprocessing, ensemble.identity = RESCUE, "B"
    predict_dicom(ensemble, folder, tmp_path / "out", dicom_seg=True)
    segment = hd.seg.segread(str(tmp_path / "out" / "case0.seg.dcm")).get_segment_description(1)
    assert segment.segment_label == "hemorrhage" and "SegmentDescription" not in segment
