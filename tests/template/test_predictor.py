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
from tests.conftest import FAST_TRAINING, native_bf16_only

WINDOWS = [(0.0, 100.0)]
PLAN = channel_plan("slices", 1, 3)
FP32 = {"amp": False}  # float32 on any machine: results comparable to atol 1e-5
FP32_NO_TTA = {**FP32, "tta": False}


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


@pytest.mark.parametrize("device, amp, native, expected", [
    ("cuda", True, False, torch.float16),
    ("cuda", False, True, None),
    ("cpu", True, True, torch.bfloat16),
    ("cpu", True, False, None),  # emulated bf16 is slower than fp32
    ("cpu", False, True, None),
])
def test_amp_is_the_precision_the_device_has_natively(monkeypatch, device, amp, native, expected):
    monkeypatch.setattr(predictor_module, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype(torch.device(device), amp) == expected


@pytest.mark.parametrize("cap, amx, avx512_bf16", [
    ("AVX512_CORE_VNNI", False, False),  # a Cascade Lake's units: no native bf16
    ("avx2", False, False),
    ("AVX512_CORE_BF16", False, True),
    ("AVX512_CORE_AMX", True, True),
    ("DEFAULT", True, True),
    ("", True, True),
])
def test_a_onednn_isa_cap_hides_the_units_it_excludes(monkeypatch, cap, amx, avx512_bf16):
    """On a CPU with both units, ONEDNN_MAX_CPU_ISA below them makes bf16 emulated: fp32 is picked."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert predictor_module.cpu_bf16_units() == {"amx": amx, "avx512_bf16": avx512_bf16}
    assert predictor_module.cpu_has_native_bf16() == (amx or avx512_bf16)


@pytest.mark.cpu_isa  # oneDNN picks other kernels per instruction set: equal within atol on each
def test_batching_and_channels_last_do_not_change_the_result():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    reference = SlicePredictor(model, PLAN, WINDOWS, 8, 1, torch.device("cpu"), **FP32_NO_TTA)
    one = reference.predict_slices_last(volume())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    batched = SlicePredictor(model, PLAN, WINDOWS, 8, 4, torch.device("cpu"), **FP32_NO_TTA)
    np.testing.assert_allclose(batched.predict_slices_last(volume()), one, atol=1e-5)
    assert one.shape == (2, 40, 40, 5)  # padded to 40 -> 40 (divisor 8), cropped back


class CallSizes(torch.nn.Module):
    """A small convolutional network that records how many slices each call gets."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.net(x)


@pytest.mark.cpu_isa  # oneDNN picks other kernels per instruction set: equal within atol on each
def test_pytorch_on_a_cpu_gets_a_batch_in_calls_of_a_bounded_size_with_the_whole_batch_answer():
    """Batches stay infer_batch_size slices (their windowing); on a CPU the network sees them in calls
    of at most TORCH_CPU_PIXELS_PER_CALL pixels (faster there: cache), with the answer a whole-batch call gives;
    small slices still go whole, and a GPU gets the whole batch."""
    torch.manual_seed(0)
    model = CallSizes()
    predictor = SlicePredictor(model, PLAN, WINDOWS, 8, 4, torch.device("cpu"), **FP32_NO_TTA)
    predictor.predict_slices_last(volume())
    assert model.calls == [4, 1]  # 40 x 40 slices: a batch of 4 is far below one 512 x 512 slice
    model.calls.clear()
    predictor.pixels_per_call = 2 * 40 * 40  # two of these slices per call
    predictor.flips = predictor_module.TTA_FLIP_DIMS  # flipped copies are cut the same way
    parts = predictor.predict_slices_last(volume())
    assert model.calls == [2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1]
    predictor.pixels_per_call = None
    np.testing.assert_allclose(parts, predictor.predict_slices_last(volume()), atol=1e-6)
    big = SlicePredictor(CallSizes(), PLAN, WINDOWS, 8, 4, torch.device("cpu"), **FP32_NO_TTA)
    big.predict_slices_last(volume(size=512, depth=2))
    assert big.model.calls == [1, 1]  # the default: one 512 x 512 slice per call
    network = CallSizes()
    other_engine = SlicePredictor(CallSizes(), PLAN, WINDOWS, 8, 4, torch.device("cpu"), **FP32_NO_TTA,
                                  network=network)
    other_engine.predict_slices_last(volume())
    assert network.calls == [4, 1]  # OpenVINO and the like cut their own parts
    gpu = SlicePredictor(CallSizes(), PLAN, WINDOWS, 8, 4, torch.device("cuda"), amp=False, tta=False)
    assert gpu.pixels_per_call is None


@pytest.mark.cpu_isa  # oneDNN picks other kernels per instruction set: equal within atol on each
def test_flip_tta_averages_the_mirrored_predictions():
    torch.manual_seed(0)
    model = Ramp()
    plain = SlicePredictor(model, PLAN, WINDOWS, 8, 2, torch.device("cpu"), **FP32_NO_TTA)
    tta = SlicePredictor(model, PLAN, WINDOWS, 8, 2, torch.device("cpu"), **FP32, tta=True)
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


@native_bf16_only
def test_bf16_dice_is_within_a_thousandth_of_fp32(bundle):
    """On a trained model, bf16 inference changes the mean validation Dice by at most 0.001.

    Only where the product runs bf16: emulated bf16 (no native unit) rounds differently and is never used.
    Per case the bound is looser: these 64^2 lesions have ~100 voxels, so one flipped voxel
    moves a case's Dice by ~0.005.
    """
    settings = {**FAST_TRAINING, "num_epochs": 15, "num_epochs_per_validation": 15}
    trainer = Trainer(load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **settings))
    trainer.fit()
    predictor = SlicePredictor(trainer.model, trainer.plan, trainer.windows, 8, 16, torch.device("cpu"),
                               **FP32_NO_TTA)
    fp32 = [volume_dice(predictor.predict_slices_last(v), v.label) for v in trainer.val_volumes]
    predictor.dtype = torch.bfloat16
    assert predictor.precision == "bfloat16"
    bf16 = [volume_dice(predictor.predict_slices_last(v), v.label) for v in trainer.val_volumes]
    assert min(fp32) > 0.3  # a model that finds the lesions, so the comparison means something
    assert abs(np.mean(bf16) - np.mean(fp32)) <= 1e-3
    np.testing.assert_allclose(bf16, fp32, atol=5e-3)


class CountingPointwise(torch.nn.Module):
    """A per-pixel model (1x1 convolution) that counts the slices it is given."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.slices_seen = 0

    def forward(self, x):
        self.slices_seen += x.shape[0]
        return self.conv(x)


def head_volume(size=64, depth=6) -> Volume:
    """Air everywhere; a 'head' box of tissue in rows 20..35, cols 10..49 of slices 1..4 (0 and 5 are air)."""
    image = np.full((size, size, depth), -1000, np.int16)
    image[20:36, 10:50, 1:5] = 40
    image[24:30, 20:30, 2] = 80
    return Volume("h", image, None, np.eye(4))


def test_air_slices_are_left_out_and_the_others_get_the_whole_slice_answer():
    """infer_skip_air_slices: the slices with tissue get exactly the answer of a pass over every slice."""
    torch.manual_seed(0)
    model = CountingPointwise()
    expected = SlicePredictor(model, PLAN, WINDOWS, 8, 16, torch.device("cpu"), **FP32_NO_TTA).predict_slices_last(
        head_volume())
    model.slices_seen = 0
    predictor = SlicePredictor(model, PLAN, WINDOWS, 8, 3, torch.device("cpu"), **FP32_NO_TTA, skip_air_slices=True)
    assert list(predictor.batch_slices(head_volume())) == [[1, 2, 3], [4]]
    (first, second) = predictor.batches(head_volume())
    assert first.slices == [1, 2, 3] and tuple(first.x.shape) == (3, 3, 64, 64)  # whole slices
    result = predictor.predict_slices_last(head_volume())
    assert model.slices_seen == 4
    np.testing.assert_array_equal(result[..., 1:5], expected[..., 1:5])
    assert (result[0, ..., [0, 5]] == 1).all() and (result[1, ..., [0, 5]] == 0).all()
    assert not np.allclose(expected[..., 0], result[..., 0])  # the model says something on air: it was not run


def test_a_slice_with_one_voxel_of_tissue_is_run():
    """The tissue test is any voxel above HEAD_TISSUE_HU: the thinnest skin at the vertex counts, air does not."""
    volume = head_volume()
    volume.image[0, 0, 0] = predictor_module.HEAD_TISSUE_HU + 1
    volume.image[0, 0, 5] = predictor_module.HEAD_TISSUE_HU
    predictor = SlicePredictor(CountingPointwise(), PLAN, WINDOWS, 8, 16, torch.device("cpu"), **FP32_NO_TTA,
                               skip_air_slices=True)
    assert list(predictor.batch_slices(volume)) == [[0, 1, 2, 3, 4]]


def test_other_modalities_run_every_slice():
    """No HU without CT (windows None: z-score inputs), so no slice is air by a threshold."""
    predictor = SlicePredictor(CountingPointwise(), channel_plan("slices", 1, 3), [None], 8, 16,
                               torch.device("cpu"), **FP32_NO_TTA, skip_air_slices=True)
    assert not predictor.skip_air_slices
    assert list(predictor.batch_slices(head_volume())) == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("skip_air, expected", [
    (False, [[1, 4], [5]]),
    (True, [[1, 4]]),
], ids=["every_slice", "air_left_out"])
def test_some_slices_only_fill_whole_batches(skip_air, expected):
    """A screened pass runs later members on scattered slices (1, 4 and the air slice 5 here): they are packed
    into full batches of 2, so OpenVINO's streams get full parts. The answers on those slices are the whole
    pass's."""
    torch.manual_seed(0)
    predictor = SlicePredictor(CountingPointwise(), PLAN, WINDOWS, 8, 2, torch.device("cpu"), **FP32_NO_TTA,
                               skip_air_slices=skip_air)
    volume = head_volume()
    assert list(predictor.batch_slices(volume, only=[4, 1, 5, 4, 9])) == expected  # 9 is beyond the volume
    assert list(predictor.batch_slices(volume, only=[])) == []
    asked = sorted({z for slices in expected for z in slices})
    everything, _ = predictor_module.predict_together([predictor], volume)
    some, _ = predictor_module.predict_together([predictor], volume, only={1, 4, 5})
    np.testing.assert_allclose(some[..., asked], everything[..., asked], atol=1e-6)
    assert (some[0, ..., [0, 2, 3]] == 1).all() and (some[1, ..., [0, 2, 3]] == 0).all()


def test_a_volume_without_head_tissue_is_all_background():
    model = CountingPointwise()
    predictor = SlicePredictor(model, PLAN, WINDOWS, 8, 2, torch.device("cpu"), **FP32_NO_TTA, skip_air_slices=True)
    air = Volume("air", np.full((16, 16, 3), -1000, np.int16), None, np.eye(4))
    result = predictor.predict_slices_last(air)
    assert result.shape == (2, 16, 16, 3) and (result[0] == 1).all() and (result[1] == 0).all()
    assert model.slices_seen == 1  # only the blank pass that finds the number of classes


def test_models_predicted_together_sum_what_each_predicts_alone():
    torch.manual_seed(0)
    predictors = [SlicePredictor(CountingPointwise(), PLAN, WINDOWS, 8, 2, torch.device("cpu"), **FP32_NO_TTA,
                                 skip_air_slices=True) for _ in range(3)]
    alone = [p.predict_slices_last(head_volume()) for p in predictors]
    total, masks = predictor_module.predict_together(predictors, head_volume(), keep_masks=True)
    np.testing.assert_allclose(total, sum(alone), atol=1e-6)
    for mask, probabilities in zip(masks, alone):
        np.testing.assert_array_equal(mask, probabilities.argmax(0))
    votes, _ = predictor_module.predict_together(predictors, head_volume(), vote=True)
    np.testing.assert_array_equal(votes[1], sum(p.argmax(0) for p in alone))
    other = SlicePredictor(CountingPointwise(), PLAN, WINDOWS, 8, 2, torch.device("cpu"), **FP32_NO_TTA)
    with pytest.raises(ValueError, match=r"predictors \[1\] cut a volume into other batches"):
        predictor_module.predict_together([predictors[0], other], head_volume())


def test_precision_and_tta_have_no_second_default():
    """amp and tta come from the config (amp, infer_tta) through the caller."""
    with pytest.raises(TypeError, match="'amp' and 'tta'"):
        SlicePredictor(Ramp(), PLAN, WINDOWS, 8, 2, torch.device("cpu"))


def test_a_slice_neither_square_nor_a_multiple_of_the_divisor_keeps_its_rows_and_columns_without_the_padding():
    torch.manual_seed(0)
    image = np.random.default_rng(1).integers(-50, 150, (20, 36, 3)).astype(np.int16)
    wide = Volume("w", image, None, np.eye(4))
    predictor = SlicePredictor(Ramp(), PLAN, WINDOWS, 8, 16, torch.device("cpu"), **FP32_NO_TTA)
    (batch,) = predictor.batches(wide)
    assert tuple(batch.x.shape) == (3, 3, 24, 40)  # padded to the divisor: 4 rows and 4 columns more
    padded = predictor.batch_probabilities(batch)
    result = predictor.predict_slices_last(wide)
    assert result.shape == (2, 20, 36, 3)
    np.testing.assert_allclose(result, np.moveaxis(padded[:, :, :20, :36], 0, -1), atol=1e-6)
