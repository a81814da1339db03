"""The paper's network (MONAI SegResNetDS, 2D) and its deep-supervision Dice + CE loss."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.nets import SegResNetDS


def build_network(config: dict, in_channels: int) -> SegResNetDS:
    net = config["network"]
    blocks_down = tuple(int(b) for b in net["blocks_down"])
    return SegResNetDS(
        spatial_dims=2,
        init_filters=int(net["init_filters"]),
        in_channels=in_channels,
        out_channels=int(config["output_classes"]),
        blocks_down=blocks_down,
        blocks_up=(1,) * (len(blocks_down) - 1),
        dsdepth=min(int(net["dsdepth"]), len(blocks_down) - 1) if len(blocks_down) > 1 else 1,
        norm=net["norm"],
    )


def shape_divisor(config: dict) -> int:
    """Slice sizes must be multiples of this (one halving per level below the first)."""
    return 2 ** (len(config["network"]["blocks_down"]) - 1)


def deep_supervision_weights(levels: int) -> list[float]:
    """1, 1/2, 1/4, ...: the full-resolution head dominates, coarser heads guide early training."""
    return [0.5**level for level in range(levels)]


def build_loss(config: dict) -> DeepSupervisionLoss:
    """Dice + cross-entropy per level; DeepSupervisionLoss downsizes targets by nearest neighbour."""
    levels = max(int(config["network"]["dsdepth"]), 1)
    # batch=True: Dice over the whole batch, so crops without hemorrhage do not give unstable 0/0 terms
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    return DeepSupervisionLoss(dice_ce, weights=deep_supervision_weights(levels))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
