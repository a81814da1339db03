"""The inference engine: PyTorch or OpenVINO (optional), chosen by name and hardware; converted models cached."""

import os

import numpy as np
import pytest
import torch
from runtime import choose_runtime

import runtime as runtime_module

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("name, device, installed, expected", [
    ("auto", CPU, True, "openvino"),
    ("auto", CPU, False, "torch"),
    ("auto", CUDA, True, "torch"),
    ("torch", CPU, True, "torch"),
    ("openvino", CPU, True, "openvino"),
])
def test_auto_takes_openvino_on_cpus_where_it_is_installed(monkeypatch, name, device, installed, expected):
    monkeypatch.setattr(runtime_module, "openvino_installed", lambda: installed)
    assert choose_runtime(name, device) == expected


def test_impossible_choices_say_what_to_do(monkeypatch):
    monkeypatch.setattr(runtime_module, "openvino_installed", lambda: False)
    with pytest.raises(ValueError, match="pip install openvino"):
        choose_runtime("openvino", CPU)
    with pytest.raises(ValueError, match="on CPUs only"):
        choose_runtime("openvino", CUDA)
    with pytest.raises(ValueError, match="choose one of auto, torch, openvino"):
        choose_runtime("onnx", CPU)


@pytest.mark.cpu_isa
def test_openvino_computes_what_torch_does_and_keeps_the_converted_model(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    model = small_model(tmp_path)
    cache = tmp_path / "model_openvino.xml"
    x = torch.rand(2, 3, 48, 40)
    network = runtime_module.OpenVINONetwork(model, 3, cache, bf16=False)
    with torch.no_grad():
        np.testing.assert_allclose(network(x).numpy(), model(x).numpy(), atol=1e-4)
    assert cache.is_file() and cache.with_suffix(".bin").is_file() and network.precision == "openvino-f32"

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is newer than the checkpoint")

    import openvino

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = runtime_module.OpenVINONetwork(model, 3, cache, bf16=False)
    np.testing.assert_allclose(again(x).numpy(), network(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("streams, expected", [
    (0, {"PERFORMANCE_HINT": "THROUGHPUT"}),
    (1, {"NUM_STREAMS": "1"}),
    (4, {"NUM_STREAMS": "4"}),
])
def test_streams_are_openvinos_throughput_hint_or_a_count(streams, expected):
    assert runtime_module.stream_properties(streams) == expected


@pytest.mark.parametrize("streams", [-1, "2", "auto", True, 1.5, None])
def test_a_bad_stream_count_names_the_key_the_file_and_the_fix(streams):
    with pytest.raises(ValueError, match=r"infer_cpu_streams .*hyper_parameters.yaml.* set it to 0"):
        runtime_module.stream_properties(streams)


@pytest.mark.parametrize("override, expected", [(1, 1), ("2", 2)])
def test_a_stream_count_can_be_overridden_as_other_keys_are(override, expected):
    from bundle_config import load_config

    from tests.template.test_bundle_config import CONFIG

    streams = load_config(CONFIG, infer_cpu_streams=override)["infer_cpu_streams"]  # a profile, fire's CLI
    assert streams == expected and runtime_module.stream_properties(streams) == {"NUM_STREAMS": str(expected)}


@pytest.mark.cpu_isa
@pytest.mark.parametrize("bf16", [False, True])
def test_batches_split_over_streams_give_the_one_stream_logits(tmp_path, bf16):
    pytest.importorskip("openvino")
    from predictor import cpu_has_native_bf16

    if bf16 and not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    model = small_model(tmp_path)
    cache = tmp_path / "model_openvino.xml"
    one = runtime_module.OpenVINONetwork(model, 3, cache, bf16=bf16, streams=1)
    three = runtime_module.OpenVINONetwork(model, 3, cache, bf16=bf16, streams=3)
    whole = runtime_module.OpenVINONetwork(model, 3, cache, bf16=bf16, streams=1, slices_per_request=None)
    assert one.compiled.streams == 1 and three.compiled.streams >= min(2, os.cpu_count())  # capped at the cores
    parts = []

    class Recording:  # a real request, noting the slices of each part it is given
        def __init__(self, request):
            self.request = request

        def start_async(self, inputs):
            parts.append(len(inputs[0]))
            self.request.start_async(inputs)

        def __getattr__(self, name):
            return getattr(self.request, name)

    three.compiled.requests = [Recording(r) for r in three.compiled.requests]
    # Equal to the last bits where oneDNN has AVX-512; its AVX2 kernels block a part of other size differently
    # (as under ONEDNN_MAX_CPU_ISA=AVX2), so the parts are held to float32 rounding, far below a mask's threshold.
    same = {"rtol": 0, "atol": 1e-5}
    for size in (7, 2, 1):  # 7: more parts than streams, the last one short; 2: one whole part; 1: one slice
        x = torch.rand(size, 3, 48, 32)
        parts.clear()
        np.testing.assert_allclose(three(x).numpy(), whole(x).numpy(), **same)
        assert sum(parts) == size and max(parts) <= runtime_module.SLICES_PER_REQUEST  # memory: small parts
        np.testing.assert_allclose(one(x).numpy(), whole(x).numpy(), **same)
        if not bf16:
            with torch.no_grad():
                np.testing.assert_allclose(three(x).numpy(), model(x).numpy(), atol=1e-4)


def test_a_part_that_fails_leaves_no_stream_busy_for_the_next_batch(tmp_path):
    pytest.importorskip("openvino")
    model = small_model(tmp_path)
    network = runtime_module.OpenVINONetwork(model, 3, tmp_path / "model_openvino.xml", bf16=False, streams=2)
    x = torch.rand(7, 3, 48, 32)
    expected = network(x).numpy()
    failures = [RuntimeError("out of memory on part 2")]  # the first part is running when the second fails

    class Failing:
        def __init__(self, request):
            self.request = request

        def start_async(self, inputs):
            if len(failures) and self is network.compiled.requests[1]:
                raise failures.pop()
            self.request.start_async(inputs)

        def __getattr__(self, name):
            return getattr(self.request, name)

    network.compiled.requests = [Failing(r) for r in network.compiled.requests]
    with pytest.raises(RuntimeError, match="part 2"):
        network(x)
    np.testing.assert_array_equal(network(x).numpy(), expected)  # the request left running was waited for
    with pytest.raises(ValueError, match="empty batch"):
        network(x[:0])


def small_model(tmp_path):
    """The tests' small network (3 input channels), with a stand-in checkpoint beside its OpenVINO cache."""
    from network import NetworkSettings, build_network

    from tests.conftest import FAST_TRAINING

    settings = NetworkSettings(FAST_TRAINING["network#init_filters"], tuple(FAST_TRAINING["network#blocks_down"]),
                               FAST_TRAINING["network#dsdepth"], norm="batch", out_channels=2)
    torch.manual_seed(0)
    model = build_network(settings, 3).eval()
    torch.save({}, tmp_path / "model.pt")
    return model
