"""Distillation: the teacher's soft targets are read in the image's geometry, cropped and augmented with the
label, and trained on by a loss that is stable for saturated logits."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from bundle_config import load_config
from cache import cached_distill_target, cached_volume
from inputs import channel_plan
from network import DistillationLoss, build_loss, soft_target_loss
from slice_dataset import Augmentation, SliceDataset, crop_slices, foreground_pixels
from trainer import Trainer
from volumes import DISTILL_TARGET_LEVELS, Volume, VolumeError, case_name

from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.conftest import FAST_TRAINING, TEMPLATE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_loss(logits: torch.Tensor, teacher: torch.Tensor, smooth: float = 1e-5) -> float:
    """The soft-target loss written out directly in float64: f = 1 - softmax(z)[background]."""
    f = 1 - torch.softmax(logits.double(), dim=1)[:, 0]
    t = teacher.double()
    cross_entropy = -(t * torch.log(f) + (1 - t) * torch.log(1 - f)).mean()
    dice = 1 - (2 * (f * t).sum() + smooth) / (f.sum() + t.sum() + smooth)
    return float(cross_entropy + dice)


def saturated_logits(teacher: torch.Tensor, num_classes: int, margin: float) -> torch.Tensor:
    """Logits whose foreground probability is 1 where teacher is 1 and 0 where it is 0 (class 1 for foreground)."""
    logits = torch.full((teacher.shape[0], num_classes, *teacher.shape[1:]), -margin)
    logits[:, 0] = torch.where(teacher > 0.5, -margin, margin)
    logits[:, 1] = torch.where(teacher > 0.5, margin, -margin)
    return logits


@pytest.mark.parametrize("num_classes", [2, 4])
def test_the_soft_loss_is_zero_for_a_student_equal_to_a_certain_teacher_and_large_when_wrong(num_classes):
    teacher = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    right = soft_target_loss(saturated_logits(teacher, num_classes, 30.0), teacher)
    wrong = soft_target_loss(saturated_logits(1 - teacher, num_classes, 30.0), teacher)
    assert 0 <= float(right) < 1e-4 and float(wrong) > 10
    empty = torch.zeros(2, 16, 16)  # nothing in the teacher, nothing predicted: no cost (smoothed Dice)
    assert float(soft_target_loss(saturated_logits(empty, num_classes, 30.0), empty)) < 1e-4


@pytest.mark.parametrize("num_classes", [2, 4])
def test_the_soft_loss_matches_a_float64_reference_on_random_logits(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    logits = 3 * torch.randn(3, num_classes, 8, 8, generator=generator)
    teacher = torch.rand(3, 1, 8, 8, generator=generator)
    assert float(soft_target_loss(logits, teacher)) == pytest.approx(reference_loss(logits, teacher[:, 0]), rel=1e-5)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_saturated_logits_give_finite_losses_and_gradients(num_classes):
    teacher = torch.tensor([[[0.0, 1.0], [0.5, 0.2]]])
    for margin in (1e2, 1e4):
        for logits in (saturated_logits(teacher, num_classes, margin), saturated_logits(1 - teacher, num_classes,
                                                                                        margin)):
            logits.requires_grad_(True)
            loss = soft_target_loss(logits, teacher)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_the_distillation_loss_adds_the_weighted_soft_term_to_the_label_loss():
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)]
    hard = torch.randint(0, 3, (2, 1, 16, 16), generator=generator).float()
    teacher = torch.rand(2, 1, 16, 16, generator=generator)
    label_loss = build_loss(dsdepth=2)
    loss = build_loss(dsdepth=2, distill_weight=0.5)
    assert isinstance(loss, DistillationLoss) and not isinstance(label_loss, DistillationLoss)
    expected = label_loss(outputs, hard) + 0.5 * soft_target_loss(outputs[0], teacher)
    torch.testing.assert_close(loss(outputs, torch.cat([hard, teacher], 1)), expected)
    torch.testing.assert_close(loss(outputs[0], torch.cat([hard, teacher], 1)),  # eval mode: one output
                               label_loss(outputs[0], hard) + 0.5 * soft_target_loss(outputs[0], teacher))


def augmented(**changes) -> Augmentation:
    config = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())
    return Augmentation.from_config({**config, "augment_flip_prob": 0.5, "augment_affine_prob": 0.5,
                                     "augment_rotate_deg": 30, **changes})


def lesion_volume(soft_target: np.ndarray | None) -> Volume:
    image = np.full((48, 40, 6), 30, np.int16)
    image[0] = -1000
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 5:30, 2:4] = 1
    label[30:34, 30:36, 3] = 1
    return Volume("v", image, label, np.eye(4), soft_target=None if soft_target is None else soft_target(label))


def test_the_crop_carries_the_soft_target_with_the_label_through_flips_and_rotation():
    volume = lesion_volume(lambda label: label * np.uint8(DISTILL_TARGET_LEVELS))  # probability 1 on the label
    data = SliceDataset([volume], [foreground_pixels(volume)], channel_plan("slices", 1, 3), [(0.0, 100.0)],
                        [32, 32], 0.9, augmented())
    with_lesion = 0
    for seed in range(12):
        label = data[(0, 3, seed)]["label"]
        assert label.shape == (2, 32, 32)
        np.testing.assert_array_equal(label[1].numpy(), label[0].numpy())
        with_lesion += int(label[0].sum() > 0)
    assert with_lesion > 6


def test_without_soft_targets_the_label_has_one_channel():
    volume = lesion_volume(None)
    data = SliceDataset([volume], [foreground_pixels(volume)], channel_plan("slices", 1, 3), [(0.0, 100.0)],
                        [32, 32], 0.9, augmented())
    assert data[(0, 3, 0)]["label"].shape == (1, 32, 32)


def test_a_crop_past_the_slice_has_no_teacher_probability_there():
    stack = np.zeros((3, 8, 8), np.float32)
    label = np.ones((3, 8, 8), np.uint8)
    levels = np.full((3, 8, 8), 51, np.uint8)  # probability 0.2
    _, mask = crop_slices(stack, label, [0, 1, 2], 1, (-2, -2), (12, 12), fill=0.0, soft_target=levels)
    assert mask.shape == (2, 12, 12)
    assert np.all(mask[1, 2:10, 2:10] == np.float32(0.2)) and mask[1].sum() == pytest.approx(64 * 0.2)
    np.testing.assert_array_equal(mask[1] > 0, mask[0] > 0)


def permuted_case(root: Path) -> tuple[Path, Path, np.ndarray]:
    """A CT whose file axes are (A, R, S) with R flipped and 28 x 32 slices; returns image, label and the label
    array in file order."""
    case = make_head_ct(size=32, num_slices=4, num_lesions=2, seed=3)
    image, label = case.image_hu[:28].transpose(1, 0, 2), case.label[:28].transpose(1, 0, 2)
    affine = case.affine[:, [1, 0, 2, 3]]
    image_path, label_path = root / "img" / "p0.nii.gz", root / "lab" / "p0.nii.gz"
    for path, data in ((image_path, image), (label_path, label)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), path)
    return image_path, label_path, label


def save_target(folder: Path, case: str, levels: np.ndarray, key: str = "foreground") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{case}.npz", **{key: levels})
    return folder / f"{case}.npz"


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_target_in_the_image_files_order_is_turned_like_the_label(tmp_path, in_memory):
    image_path, label_path, label = permuted_case(tmp_path)
    assert label.any()
    save_target(tmp_path / "targets", case_name(image_path), label * np.uint8(DISTILL_TARGET_LEVELS))
    cache_dir = None if in_memory else tmp_path / "cache"
    volume = cached_volume(image_path, label_path, "ct", cache_dir)
    for _ in range(2):  # the second read comes from the cache folder's entry
        levels = cached_distill_target(tmp_path / "targets", volume, cache_dir)
        assert levels.shape == volume.label.shape == (28, 32, 4)  # RAS; the file's is (32, 28, 4)
        np.testing.assert_array_equal(levels, volume.label * DISTILL_TARGET_LEVELS)
    assert in_memory or len(list((tmp_path / "cache").glob("p0-*.distill.npy"))) == 1


@pytest.mark.parametrize("write, message", [
    (lambda folder, label: None, r"case p0: no distillation target .*targets/p0.npz; write it with np.savez_comp"),
    (lambda folder, label: save_target(folder, "p0", label.transpose(1, 0, 2)),
     r"holds a uint8 array of shape \(28, 32, 4\), not uint8 of the label's shape \(32, 28, 4\)"),
    (lambda folder, label: save_target(folder, "p0", label.astype(np.float32)), "holds a float32 array"),
    (lambda folder, label: save_target(folder, "p0", label, key="probabilities"),
     r"holds \['probabilities'\], not 'foreground'"),
    (lambda folder, label: (folder.mkdir(), (folder / "p0.npz").write_text("not a zip")), "cannot read"),
])
def test_a_target_that_cannot_be_used_names_the_case_the_file_and_the_fix(tmp_path, write, message):
    image_path, label_path, label = permuted_case(tmp_path)
    write(tmp_path / "targets", label)
    volume = cached_volume(image_path, label_path, "ct")
    with pytest.raises(VolumeError, match=message) as raised:
        cached_distill_target(tmp_path / "targets", volume)
    assert "or set distill_targets to null" in str(raised.value)


def small_datalist(root: Path) -> Path:
    training = []
    for i in range(4):
        write_case(make_head_ct(size=32, num_slices=6, num_lesions=1, seed=i), root / f"img/c{i}.nii.gz",
                   root / f"lab/c{i}.nii.gz")
        training.append({"image": f"img/c{i}.nii.gz", "label": f"lab/c{i}.nii.gz", "fold": i % 2})
    (root / "datalist.json").write_text(json.dumps({"training": training}))
    return root / "datalist.json"


def write_teacher(root: Path, cases: list[int]) -> Path:
    """Soft targets for the cases: a blurred copy of each label (probability about 0.8 inside, 0.1 around)."""
    for i in cases:
        label = nib.load(root / f"lab/c{i}.nii.gz").get_fdata().astype(np.uint8)
        levels = np.where(label > 0, 204, 0).astype(np.uint8)
        levels[np.roll(label, 1, axis=0) > 0] = np.maximum(levels[np.roll(label, 1, axis=0) > 0], 25)
        save_target(root / "teacher", f"c{i}", levels)
    return root / "teacher"


def trainer(bundle: Path, root: Path, **changes) -> Trainer:
    settings = {**FAST_TRAINING, "roi_size": [32, 32], "data_list_file_path": str(root / "datalist.json"),
                "data_file_base_dir": str(root), **changes}
    return Trainer(load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **settings))


def test_a_student_trains_on_every_case_with_soft_targets(bundle, tmp_path):
    small_datalist(tmp_path)
    write_teacher(tmp_path, cases=[0, 1, 2, 3])
    student = trainer(bundle, tmp_path, fold=-1, num_epochs=2, distill_targets="teacher", distill_weight=0.5)
    assert isinstance(student.loss_fn, DistillationLoss) and student.loss_fn.weight == 0.5
    batch = next(iter(student.loader))
    assert batch["label"].shape[1] == 2 and 0 < batch["label"][:, 1].max() <= 0.8 + 1e-6
    assert np.isnan(student.fit())
    assert (bundle / "model" / "model.pt").exists()
    log = (bundle / "model" / "training.log").read_text()
    assert f"4 training volumes (24 slices, soft targets from {tmp_path / 'teacher'})" in log
    losses = [float(row.split(",")[1]) for row in (bundle / "model" / "training_log.csv").read_text().split()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_validation_cases_need_no_target_and_a_missing_training_target_is_listed(bundle, tmp_path):
    small_datalist(tmp_path)
    teacher = write_teacher(tmp_path, cases=[1, 3])  # fold 0 validates: cases 0 and 2
    assert isinstance(trainer(bundle, tmp_path, fold=0, distill_targets=str(teacher)).loss_fn, DistillationLoss)
    (teacher / "c3.npz").unlink()
    with pytest.raises(VolumeError, match=r"1 of 2 training cases cannot be used(.|\n)*case c3: no distillation "
                                          r"target .*teacher/c3.npz"):
        trainer(bundle, tmp_path, fold=0, distill_targets=str(teacher))
    with pytest.raises(VolumeError, match="distill_targets: .*/nowhere is not a folder"):
        trainer(bundle, tmp_path, fold=0, distill_targets="nowhere")
    with pytest.raises(ValueError, match="distill_weight is -1.0; give a number >= 0"):
        trainer(bundle, tmp_path, fold=0, distill_targets=str(teacher), distill_weight=-1.0)
