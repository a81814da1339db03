"""GPU out-of-memory errors that name the settings to lower, with their current values."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemorySettings:
    """The config keys that set GPU memory use, read once: training memory grows with batch_size x roi_size,
    prediction with infer_batch_size whole slices."""

    batch_size: int
    roi_size: tuple[int, ...]
    amp: bool
    infer_batch_size: int

    @classmethod
    def from_config(cls, config: dict) -> MemorySettings:
        return cls(int(config["batch_size"]), tuple(int(r) for r in config["roi_size"]), bool(config["amp"]),
                   int(config["infer_batch_size"]))


def out_of_memory_advice(stage: str, memory: MemorySettings) -> str:
    """What to lower for each stage."""
    if stage == "training":
        batch = memory.batch_size
        return (f"GPU out of memory while training with batch_size={batch}, roi_size={list(memory.roi_size)}, "
                f"amp={memory.amp}: lower batch_size first (e.g. --batch_size={max(batch // 2, 1)}), then roi_size"
                " (a multiple of 2**(levels-1)); keep amp true, it halves activation memory")
    batch = memory.infer_batch_size
    return (f"GPU out of memory during {stage} with infer_batch_size={batch} whole slices per forward pass: "
            f"lower infer_batch_size (e.g. --infer_batch_size={max(batch // 2, 1)})")


@contextmanager
def explain_out_of_memory(stage: str, memory: MemorySettings) -> Iterator[None]:
    """Re-raise a CUDA OOM (same type, original chained) with advice instead of only the allocator's numbers."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        first_line = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
        raise torch.cuda.OutOfMemoryError(f"{out_of_memory_advice(stage, memory)} ({first_line})") from err
