import math

import numpy as np
import pytest
import torch
import yaml
from inputs import channel_plan, make_channels
from monai.data import DataLoader
from slice_dataset import (Augmentation, SliceDataset, SliceSampler, affine_margin, affine_transform, crop_start,
                           foreground_pixels, intensity_transforms)
from volumes import Volume

from tests.conftest import TEMPLATE

WINDOW = [(0.0, 100.0)]
THREE_WINDOWS = [(0.0, 100.0), (-20.0, 180.0), (-1000.0, 2000.0)]


def config(**changes) -> dict:
    values = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())
    values.update(changes)
    return values


def no_augmentation(**changes):
    return config(augment_flip_prob=0.0, augment_affine_prob=0.0, augment_noise_prob=0.0,
                  augment_intensity_prob=0.0, augment_shuffle_prob=0.0, **changes)


def volume(size=96, depth=6, lesion_slices=(2, 3)) -> Volume:
    """Brain-like 30 HU everywhere, a 70 HU lesion (label 1) at rows 10-15, columns 20-27; slice z adds z HU."""
    image = np.full((size, size, depth), 30, np.int16) + np.arange(depth, dtype=np.int16)
    label = np.zeros((size, size, depth), np.uint8)
    for z in lesion_slices:
        label[10:16, 20:28, z] = 1
    image[label > 0] = 70
    return Volume("v", image, label, np.eye(4))


def sampler(volumes, ratio=0.25, seed=0, rank=0, world_size=1) -> SliceSampler:
    return SliceSampler([foreground_pixels(v) for v in volumes], [v.num_slices for v in volumes], ratio, seed,
                        rank, world_size)


def dataset(volumes, plan, windows, cfg) -> SliceDataset:
    return SliceDataset(volumes, [foreground_pixels(v) for v in volumes], plan, windows, cfg["roi_size"],
                        cfg["foreground_crop_ratio"], Augmentation.from_config(cfg))


def test_foreground_pixels_lists_the_labelled_pixels_per_slice():
    pixels = foreground_pixels(volume(lesion_slices=(2, 5)))
    assert sorted(pixels) == [2, 5]
    assert pixels[2].shape == (48, 2)
    assert pixels[2][:, 0].min() == 10 and pixels[2][:, 1].max() == 27


def test_epoch_has_every_foreground_slice_and_a_share_of_background():
    items = list(sampler([volume(), volume(lesion_slices=(5,))], ratio=0.5))
    slices = [(v, z) for v, z, _ in items]
    assert {(0, 2), (0, 3), (1, 5)} <= set(slices)
    assert len(slices) == 3 + 2  # ceil(0.5 * 3) background slices
    assert len(set(slices)) == len(slices)
    assert len({seed for _, _, seed in items}) == len(items)


def test_all_background_data_uses_every_slice():
    assert len(list(sampler([volume(lesion_slices=())]))) == 6


def test_epochs_differ_and_repeat_for_the_same_seed_and_epoch():
    first, again = sampler([volume()], ratio=1.0), sampler([volume()], ratio=1.0)
    first.set_epoch(3)
    again.set_epoch(3)
    assert list(first) == list(again)
    again.set_epoch(4)
    assert list(first) != list(again)


def test_each_rank_makes_the_steps_of_a_single_process_on_its_share_of_world_size_draws():
    volumes = [volume(), volume(lesion_slices=(1, 4))]
    whole = list(sampler(volumes, ratio=0.5))  # 4 foreground + 2 background slices
    shards = [list(sampler(volumes, ratio=0.5, rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in shards] == [len(whole)] * 4 == [len(sampler(volumes, ratio=0.5, world_size=4))] * 4
    draws = [item for d in range(4) for item in sampler(volumes, ratio=0.5, world_size=4).epoch_items(d)]
    assert sorted(item for shard in shards for item in shard) == sorted(draws)
    assert draws[:len(whole)] == whole  # draw 0 is the single-process epoch


def test_crop_start_stays_inside_the_slice_and_centres_small_slices():
    assert crop_start(50, 100, 32) == 34
    assert crop_start(3, 100, 32) == 0
    assert crop_start(99, 100, 32) == 68
    assert crop_start(10, 20, 32) == -6  # smaller than the crop: the slice sits in its middle
    assert crop_start(5, 32, 32) == 0


def test_affine_margin_covers_the_rotated_and_zoomed_crop():
    assert affine_margin(384, 0, 0.0) == 0
    assert affine_margin(384, 30, 0.2) == math.ceil(192 * (1.2 * (math.cos(math.pi / 6) + 0.5) - 1))
    assert affine_margin(100, 90, 0.0) == affine_margin(100, 45, 0.0) == math.ceil(50 * (math.sqrt(2) - 1))


def test_foreground_crops_contain_the_lesion_and_the_right_slices():
    cfg = no_augmentation(roi_size=[32, 32], foreground_crop_ratio=1.0)
    data = dataset([volume()], channel_plan("slices", 1, 3), WINDOW, cfg)
    for seed in range(20):
        sample = data[(0, 2, seed)]
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert sample["label"].shape == (1, 32, 32)
        lesion = sample["label"][0] > 0
        assert lesion.sum() > 0
        np.testing.assert_allclose(sample["image"][1][lesion], 0.7)  # the centre slice at window [0, 100]
        background = ~lesion
        np.testing.assert_allclose(sample["image"][0][background], 0.31)  # slice 1: 30 + 1 HU
        np.testing.assert_allclose(sample["image"][2][background], 0.33)  # slice 3: 30 + 3 HU


def test_edge_slices_are_replicated():
    cfg = no_augmentation(roi_size=[32, 32])
    sample = dataset([volume()], channel_plan("slices", 1, 3), WINDOW, cfg)[(0, 0, 1)]
    background = sample["label"][0] == 0
    np.testing.assert_allclose(sample["image"][0][background], 0.30)  # slice -1 -> slice 0
    np.testing.assert_allclose(sample["image"][2][background], 0.31)


def test_small_slices_are_padded_with_air():
    cfg = no_augmentation(roi_size=[128, 128])
    sample = dataset([volume(size=40)], channel_plan("both", 3, 3), THREE_WINDOWS, cfg)[(0, 2, 0)]
    assert sample["image"].shape == (9, 128, 128)
    assert sample["label"].sum() == 48
    corner = sample["image"][:, 0, 0].numpy()
    np.testing.assert_allclose(corner, [0.0] * 6 + [0.0] * 3)  # -1024 HU is below every window
    centre = sample["image"][:, 64, 64].numpy()
    assert centre[6] == pytest.approx((31 - -1000) / 3000, abs=1e-6)  # wide window, slice 1 (31 HU)


def test_augmentation_keeps_labels_binary_and_rotations_fill_with_air():
    cfg = config(roi_size=[32, 32], augment_affine_prob=1.0, augment_flip_prob=1.0, augment_rotate_deg=45,
                 augment_noise_prob=0.0, augment_intensity_prob=0.0, augment_shuffle_prob=0.0)
    data = dataset([volume(size=32)], channel_plan("slices", 1, 3), [(-100.0, 100.0)], cfg)
    corners = []
    for seed in range(10):
        sample = data[(0, 3, seed)]
        assert set(np.unique(sample["label"].numpy())) <= {0.0, 1.0}
        assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
        corners.append(float(sample["image"][1, 0, 0]))
    # Brain is >= 30 HU (>= 0.65 here); a corner rotated in from outside must be air (0), not 0 HU (0.5).
    assert min(corners) == 0.0


def brain_everywhere(size=128) -> Volume:
    """30 HU brain on the whole slice, a lesion label in the middle of slice 3."""
    image = np.full((size, size, 6), 30, np.int16)
    label = np.zeros((size, size, 6), np.uint8)
    label[size // 2 - 2:size // 2 + 2, size // 2 - 2:size // 2 + 2, 3] = 1
    return Volume("b", image, label, np.eye(4))


def test_rotated_crops_take_their_corners_from_the_scan():
    cfg = config(roi_size=[32, 32], augment_affine_prob=1.0, augment_rotate_deg=45, foreground_crop_ratio=1.0,
                 augment_noise_prob=0.0, augment_intensity_prob=0.0, augment_shuffle_prob=0.0)
    data = dataset([brain_everywhere()], channel_plan("slices", 1, 3), [(-100.0, 100.0)], cfg)
    assert data.margin == (affine_margin(32, 45, cfg["augment_scale_range"]),) * 2
    for seed in range(10):
        sample = data[(0, 3, seed)]
        assert sample["image"].shape == (3, 32, 32)
        assert sample["image"].min() > 0.6  # brain (0.65) everywhere: no air rotated in
        assert sample["label"].sum() > 0


def test_the_context_window_is_centred_on_the_crop():
    """An identity affine on the context window gives exactly the crop taken without context."""
    volume = brain_everywhere()
    volume.image[...] = np.arange(128 * 128).reshape(128, 128, 1) % 200 - 100  # a pattern that shows any shift
    cfg = no_augmentation(roi_size=[32, 32], foreground_crop_ratio=1.0)
    plain = dataset([volume], channel_plan("slices", 1, 3), [(-100.0, 100.0)], cfg)
    framed = dataset([volume], channel_plan("slices", 1, 3), [(-100.0, 100.0)],
                     {**cfg, "augment_affine_prob": 1.0, "augment_rotate_deg": 30.0})
    framed.affine = affine_transform(cfg["roi_size"], rotate_deg=0.0, scale_range=0.0)
    framed.affine.set_random_state(seed=0)
    assert framed.margin[0] > 0
    for seed in range(5):
        a, b = plain[(0, 3, seed)], framed[(0, 3, seed)]
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)
        np.testing.assert_array_equal(a["label"], b["label"])


def test_z_scored_input_is_padded_with_its_own_background():
    image = np.random.default_rng(0).uniform(-1.0, 2.0, size=(20, 20, 6)).astype(np.float32)
    image[:2] = -1.5  # the background after z-scoring
    label = np.zeros((20, 20, 6), np.uint8)
    label[8:12, 8:12, 2] = 1
    cfg = no_augmentation(roi_size=[32, 32])
    sample = dataset([Volume("m", image, label, np.eye(4))], channel_plan("slices", 1, 3), [None], cfg)[(0, 2, 0)]
    assert sample["image"][1, 0, 0] == pytest.approx(-1.5)  # outside the slice
    np.testing.assert_allclose(sample["image"][1, 6:26, 6:26], image[:, :, 2], atol=1e-6)  # centred
    assert sample["label"].sum() == 16


def test_samples_depend_on_their_seed_only():
    cfg = config(roi_size=[48, 48])
    data = dataset([volume()], channel_plan("both", 3, 3), THREE_WINDOWS, cfg)
    first = data[(0, 2, 7)]
    data[(0, 3, 8)]
    again = data[(0, 2, 7)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], data[(0, 2, 9)]["image"])


def test_persistent_workers_give_the_same_batches_as_the_main_process():
    volumes = [volume(), volume(lesion_slices=(1,))]
    cfg = config(roi_size=[32, 32])
    data = dataset(volumes, channel_plan("slices", 1, 3), WINDOW, cfg)
    batches = {}
    for workers in (0, 2):
        epoch_sampler = sampler(volumes, ratio=1.0)
        loader = DataLoader(data, batch_size=2, sampler=epoch_sampler, num_workers=workers,
                            persistent_workers=workers > 0)
        batches[workers] = []
        for epoch in (0, 1):
            epoch_sampler.set_epoch(epoch)
            batches[workers] += [batch["image"] for batch in loader]
    assert len(batches[0]) == len(batches[2]) == 2 * 3
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


def test_automatic_worker_count_leaves_a_core_per_process(monkeypatch):
    from slice_dataset import resolve_num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr("slice_dataset.cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers(3) == 3 and resolve_num_workers(0) == 0
    assert resolve_num_workers(-1) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_num_workers(-1) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_num_workers(-1) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr("slice_dataset.cgroup_cpu_limit", lambda: 4)  # docker --cpus=4 on a 16-core host
    assert resolve_num_workers(-1) == 0  # 4 cores / 4 local processes


def test_container_cpu_quota_is_read_from_cgroup(tmp_path):
    from slice_dataset import cgroup_cpu_limit

    (tmp_path / "limited").write_text("250000 100000\n")
    (tmp_path / "unlimited").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "limited")) == 3
    assert cgroup_cpu_limit(str(tmp_path / "unlimited")) is None
    assert cgroup_cpu_limit(str(tmp_path / "absent")) is None


def test_the_budget_in_steps_is_the_same_for_1_and_8_processes():
    from schedule import training_budget

    volumes = [volume(), volume(lesion_slices=(1, 4))]
    single, eight = sampler(volumes, ratio=0.5), sampler(volumes, ratio=0.5, rank=7, world_size=8)
    assert len(single) == len(eight) == len(list(eight))
    budgets = [training_budget(num_epochs=40, num_steps=0, steps_per_epoch=-(-len(s) // 2), num_warmup_epochs=2,
                               batch_size=2, world_size=w) for s, w in ((single, 1), (eight, 8))]
    assert budgets[0].total_steps == budgets[1].total_steps == 40 * 3
    assert budgets[0].warmup_steps == budgets[1].warmup_steps == 6
    assert budgets[1].samples_per_step == 8 * budgets[0].samples_per_step  # more processes: more samples per step
    by_steps = training_budget(num_epochs=40, num_steps=100, steps_per_epoch=3, num_warmup_epochs=0,
                               batch_size=2, world_size=1)
    assert (by_steps.total_steps, by_steps.num_epochs) == (100, 34)


def test_the_learning_rate_warms_up_linearly_then_falls_to_zero_on_a_cosine():
    from schedule import warmup_cosine

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler, rates = warmup_cosine(optimizer, total_steps=10, warmup_steps=4), []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4:] == sorted(rates[4:], reverse=True) and rates[-1] < 0.1
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("variant, num_adjacent_slices", [("slices", 3), ("windows", 3), ("both", 3), ("slices", 5)])
@pytest.mark.parametrize("z", [0, 1, 3, 5])
def test_training_builds_the_channels_inference_builds(variant, num_adjacent_slices, z):
    """Same volume, slice and plan: the un-augmented training sample holds exactly inference's input,
    edge slices included (slice 0 and the last repeat themselves for the missing neighbours)."""
    rng = np.random.default_rng(z)
    image = rng.integers(-1024, 2000, (32, 40, 6)).astype(np.int16)
    ct = Volume("p", image, np.zeros(image.shape, np.uint8), np.eye(4))
    plan = channel_plan(variant, len(THREE_WINDOWS), num_adjacent_slices)
    sample = dataset([ct], plan, THREE_WINDOWS, no_augmentation(roi_size=[32, 40]))[(0, z, 0)]
    np.testing.assert_array_equal(sample["image"].numpy(), make_channels(image, z, plan, THREE_WINDOWS))


def test_intensity_augmentation_reads_its_strengths_from_the_config():
    augmentation = Augmentation.from_config(config(augment_noise_max_std=0.3, augment_intensity_scale=0.25,
                                                   augment_intensity_shift=0.2, augment_shuffle_holes=7))
    noise, scale, shift, shuffle, _ = intensity_transforms(augmentation, (64, 48)).transforms
    assert noise.max_std == 0.3
    assert tuple(scale.scaler.factors) == (-0.25, 0.25) and tuple(shift.shifter.offsets) == (-0.2, 0.2)
    assert (shuffle.shuffle.holes, shuffle.shuffle.spatial_size) == (7, 3)  # 48 px // 16


def test_augmentation_defaults_live_in_the_yaml_and_a_missing_key_is_named():
    defaults = Augmentation.from_config(config())
    assert (defaults.noise_max_std, defaults.intensity_scale, defaults.intensity_shift, defaults.shuffle_holes) \
        == (0.05, 0.1, 0.1, 4)
    incomplete = config()
    del incomplete["augment_shuffle_holes"]
    with pytest.raises(KeyError, match="config has no augment_shuffle_holes; restore"):
        Augmentation.from_config(incomplete)
