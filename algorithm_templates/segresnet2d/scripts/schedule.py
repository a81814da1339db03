"""The training budget in optimizer steps, and the learning-rate schedule over those steps.

The budget is set as epochs (MONAI's `num_epochs`) or directly as optimizer steps
(`num_steps`), and the schedule runs per step: a linear warm-up over `num_warmup_epochs`,
then a cosine to zero at the last step. An epoch has the same number of steps whatever the
number of processes (see SliceSampler), so neither the budget nor the schedule changes when
training moves from one GPU to eight; only the samples per step grow with the processes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Budget(NamedTuple):
    num_epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_step: int

    def describe(self) -> str:
        return (f"budget: {self.total_steps:,} optimizer steps ({self.num_epochs} epochs x {self.steps_per_epoch} "
                f"steps), {self.total_steps * self.samples_per_step:,} samples seen ({self.samples_per_step} per "
                f"step), warm-up {self.warmup_steps} steps, then cosine to 0")


def training_budget(num_epochs: int, num_steps: int, steps_per_epoch: int, num_warmup_epochs: float,
                    batch_size: int, world_size: int) -> Budget:
    """num_steps > 0 replaces num_epochs (rounded up to whole epochs, so the last one is validated)."""
    steps_per_epoch = max(int(steps_per_epoch), 1)
    total = int(num_steps) if num_steps > 0 else int(num_epochs) * steps_per_epoch
    epochs = max(math.ceil(total / steps_per_epoch), 1)
    warmup = min(int(round(num_warmup_epochs * steps_per_epoch)), max(total - 1, 0))
    return Budget(epochs, steps_per_epoch, max(total, 1), warmup, batch_size * world_size)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor (step + 1) / warmup during the warm-up, then 0.5 (1 + cos(pi t)) with t from 0 to 1 at the end."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
