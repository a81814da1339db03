"""The paper's network (MONAI SegResNetDS, 2D) and its deep-supervision Dice + CE loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.nets import SegResNetDS

NETWORK_TARGET = "monai.networks.nets.SegResNetDS"


@dataclass(frozen=True)
class NetworkSettings:
    """The network section and output_classes of configs/hyper_parameters.yaml, read once."""

    init_filters: int
    blocks_down: tuple[int, ...]
    dsdepth: int
    norm: str
    out_channels: int

    @classmethod
    def from_config(cls, config: dict) -> NetworkSettings:
        net = config["network"]
        return cls(int(net["init_filters"]), tuple(int(b) for b in net["blocks_down"]), int(net["dsdepth"]),
                   net["norm"], int(config["output_classes"]))


def network_args(settings: NetworkSettings, in_channels: int) -> dict:
    """SegResNetDS's arguments, in plain JSON types: the one place the network is defined."""
    levels = len(settings.blocks_down)
    return {
        "spatial_dims": 2,
        "init_filters": settings.init_filters,
        "in_channels": in_channels,
        "out_channels": settings.out_channels,
        "blocks_down": list(settings.blocks_down),
        "blocks_up": [1] * (levels - 1),
        "dsdepth": min(settings.dsdepth, levels - 1) if levels > 1 else 1,
        "norm": settings.norm,
    }


def build_network(settings: NetworkSettings, in_channels: int) -> SegResNetDS:
    return SegResNetDS(**network_args(settings, in_channels))


def network_config(settings: NetworkSettings, in_channels: int) -> dict:
    """The network as MONAI's ConfigParser instantiates it: checkpoints store it as config["network"], as MONAI's
    own Auto3DSeg templates do, so tools that rebuild a network from a checkpoint alone can load its weights."""
    return {"_target_": NETWORK_TARGET, **network_args(settings, in_channels)}


def trained_network(settings: NetworkSettings, in_channels: int, state_dict: dict,
                    device: torch.device) -> SegResNetDS:
    """The network holding a checkpoint's weights on `device`, in eval mode. Built on the meta device, so no
    random initial weights are drawn for every member only to be overwritten (benchmarks/RESULTS.md, "Member
    loading"); it takes the checkpoint's tensors, so every parameter and buffer must be in `state_dict`."""
    with torch.device("meta"):
        model = build_network(settings, in_channels)
    model.load_state_dict(state_dict, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:  # a buffer outside the state dict (not persistent) would otherwise fail only at the first batch
        raise RuntimeError(f"the checkpoint does not hold {left}; the network cannot be built from it")
    return model.to(device).eval()


def shape_divisor(blocks_down: list[int] | tuple[int, ...]) -> int:
    """Slice sizes must be multiples of this (one halving per level below the first)."""
    return 2 ** (len(blocks_down) - 1)


def deep_supervision_weights(levels: int) -> list[float]:
    """1, 1/2, 1/4, ...: the full-resolution head dominates, coarser heads guide early training."""
    return [0.5**level for level in range(levels)]


def build_loss(dsdepth: int) -> DeepSupervisionLoss:
    """Dice + cross-entropy per level; DeepSupervisionLoss downsizes targets by nearest neighbour."""
    levels = max(int(dsdepth), 1)
    # batch=True: Dice over the whole batch, so crops without hemorrhage do not give unstable 0/0 terms
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    return DeepSupervisionLoss(dice_ce, weights=deep_supervision_weights(levels))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
