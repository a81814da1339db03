"""The inference engine: PyTorch or OpenVINO (optional), chosen by name and hardware; converted models cached."""

import os

import numpy as np
import pytest
import torch
from bundle_contract import checkpoint_sha256
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
        raise AssertionError("converted again although the kept model was made from this checkpoint")

    import openvino

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = runtime_module.OpenVINONetwork(model, 3, cache, bf16=False)
    np.testing.assert_allclose(again(x).numpy(), network(x).numpy(), atol=1e-6)


def test_a_checkpoint_restored_with_an_older_time_gets_a_fresh_conversion(tmp_path):
    """The kept conversion is keyed by the checkpoint's content: a checkpoint replaced by another one whose file
    time is older (restored from a backup, unpacked, copied without -p) must not run the stale conversion."""
    pytest.importorskip("openvino")
    cache = tmp_path / "model_openvino.xml"
    x = torch.rand(2, 3, 48, 40)
    first = small_model(tmp_path, seed=0)
    runtime_module.OpenVINONetwork(first, 3, cache, bf16=False)
    second = small_model(tmp_path, seed=1)  # another checkpoint at model.pt ...
    os.utime(tmp_path / "model.pt", (1_000_000, 1_000_000))  # ... restored with a time older than the kept model
    assert (tmp_path / "model.pt").stat().st_mtime < cache.stat().st_mtime
    restored = runtime_module.OpenVINONetwork(second, 3, cache, bf16=False)
    with torch.no_grad():
        np.testing.assert_allclose(restored(x).numpy(), second(x).numpy(), atol=1e-4)
        assert not np.allclose(first(x).numpy(), second(x).numpy(), atol=1e-2)  # the stale model would differ
    assert runtime_module.read_kept(cache, checkpoint_sha256(tmp_path / "model.pt")) is not None  # kept anew


def test_a_kept_conversion_without_the_checkpoints_mark_is_not_read(tmp_path):
    """Conversions kept before they were marked (or with no checkpoint to check them against) are not trusted."""
    pytest.importorskip("openvino")
    import openvino as ov

    model = small_model(tmp_path)
    cache = tmp_path / "model_openvino.xml"
    unmarked = ov.convert_model(model, example_input=torch.zeros(1, 3, 32, 32))
    ov.save_model(unmarked, str(cache), compress_to_fp16=False)
    digest = checkpoint_sha256(tmp_path / "model.pt")
    assert runtime_module.read_kept(cache, digest) is None and runtime_module.read_kept(cache, None) is None
    unmarked.set_rt_info(digest, runtime_module.CHECKPOINT_KEY)
    ov.save_model(unmarked, str(cache), compress_to_fp16=False)
    assert runtime_module.read_kept(cache, digest) is not None  # what load_or_convert writes is read back


@pytest.mark.cpu_isa
@pytest.mark.parametrize("bf16", [False, True])
def test_batches_split_over_streams_give_the_whole_batch_logits(tmp_path, bf16):
    pytest.importorskip("openvino")
    import openvino as ov
    from predictor import cpu_has_native_bf16

    if bf16 and not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    model = small_model(tmp_path)
    cache = tmp_path / "model_openvino.xml"
    streamed = runtime_module.OpenVINONetwork(model, 3, cache, bf16=bf16)
    assert streamed.compiled.streams >= min(2, os.cpu_count())  # OpenVINO's pick: parallel requests
    properties = {"NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    one_stream = ov.Core().compile_model(ov.Core().read_model(str(cache)), "CPU", properties)
    whole = runtime_module.StreamedModel(one_stream, slices_per_request=None)
    parts = []

    class Recording:  # a real request, noting the slices of each part it is given
        def __init__(self, request):
            self.request = request

        def start_async(self, inputs):
            parts.append(len(inputs[0]))
            self.request.start_async(inputs)

        def __getattr__(self, name):
            return getattr(self.request, name)

    streamed.compiled.requests = [Recording(r) for r in streamed.compiled.requests]
    # Equal to the last bits where oneDNN has AVX-512; its AVX2 kernels block a part of other size differently
    # (as under ONEDNN_MAX_CPU_ISA=AVX2), so the parts are held to float32 rounding, far below a mask's threshold.
    same = {"rtol": 0, "atol": 1e-5}
    for size in (7, 2, 1):  # 7: more parts than streams, the last one short; 2: one whole part; 1: one slice
        x = torch.rand(size, 3, 48, 32)
        parts.clear()
        np.testing.assert_allclose(streamed(x).numpy(), whole(x.numpy())[0], **same)
        assert sum(parts) == size and max(parts) <= runtime_module.SLICES_PER_REQUEST  # memory: small parts
        if not bf16:
            with torch.no_grad():
                np.testing.assert_allclose(streamed(x).numpy(), model(x).numpy(), atol=1e-4)


def test_a_part_that_fails_leaves_no_stream_busy_for_the_next_batch(tmp_path):
    pytest.importorskip("openvino")
    model = small_model(tmp_path)
    network = runtime_module.OpenVINONetwork(model, 3, tmp_path / "model_openvino.xml", bf16=False)
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


def small_model(tmp_path, seed: int = 0):
    """The tests' small network (3 input channels), with its checkpoint beside its OpenVINO cache."""
    from network import NetworkSettings, build_network

    from tests.conftest import FAST_TRAINING

    settings = NetworkSettings(FAST_TRAINING["network#init_filters"], tuple(FAST_TRAINING["network#blocks_down"]),
                               FAST_TRAINING["network#dsdepth"], norm="batch", out_channels=2)
    torch.manual_seed(seed)
    model = build_network(settings, 3).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pt")
    return model
