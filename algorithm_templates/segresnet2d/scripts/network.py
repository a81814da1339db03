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


def build_loss(dsdepth: int, distill_weight: float | None = None) -> torch.nn.Module:
    """Dice + cross-entropy per level; DeepSupervisionLoss downsizes targets by nearest neighbour. With a
    distill_weight, the target holds a second channel, the teacher's foreground probability (DistillationLoss)."""
    levels = max(int(dsdepth), 1)
    # batch=True: Dice over the whole batch, so crops without hemorrhage do not give unstable 0/0 terms
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    label_loss = DeepSupervisionLoss(dice_ce, weights=deep_supervision_weights(levels))
    return label_loss if distill_weight is None else DistillationLoss(label_loss, distill_weight)


SOFT_DICE_SMOOTH = 1e-5  # DiceCELoss's smooth_nr and smooth_dr: an empty target predicted empty costs 0


def soft_target_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice between the student's P(any foreground class) and the teacher's.

    f = 1 - softmax(z)[background], in logs without cancellation: log(1 - f) = log_softmax(z)[background] and
    log f = logsumexp(z[foreground]) - logsumexp(z), so saturated logits give finite values and gradients.
    The Dice sums over the batch (batch=True, as the label's Dice). logits (B, C, H, W), C >= 2; teacher
    (B, 1, H, W) or (B, H, W) in [0, 1].
    """
    z = logits.float()  # under autocast too: logs of probabilities near 0 and 1
    teacher = teacher.reshape(z.shape[0], *z.shape[2:]).float()
    normaliser = torch.logsumexp(z, dim=1)
    log_background = z[:, 0] - normaliser
    log_foreground = torch.logsumexp(z[:, 1:], dim=1) - normaliser
    cross_entropy = -(teacher * log_foreground + (1 - teacher) * log_background).mean()
    foreground = log_foreground.exp()
    overlap = 2 * (foreground * teacher).sum() + SOFT_DICE_SMOOTH
    dice = 1 - overlap / (foreground.sum() + teacher.sum() + SOFT_DICE_SMOOTH)
    return cross_entropy + dice


class DistillationLoss(torch.nn.Module):
    """label_loss on the hard label + weight x soft_target_loss of the full-resolution output against the
    teacher (Noothout et al. 2022: a student trained on an ensemble's probabilities matched the ensemble).
    The target is (B, 2, H, W): channel 0 the class indices, channel 1 the teacher's foreground probability."""

    def __init__(self, label_loss: torch.nn.Module, weight: float):
        super().__init__()
        self.label_loss, self.weight = label_loss, float(weight)

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        top = outputs[0] if isinstance(outputs, (list, tuple)) else outputs  # deep supervision: full resolution first
        hard, teacher = target[:, :1], target[:, 1:]
        return self.label_loss(outputs, hard) + self.weight * soft_target_loss(top, teacher)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
