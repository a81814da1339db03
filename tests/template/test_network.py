import pytest
import torch
import yaml
from monai.losses import DiceCELoss
from monai.bundle import ConfigParser
from network import (NetworkSettings, build_loss, build_network, count_parameters, deep_supervision_weights,
                     network_config, shape_divisor, trained_network)

from tests.conftest import TEMPLATE


@pytest.fixture(scope="module")
def defaults() -> dict:
    config = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())
    config["output_classes"] = 2
    return config


def test_weights_halve_per_level():
    assert deep_supervision_weights(4) == [1.0, 0.5, 0.25, 0.125]


def test_paper_network(defaults):
    model = build_network(NetworkSettings.from_config(defaults), in_channels=9)
    assert count_parameters(model) == 29_825_640  # 32 filters, blocks (2, 4, 4, 4, 4), 2D
    assert shape_divisor(defaults["network"]["blocks_down"]) == 16
    model.train()
    outputs = model(torch.zeros(2, 9, 64, 64))
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 64, 64), (2, 2, 32, 32), (2, 2, 16, 16), (2, 2, 8, 8)]
    model.eval()
    assert model(torch.zeros(1, 9, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize("blocks_down", [[2, 4, 4, 4, 4], [1, 1, 1], [1]])
def test_the_network_config_instantiates_the_network_the_template_builds(defaults, blocks_down):
    """MONAI's ConfigParser alone builds from network_config (as checkpoints store it) a network that takes the
    template's weights strictly and answers alike, at every depth planning may choose."""
    network = {**defaults["network"], "init_filters": 8, "blocks_down": blocks_down}
    settings = NetworkSettings.from_config({**defaults, "network": network})
    torch.manual_seed(0)
    ours = build_network(settings, in_channels=3).eval()
    config = network_config(settings, in_channels=3)
    assert config["_target_"] == "monai.networks.nets.SegResNetDS" and config["spatial_dims"] == 2
    theirs = ConfigParser({"network": config}).get_parsed_content("network")
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))


def test_a_trained_network_holds_the_checkpoint_weights_without_drawing_random_ones(defaults):
    """Inference builds each member straight from its checkpoint: the same answers as a network built and then
    loaded (a channels_last checkpoint with trained norm statistics, as the trainer saves), in eval mode, on the
    device asked for, no tensor left on the meta device, and no random initial weights drawn (the RNG state
    unchanged, which a network initialized and then overwritten would advance)."""
    settings = NetworkSettings.from_config({**defaults, "network": {**defaults["network"], "init_filters": 8}})
    torch.manual_seed(0)
    reference = build_network(settings, in_channels=3).to(memory_format=torch.channels_last)
    for module in reference.modules():  # norm weights and running statistics away from their defaults
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    reference.eval()
    state = {key: value.clone() for key, value in reference.state_dict().items()}
    before = torch.get_rng_state()
    model = trained_network(settings, in_channels=3, state_dict=state, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    assert not model.training
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        trained_network(settings, in_channels=3, state_dict={k: v for k, v in state.items() if not k.endswith("bias")},
                        device=torch.device("cpu"))


def test_a_network_with_a_tensor_outside_the_checkpoint_is_refused_when_built(monkeypatch):
    """A buffer that is not saved (persistent=False) would stay on the meta device and fail only at the first
    batch; trained_network names it at once."""
    import network

    class WithUnsavedBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            self.register_buffer("scale", torch.ones(1), persistent=False)

    monkeypatch.setattr(network, "build_network", lambda settings, in_channels: WithUnsavedBuffer())
    state = WithUnsavedBuffer().state_dict()
    with pytest.raises(RuntimeError, match=r"does not hold \['scale'\]"):
        network.trained_network(None, in_channels=1, state_dict=state, device=torch.device("cpu"))


def test_loss_sums_levels_with_nearest_downsized_targets(defaults):
    torch.manual_seed(0)
    outputs = [torch.randn(2, 2, 32 // 2**i, 32 // 2**i) for i in range(4)]
    target = (torch.rand(2, 1, 32, 32) > 0.7).float()
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    expected = sum(
        0.5**i * dice_ce(out, torch.nn.functional.interpolate(target, size=out.shape[2:], mode="nearest-exact"))
        for i, out in enumerate(outputs)
    )
    torch.testing.assert_close(build_loss(defaults["network"]["dsdepth"])(outputs, target), expected)
