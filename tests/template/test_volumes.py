import nibabel as nib
import numpy as np
import pytest
from volumes import VolumeError, check_label_classes, from_ras, load_volume

from autoseg2d.synthetic.head_ct import make_head_ct


def non_canonical_affine() -> np.ndarray:
    """Axial axis stored first and flipped, in-plane axes swapped, slight obliquity."""
    angle = np.deg2rad(5)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    columns = np.zeros((3, 3))
    columns[:, 0] = [0, 0, -5.0]  # array axis 0: head-foot, flipped
    columns[:, 1] = [0.45, 0, 0]
    columns[:, 2] = [0, -0.45, 0]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ columns
    affine[:3, 3] = [10, -20, 30]
    return affine


def test_orientation_round_trip(tmp_path):
    case = make_head_ct(size=32, num_slices=6)  # written LPS-like: x runs right-to-left
    image = np.moveaxis(case.image_hu, 2, 0)[::-1]  # store slices first, head to foot, as the affine says
    label = np.moveaxis(case.label, 2, 0)[::-1]
    nib.save(nib.Nifti1Image(image, non_canonical_affine()), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, non_canonical_affine()), tmp_path / "lab.nii.gz")

    volume = load_volume(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    # RAS order: array axis 1 (+R) first, axis 2 (+P) flipped to +A, axis 0 (head to foot) flipped and last
    np.testing.assert_array_equal(volume.label, case.label[:, ::-1, :])
    np.testing.assert_array_equal(volume.image, case.image_hu[:, ::-1, :])
    channel_first = np.stack([volume.label, 1 - volume.label])  # like (C, R, A, S) probabilities
    np.testing.assert_array_equal(from_ras(channel_first, volume.affine)[0], label)
    np.testing.assert_array_equal(from_ras(volume.image[None], volume.affine)[0], image)


def test_slice_order_is_foot_to_head_for_any_storage(tmp_path):
    depth_ids = np.broadcast_to(np.arange(5, dtype=np.int16), (4, 4, 5))
    up = np.diag([0.45, 0.45, 5.0, 1])
    down = up @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 4], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(depth_ids, up), tmp_path / "up.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(depth_ids[..., ::-1]), down), tmp_path / "down.nii.gz")
    up_volume, down_volume = load_volume(tmp_path / "up.nii.gz"), load_volume(tmp_path / "down.nii.gz")
    np.testing.assert_array_equal(up_volume.image, down_volume.image)


def save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([0.45, 0.45, 5, 1]) if affine is None else affine), path)
    return path


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (np.zeros((8, 8, 3), np.uint8), "label shape"),
        (np.full((8, 8, 4), 0.5, np.float32), "not class indices"),
        (np.full((8, 8, 4), -1, np.int16), "not class indices"),
    ],
)
def test_bad_labels_name_the_case(tmp_path, label, message):
    image = save(tmp_path / "case7.nii.gz", np.zeros((8, 8, 4), np.int16))
    with pytest.raises(VolumeError, match=f"case7.*{message}|{message}.*case7"):
        load_volume(image, save(tmp_path / "lab.nii.gz", label))


def test_label_on_another_grid_is_rejected(tmp_path):
    image = save(tmp_path / "case1.nii.gz", np.zeros((8, 8, 4), np.int16))
    label = save(tmp_path / "lab.nii.gz", np.zeros((8, 8, 4), np.uint8), np.diag([0.5, 0.45, 5, 1]))
    with pytest.raises(VolumeError, match="case1: label affine"):
        load_volume(image, label)


def test_255_masks_exceed_the_classes(tmp_path):
    image = save(tmp_path / "case2.nii.gz", np.zeros((8, 8, 4), np.int16))
    volume = load_volume(image, save(tmp_path / "lab.nii.gz", np.full((8, 8, 4), 255, np.uint8)))
    with pytest.raises(VolumeError, match="case2.*0/255"):
        check_label_classes(volume, num_classes=2)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((8, 8, 4), np.nan, np.float32), "NaN"),
        (np.zeros((8, 8), np.int16), "single-channel 3D"),
        (np.zeros((8, 8, 4, 3), np.int16), "single-channel 3D"),
    ],
)
def test_bad_images_name_the_case(tmp_path, array, message):
    with pytest.raises(VolumeError, match=f"case3.*{message}"):
        load_volume(save(tmp_path / "case3.nii.gz", array))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(VolumeError, match="case4: file not found"):
        load_volume(tmp_path / "case4.nii.gz")
    (tmp_path / "case5.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match="case5: cannot read"):
        load_volume(tmp_path / "case5.nii.gz")


def test_mri_is_z_scored(tmp_path):
    data = np.random.default_rng(0).normal(300, 40, (8, 8, 4)).astype(np.float32)
    volume = load_volume(save(tmp_path / "mr.nii.gz", data), modality="mri")
    assert abs(volume.image.mean()) < 1e-4 and abs(volume.image.std() - 1) < 1e-3
