import pytest
import torch
import yaml
from monai.losses import DiceCELoss
from network import (NetworkSettings, build_loss, build_network, count_parameters, deep_supervision_weights,
                     shape_divisor)

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
