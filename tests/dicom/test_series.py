"""A DICOM CT series read into HU and RAS geometry, and each bad folder refused with a message naming it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from autoseg2d.dicom.series import DicomError, read_series, series_folders
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.dicom.series_writer import write_series


def assert_same_scan(ours: nib.Nifti1Image, theirs: nib.Nifti1Image) -> None:
    """The same voxels at the same places: equal arrays and affines once both are in RAS axis order."""
    ours, theirs = nib.as_closest_canonical(ours), nib.as_closest_canonical(theirs)
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-5)


@pytest.fixture
def nifti(tmp_path):
    path = tmp_path / "nifti" / "head.nii.gz"
    write_case(make_head_ct(size=24, num_slices=6, seed=3), path, None)
    return path


def test_series_reads_back_as_the_nifti_it_was_made_from(nifti, tmp_path):
    write_series(nifti, tmp_path / "head")
    series = read_series(tmp_path / "head")
    assert_same_scan(nib.Nifti1Image(series.image_hu, series.affine), nib.load(str(nifti)))
    assert series.image_hu.dtype == np.int16 and series.name == "head"
    # sorted along the slice normal (row x column cosines), here head to foot: by position, not by file name
    assert [int(p.name.split("_")[1]) for p in series.files] == list(range(6))[::-1]


def test_slope_and_intercept_give_hounsfield_units(nifti, tmp_path):
    write_series(nifti, tmp_path / "scaled", slope=0.5, intercept=-2048)
    series = read_series(tmp_path / "scaled")
    assert_same_scan(nib.Nifti1Image(series.image_hu, series.affine), nib.load(str(nifti)))


def test_a_folder_of_series_folders_is_one_case_per_folder(nifti, tmp_path):
    write_series(nifti, tmp_path / "all" / "b")
    write_series(nifti, tmp_path / "all" / "a")
    assert [p.name for p in series_folders(tmp_path / "all")] == ["a", "b"]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("no images here")
    with pytest.raises(DicomError, match=r"no DICOM files in .*none or its subfolders"):
        series_folders(tmp_path / "none")


def test_unreadable_file_is_named(nifti, tmp_path):
    files = write_series(nifti, tmp_path / "s")
    (tmp_path / "s" / "junk").write_bytes(b"not a slice")
    with pytest.raises(DicomError, match=r"cannot read .*junk as DICOM.*remove the file"):
        read_series(tmp_path / "s")
    (tmp_path / "s" / "junk").unlink()
    files[2].write_bytes(files[2].read_bytes()[:-500])  # a slice cut short in transfer
    with pytest.raises(DicomError, match=rf"{files[2].name}"):
        read_series(tmp_path / "s")


@pytest.mark.parametrize("fault, message", [
    ({"modality": "MR"}, r"modality 'MR', not CT"),
    ({"skip_slices": (3,)}, r"uneven slice spacing in .*s: 5.00 mm mostly, 10.00 mm between .*slices are missing"),
    ({"tilt_mm_per_slice": 1.0}, r"gantry tilt \(11.3 degrees"),
])
def test_bad_series_are_refused(nifti, tmp_path, fault, message):
    write_series(nifti, tmp_path / "s", **fault)
    with pytest.raises(DicomError, match=message):
        read_series(tmp_path / "s")


def test_two_series_and_localizers_are_refused(nifti, tmp_path):
    write_series(nifti, tmp_path / "two")
    write_series(nifti, tmp_path / "two", series_uid="1.2.3.4", prefix="OTHER")
    with pytest.raises(DicomError, match=r"mixes 2 series .*put each series in its own folder"):
        read_series(tmp_path / "two")
    write_series(nifti, tmp_path / "scout")
    scout = write_series(nifti, tmp_path / "scout", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), prefix="SCOUT")
    for extra in scout[1:]:
        extra.unlink()
    with pytest.raises(DicomError, match=rf"1 localizer \(scout\) image\(s\), e.g. .*{scout[0].name}"):
        read_series(tmp_path / "scout")


def test_non_hounsfield_data_is_refused(tmp_path):
    case = make_head_ct(size=24, num_slices=4, seed=1)
    eight_bit = np.clip((case.image_hu + 1000) / 10, 0, 255).astype(np.int16)
    nib.save(nib.Nifti1Image(eight_bit, case.affine), str(tmp_path / "8bit.nii.gz"))
    write_series(tmp_path / "8bit.nii.gz", tmp_path / "s", intercept=0)
    with pytest.raises(DicomError, match=r"span 0\.\.\d+ .*not Hounsfield units"):
        read_series(tmp_path / "s")
