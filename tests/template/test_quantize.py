"""INT8 on CPUs: calibration slices from the bundle's training scans, the agreement gate, kept conversions.

OpenVINO and NNCF are optional: the decisions are tested with fake compiled models (and a fake
`openvino` module where a model file is written or read); one test runs both libraries for real.
"""

import hashlib
import json
import os
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from bundle_contract import BundleFiles
from infer import InferClass
from inputs import channel_plan
from predictor import HeadCrop, SlicePredictor
from quantize import (Int8Request, Int8Settings, QuantizationError, calibration_images, calibration_inputs,
                      foreground_agreement, int8_or_float)
from volumes import Volume

import quantize as quantize_module
from autoseg2d.synthetic import make_head_ct

PLAN = channel_plan("slices", 1, 3)
WINDOWS = [(0.0, 100.0)]
DIVISOR = 8


def head_volumes(count: int, num_slices: int = 12) -> list[Volume]:
    return [Volume(f"v{seed}", make_head_ct(48, num_slices, seed=seed).image_hu, None, np.eye(4))
            for seed in range(count)]


def predictor(crop: HeadCrop | None = HeadCrop(threshold_hu=-500, margin_px=4)) -> SlicePredictor:
    return SlicePredictor(torch.nn.Identity(), PLAN, WINDOWS, DIVISOR, 5, torch.device("cpu"), amp=False,
                          cpu_bf16=False, tta=False, crop=crop)


def origins(inputs, slice_predictor, volumes) -> list[tuple[int, int]]:
    """(volume, axial index) of each input, found among the predictor's own batches (so each input is one
    row of a batch, cut to that batch's box)."""
    rows = [(v, batch.slices[i], batch.x[i:i + 1].numpy()) for v, volume in enumerate(volumes)
            for batch in slice_predictor.batches(volume) for i in range(len(batch.slices))]
    found = []
    for x in inputs:
        matches = [(v, z) for v, z, row in rows if row.shape == x.shape and np.array_equal(row, x)]
        assert len(matches) == 1, "an input is not one slice of the predictor's batches"
        found.append(matches[0])
    return found


@pytest.mark.parametrize("crop", [HeadCrop(threshold_hu=-500, margin_px=4), None], ids=["ct_head_box", "no_crop"])
def test_calibration_and_check_slices_come_from_every_volume_and_never_coincide(crop):
    volumes, slice_predictor = head_volumes(3), predictor(crop)
    calibration, check = calibration_inputs(slice_predictor, volumes, 6)
    assert len(calibration) == len(check) == 6
    assert all(x.ndim == 4 and x.shape[:2] == (1, len(PLAN)) for x in calibration + check)
    calibration_at, check_at = origins(calibration, slice_predictor, volumes), origins(check, slice_predictor, volumes)
    assert not set(calibration_at) & set(check_at)
    assert {v for v, _ in calibration_at} == {v for v, _ in check_at} == {0, 1, 2}


def test_the_slices_spread_from_the_skull_base_to_the_vertex():
    volumes, slice_predictor = head_volumes(2, num_slices=16), predictor()
    calibration, check = calibration_inputs(slice_predictor, volumes, 4)
    picked = origins(calibration, slice_predictor, volumes) + origins(check, slice_predictor, volumes)
    for v, volume in enumerate(volumes):
        head = [z for batch in slice_predictor.batches(volume) for z in batch.slices]
        axial = sorted(z for w, z in picked if w == v)
        assert len(axial) == 4 and axial[0] == min(head) and axial[-1] == max(head)


@pytest.mark.parametrize("count", [1, 3, 5])
def test_the_count_is_kept_in_both_sets(count):
    calibration, check = calibration_inputs(predictor(), head_volumes(2), count)
    assert len(calibration) == len(check) == count


def test_calibration_images_are_spread_over_the_folds_training_cases(ct_dataset):
    entries, base = json.loads(ct_dataset.read_text())["training"], ct_dataset.parent
    for fold in (0, 1):
        training = [str(base / e["image"]) for e in entries if e["fold"] != fold]  # the validation fold left out
        assert calibration_images(str(ct_dataset), str(base), fold, 100) == training
        assert calibration_images(str(ct_dataset), str(base), fold, 2) == [training[0], training[-1]]
        assert len(calibration_images(str(ct_dataset), str(base), fold, 3)) == 3


def test_no_datalist_means_no_calibration_images_and_a_broken_one_is_named(tmp_path):
    assert calibration_images("", str(tmp_path), 0, 8) == []  # an exported bundle: the caller explains
    with pytest.raises(QuantizationError, match=r"missing\.json.*infer_cpu_int8"):
        calibration_images(str(tmp_path / "missing.json"), str(tmp_path), 0, 8)


def outputs(foreground: np.ndarray) -> list[np.ndarray]:
    """What a compiled two-class model returns: a list of logits (1, 2, H, W), foreground where asked."""
    return [np.stack([~foreground, foreground]).astype(np.float32)[None]]


def test_foreground_agreement_is_the_dice_of_the_argmax_masks():
    inputs = [np.zeros((1, 3, 4, 6), np.float32)] * 2
    left = np.zeros((4, 6), bool)
    left[:, :3] = True

    def model(mask):
        return lambda x: outputs(mask)

    assert foreground_agreement(model(left), model(left), inputs) == 1.0
    assert foreground_agreement(model(left), model(~left), inputs) == 0.0
    assert foreground_agreement(model(~np.ones((4, 6), bool)), model(~np.ones((4, 6), bool)), inputs) == 1.0
    half = left & (np.arange(4) < 2)[:, None]
    assert foreground_agreement(model(left), model(half), inputs) == pytest.approx(2 * 6 / (12 + 6))


class FakeModel:
    """A 'model' whose compiled form finds foreground on the first `pixels` of each input's 10 columns."""

    def __init__(self, pixels: int):
        self.pixels = pixels


FLOAT = FakeModel(10)
CHECK_INPUT = np.zeros((1, 3, 1, 10), np.float32)
WHOLE = repr(HeadCrop(threshold_hu=-500, margin_px=None))  # how the slices were cut (infer_skip_air_slices)


def compile_fake(model: FakeModel):
    return lambda x: outputs(np.arange(x.shape[-1])[None] < model.pixels)


@pytest.fixture
def fake_openvino(monkeypatch):
    """An `openvino` module whose save_model writes the .xml and .bin and whose read_model reads the .xml back."""
    def save_model(model, path, compress_to_fp16):
        with open(path, "w") as xml:
            xml.write(str(model.pixels))
        with open(os.path.splitext(path)[0] + ".bin", "w") as weights:
            weights.write("weights")

    class Core:
        def read_model(self, path):
            with open(path) as xml:
                return FakeModel(int(xml.read()))

    module = types.SimpleNamespace(save_model=save_model, Core=Core)
    monkeypatch.setitem(sys.modules, "openvino", module)
    return module


class Quantizer:
    """Stands in for NNCF: returns a model of the given quality and counts its calls."""

    def __init__(self, monkeypatch, pixels: int):
        self.pixels, self.calls = pixels, 0
        monkeypatch.setattr(quantize_module, "nncf_installed", lambda: True)
        monkeypatch.setattr(quantize_module, "quantize_model", self)

    def __call__(self, float_model, calibration):
        assert float_model is FLOAT and len(calibration) == 2
        self.calls += 1
        return FakeModel(self.pixels)


def request(files: BundleFiles | None, min_agreement: float, inputs=None) -> Int8Request:
    made = ([CHECK_INPUT] * 2, [CHECK_INPUT] * 2) if inputs is None else inputs
    settings = Int8Settings(calibration_slices=2, calibration_scans=1, min_agreement=min_agreement,
                            slices_cut=WHOLE)
    return Int8Request(settings, files, lambda: made)


@pytest.fixture
def files(tmp_path, fake_openvino) -> BundleFiles:
    """A bundle's model folder with a checkpoint an hour old."""
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    os.utime(checkpoint, (checkpoint.stat().st_mtime - 3600,) * 2)
    return BundleFiles(tmp_path)


def decide(files, min_agreement, **kwargs):
    return int8_or_float(FLOAT, lambda: compile_fake(FLOAT), compile_fake, request(files, min_agreement, **kwargs))


def agreement_of(pixels: int) -> float:
    return round(2 * pixels / (10 + pixels), 4)


def test_a_disagreeing_int8_model_is_refused_and_not_kept(files, monkeypatch):
    quantizer = Quantizer(monkeypatch, pixels=8)
    with pytest.warns(UserWarning, match=r"0\.8889 .*infer_int8_min_agreement 0\.98: the float model runs"):
        compiled, report = decide(files, 0.98)
    assert compiled is None and report["used"] is False and report["agreement"] == agreement_of(8)
    assert json.loads(files.int8_report.read_text()) == report
    assert report["calibration_slices"] == report["check_slices"] == 2
    assert not files.openvino_int8_model.exists() and not files.openvino_int8_model.with_suffix(".bin").exists()
    with pytest.warns(UserWarning, match=r"0\.8889 .*infer_int8_min_agreement 0\.95"):  # still above the figure
        again, kept = decide(files, 0.95)  # decided by the kept report, not quantized again
    assert again is None and kept["used"] is False and kept["min_agreement"] == 0.95 and quantizer.calls == 1


def test_an_agreeing_int8_model_is_saved_before_its_report(files, monkeypatch):
    written = []
    for name in ("save_openvino_model", "write_text_atomic"):
        original = getattr(quantize_module, name)
        monkeypatch.setattr(quantize_module, name, lambda *args, _name=name, _original=original:
                            (written.append(_name), _original(*args))[1])
    Quantizer(monkeypatch, pixels=10)
    compiled, report = decide(files, 0.98)
    assert report == {"agreement": 1.0, "min_agreement": 0.98, "calibration_slices": 2, "check_slices": 2,
                      "used": True, "checkpoint_sha256": hashlib.sha256(b"weights").hexdigest(),
                      "calibration_slices_requested": 2, "calibration_scans": 1, "slices_cut": WHOLE}
    assert compiled is not None and compiled(CHECK_INPUT)[0][0, 1].all()
    assert written == ["save_openvino_model", "write_text_atomic"]
    assert files.openvino_int8_model.read_text() == "10" and files.openvino_int8_model.with_suffix(".bin").is_file()


def test_a_kept_model_of_the_same_checkpoint_is_read_not_quantized_again(files, monkeypatch):
    quantizer = Quantizer(monkeypatch, pixels=9)
    decide(files, 0.9)
    quantizer.pixels = 10  # a second quantization would give another model: the kept one must be read
    compiled, report = decide(files, 0.9)
    assert quantizer.calls == 1 and report["used"] is True and report["agreement"] == agreement_of(9)
    assert compiled(CHECK_INPUT)[0][0, 1].sum() == 9


def test_a_kept_model_without_its_weights_is_quantized_again(files, monkeypatch):
    quantizer = Quantizer(monkeypatch, pixels=10)
    decide(files, 0.98)
    files.openvino_int8_model.with_suffix(".bin").unlink()
    compiled, report = decide(files, 0.98)
    assert quantizer.calls == 2 and compiled is not None and files.openvino_int8_model.with_suffix(".bin").is_file()


def test_a_retrained_checkpoint_is_quantized_again_and_a_copy_with_new_times_is_not(files, monkeypatch):
    """The kept model belongs to the checkpoint's bytes, not its time: a copy without -p keeps it."""
    quantizer = Quantizer(monkeypatch, pixels=9)
    decide(files, 0.9)
    newer = files.int8_report.stat().st_mtime + 60
    os.utime(files.model, (newer, newer))  # what cp without -p, an unzip or a container build do
    compiled, report = decide(files, 0.9)
    assert quantizer.calls == 1 and report["agreement"] == agreement_of(9)
    files.model.write_bytes(b"retrained weights")
    quantizer.pixels = 10
    compiled, report = decide(files, 0.9)
    assert quantizer.calls == 2 and report["agreement"] == 1.0 and files.openvino_int8_model.read_text() == "10"
    assert json.loads(files.int8_report.read_text())["agreement"] == 1.0


def test_other_calibration_settings_quantize_again(files, monkeypatch):
    quantizer = Quantizer(monkeypatch, pixels=9)
    decide(files, 0.9)
    more = Int8Request(Int8Settings(calibration_slices=4, calibration_scans=1, min_agreement=0.9, slices_cut=WHOLE),
                       files, lambda: ([CHECK_INPUT] * 2, [CHECK_INPUT] * 2))
    int8_or_float(FLOAT, lambda: compile_fake(FLOAT), compile_fake, more)
    assert quantizer.calls == 2 and json.loads(files.int8_report.read_text())["calibration_slices_requested"] == 4
    boxes = Int8Request(Int8Settings(calibration_slices=4, calibration_scans=1, min_agreement=0.9,
                                     slices_cut=repr(HeadCrop(threshold_hu=-500, margin_px=16))),
                        files, lambda: ([CHECK_INPUT] * 2, [CHECK_INPUT] * 2))
    int8_or_float(FLOAT, lambda: compile_fake(FLOAT), compile_fake, boxes)  # the kept one was made on whole slices
    assert quantizer.calls == 3 and "margin_px=16" in json.loads(files.int8_report.read_text())["slices_cut"]


def test_lowering_the_minimum_below_a_refused_figure_quantizes_again(files, monkeypatch):
    quantizer = Quantizer(monkeypatch, pixels=8)
    with pytest.warns(UserWarning):
        decide(files, 0.98)
    compiled, report = decide(files, 0.8)  # the refused model was not kept: made again and now used
    assert quantizer.calls == 2 and compiled is not None and report["used"] is True
    assert files.openvino_int8_model.is_file() and json.loads(files.int8_report.read_text())["used"] is True


def test_raising_the_minimum_above_a_used_figure_runs_the_float_model(files, monkeypatch):
    quantizer = Quantizer(monkeypatch, pixels=9)
    decide(files, 0.9)
    with pytest.warns(UserWarning, match=r"0\.9474 .*infer_int8_min_agreement 0\.98"):
        compiled, report = decide(files, 0.98)
    assert compiled is None and report["used"] is False and report["min_agreement"] == 0.98
    assert quantizer.calls == 1


def test_a_figure_that_rounds_to_the_minimum_is_decided_once(files, monkeypatch):
    """The kept report's rounded figure decides later starts, so the first decision must use it too."""
    quantizer = Quantizer(monkeypatch, pixels=10)
    monkeypatch.setattr(quantize_module, "foreground_agreement", lambda *args: 0.97996)
    first, report = decide(files, 0.98)
    assert report["agreement"] == 0.98 and first is not None
    decide(files, 0.98)
    assert quantizer.calls == 1


def test_a_read_only_model_folder_warns_and_still_uses_int8(files, monkeypatch, fake_openvino):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(fake_openvino, "save_model", refuse)
    Quantizer(monkeypatch, pixels=10)
    with pytest.warns(UserWarning, match="could not keep the INT8 model .* quantized on every start"):
        compiled, report = decide(files, 0.98)
    assert compiled is not None and report["used"] is True and not files.int8_report.exists()


def test_without_nncf_the_error_names_the_package_and_the_key(files, monkeypatch):
    monkeypatch.setattr(quantize_module, "nncf_installed", lambda: False)
    with pytest.raises(QuantizationError, match=r"pip install nncf.*infer_cpu_int8 to false"):
        decide(files, 0.98)


def test_without_training_scans_the_error_names_the_datalist_key(files, monkeypatch):
    Quantizer(monkeypatch, pixels=10)
    with pytest.raises(QuantizationError, match="data_list_file_path"):
        decide(files, 0.98, inputs=([], []))


@pytest.mark.parametrize("key, value", [("infer_int8_calibration_slices", 0), ("infer_int8_calibration_scans", 0),
                                        ("infer_int8_min_agreement", 1.5)])
def test_impossible_settings_name_their_key(key, value):
    config = {"infer_int8_calibration_slices": 32, "infer_int8_calibration_scans": 8, "infer_int8_min_agreement": 0.98,
              key: value}
    with pytest.raises(ValueError, match=key):
        Int8Settings.from_config(config, slices_cut=WHOLE)


def test_int8_with_pytorch_on_a_cpu_says_how_to_get_openvino(trained_bundle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QuantizationError, match=r"pip install openvino nncf.*infer_cpu_runtime auto or openvino"):
        InferClass(str(trained_bundle), infer_cpu_int8=True, infer_cpu_runtime="torch")


def test_a_bad_stream_count_is_refused_where_pytorch_runs_too(trained_bundle):
    with pytest.raises(ValueError, match=rf"infer_cpu_streams -1 in {re.escape(str(trained_bundle))} .*set it to 0"):
        InferClass(str(trained_bundle), infer_cpu_streams=-1, infer_cpu_runtime="torch")


def test_int8_inference_keeps_its_model_and_report(trained_bundle, ct_dataset, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    bundle = tmp_path / "segresnet2d_0"
    shutil.copytree(trained_bundle.parents[1], bundle)  # copy2: the checkpoint keeps its time
    config_file = str(bundle / "configs" / "hyper_parameters.yaml")
    settings = {"infer_cpu_int8": True, "infer_cpu_runtime": "openvino", "infer_int8_calibration_slices": 4,
                "infer_int8_min_agreement": 0.0}
    first = InferClass(config_file, **settings)
    files = BundleFiles(bundle / "model")
    report = json.loads(files.int8_report.read_text())
    assert 0.0 <= report["agreement"] <= 1.0 and report["used"] is True
    assert report["calibration_slices"] == report["check_slices"] == 4
    assert first.predictor.precision == "openvino-int8" and files.openvino_int8_model.is_file()

    def no_quantization(*args):
        raise AssertionError("quantized again although the kept INT8 model is newer than the checkpoint")

    monkeypatch.setattr(quantize_module, "quantize_model", no_quantization)
    second = InferClass(config_file, **settings)
    assert second.predictor.precision == "openvino-int8" and second.predictor.network.int8_report == report
    image = ct_dataset.parent / json.loads(ct_dataset.read_text())["testing"][0]["image"]
    probabilities = second.infer(str(image))
    assert probabilities.shape == (2, 64, 64, 12)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(probabilities.shape[1:]), atol=1e-5, rtol=0)
