"""SlicePredictor: batching, channels_last, reduced precision chosen by hardware, flip TTA."""

import numpy as np
import pytest
import torch
from bundle_config import load_config
from inputs import channel_plan
from predictor import SlicePredictor, autocast_dtype
from trainer import Trainer, volume_dice
from volumes import Volume

import predictor as predictor_module
from tests.conftest import FAST_TRAINING

WINDOWS = [(0.0, 100.0)]
PLAN = channel_plan("slices", 1, 3)


def volume(size=40, depth=5) -> Volume:
    rng = np.random.default_rng(0)
    return Volume("v", rng.integers(-50, 150, (size, size, depth)).astype(np.int16), None, np.eye(4))


class Ramp(torch.nn.Module):
    """Logits that depend on the position across the width: not mirror-symmetric."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[-1], device=x.device)
        return self.conv(x) + torch.stack([ramp * 0, ramp])[None, :, None, :]


@pytest.mark.parametrize("device, amp, cpu_bf16, native, expected", [
    ("cuda", True, False, False, torch.float16),
    ("cuda", False, True, True, None),
    ("cpu", True, True, True, torch.bfloat16),
    ("cpu", True, True, False, None),  # emulated bf16 is slower than fp32
    ("cpu", True, False, True, None),
])
def test_precision_follows_the_hardware(monkeypatch, device, amp, cpu_bf16, native, expected):
    monkeypatch.setattr(predictor_module, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype(torch.device(device), amp, cpu_bf16) == expected


def test_batching_and_channels_last_do_not_change_the_result():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    reference = SlicePredictor(model, PLAN, WINDOWS, 8, 1, torch.device("cpu"), cpu_bf16=False)
    one = reference.predict_slices_last(volume())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    batched = SlicePredictor(model, PLAN, WINDOWS, 8, 4, torch.device("cpu"), cpu_bf16=False)
    np.testing.assert_allclose(batched.predict_slices_last(volume()), one, atol=1e-5)
    assert one.shape == (2, 40, 40, 5)  # padded to 40 -> 40 (divisor 8), cropped back


def test_flip_tta_averages_the_mirrored_predictions():
    torch.manual_seed(0)
    model = Ramp()
    plain = SlicePredictor(model, PLAN, WINDOWS, 8, 2, torch.device("cpu"), cpu_bf16=False)
    tta = SlicePredictor(model, PLAN, WINDOWS, 8, 2, torch.device("cpu"), cpu_bf16=False, tta=True)
    v = volume()
    mirrored = Volume("m", v.image[::-1, ::-1].copy(), None, np.eye(4))
    expected = (plain.predict_slices_last(v) + plain.predict_slices_last(mirrored)[:, ::-1, ::-1]) / 2
    x_only = Volume("x", v.image[:, ::-1].copy(), None, np.eye(4))
    y_only = Volume("y", v.image[::-1].copy(), None, np.eye(4))
    expected = (2 * expected + plain.predict_slices_last(x_only)[:, :, ::-1]
                + plain.predict_slices_last(y_only)[:, ::-1]) / 4
    result = tta.predict_slices_last(v)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    np.testing.assert_allclose(result.sum(0), 1.0, atol=1e-5)
    assert not np.allclose(result, plain.predict_slices_last(v), atol=1e-3)


def test_bf16_dice_is_within_a_thousandth_of_fp32(bundle):
    """On a trained model, bf16 inference changes the mean validation Dice by at most 0.001.

    bf16 is forced so this holds on any CPU; on one without native bf16 it is only slower.
    Per case the bound is looser: these 64^2 lesions have ~100 voxels, so one flipped voxel
    moves a case's Dice by ~0.005.
    """
    settings = {**FAST_TRAINING, "num_epochs": 15, "num_epochs_per_validation": 15}
    trainer = Trainer(load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **settings))
    trainer.fit()
    predictor = SlicePredictor(trainer.model, trainer.plan, trainer.windows, 8, 16, torch.device("cpu"),
                               cpu_bf16=False)
    fp32 = [volume_dice(predictor.predict_slices_last(v), v.label) for v in trainer.val_volumes]
    predictor.dtype = torch.bfloat16
    assert predictor.precision == "bfloat16"
    bf16 = [volume_dice(predictor.predict_slices_last(v), v.label) for v in trainer.val_volumes]
    assert min(fp32) > 0.3  # a model that finds the lesions, so the comparison means something
    assert abs(np.mean(bf16) - np.mean(fp32)) <= 1e-3
    np.testing.assert_allclose(bf16, fp32, atol=5e-3)
