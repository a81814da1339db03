import numpy as np
import pytest
import yaml
from inputs import channel_plan
from slice_dataset import SliceDataset, epoch_slices, training_transforms
from volumes import Volume

from tests.conftest import TEMPLATE


def config(**changes) -> dict:
    values = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())
    values.update(changes)
    return values


def volume(size=96, depth=6, lesion_slices=(2, 3)) -> Volume:
    image = np.full((size, size, depth), 30, np.int16)
    label = np.zeros((size, size, depth), np.uint8)
    for z in lesion_slices:
        label[10:16, 20:28, z] = 1
    image[label > 0] = 70
    return Volume("v", image, label, np.eye(4))


def test_epoch_has_every_foreground_slice_and_a_share_of_background():
    items = epoch_slices([volume(), volume(lesion_slices=(5,))], 0.5, np.random.default_rng(0))
    foreground = {(0, 2), (0, 3), (1, 5)}
    assert foreground <= set(items)
    assert len(items) == 3 + 2  # ceil(0.5 * 3) background slices
    assert len(set(items)) == len(items)


def test_all_background_data_uses_every_slice():
    assert len(epoch_slices([volume(lesion_slices=())], 0.25, np.random.default_rng(0))) == 6


def no_augmentation(**changes):
    return config(augment_flip_prob=0.0, augment_affine_prob=0.0, augment_noise_prob=0.0,
                  augment_intensity_prob=0.0, augment_shuffle_prob=0.0, **changes)


def test_foreground_crops_contain_the_lesion():
    cfg = no_augmentation(roi_size=[32, 32], foreground_crop_ratio=1.0)
    transform = training_transforms(cfg)
    transform.set_random_state(seed=0)
    windows = [(0.0, 100.0)]
    dataset = SliceDataset([volume()], [(0, 2)] * 20, channel_plan("slices", 1, 3), windows, transform)
    for sample in dataset:
        assert sample["image"].shape == (3, 32, 32)
        assert sample["label"].shape == (1, 32, 32)
        assert sample["label"].sum() > 0
        lesion = sample["label"][0] > 0
        np.testing.assert_allclose(sample["image"][1][lesion], 0.7)  # the centre slice at window [0, 100]


def test_small_slices_are_padded_to_the_crop():
    cfg = no_augmentation(roi_size=[128, 128])
    dataset = SliceDataset([volume(size=40)], [(0, 2)], channel_plan("both", 3, 3),
                           [(0.0, 100.0), (-20.0, 180.0), (-1000.0, 2000.0)], training_transforms(cfg))
    sample = dataset[0]
    assert sample["image"].shape == (9, 128, 128)
    assert sample["label"].sum() == 48


@pytest.mark.parametrize("seed", [0, 1])
def test_augmentation_keeps_labels_binary(seed):
    cfg = config(roi_size=[32, 32], augment_affine_prob=1.0, augment_flip_prob=1.0)
    transform = training_transforms(cfg)
    transform.set_random_state(seed=seed)
    sample = SliceDataset([volume()], [(0, 3)], channel_plan("slices", 1, 3), [(0.0, 100.0)], transform)[0]
    assert set(np.unique(sample["label"].numpy())) <= {0.0, 1.0}
