"""GPU out-of-memory errors that name the settings to lower, with their current values."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def out_of_memory_advice(stage: str, config: dict) -> str:
    """What to lower for each stage: training memory grows with batch_size x roi_size, prediction with
    infer_batch_size whole slices."""
    if stage == "training":
        batch = int(config["batch_size"])
        return (f"GPU out of memory while training with batch_size={batch}, roi_size={list(config['roi_size'])}, "
                f"amp={config['amp']}: lower batch_size first (e.g. --batch_size={max(batch // 2, 1)}), then roi_size"
                " (a multiple of 2**(levels-1)); keep amp true, it halves activation memory")
    batch = int(config["infer_batch_size"])
    return (f"GPU out of memory during {stage} with infer_batch_size={batch} whole slices per forward pass: "
            f"lower infer_batch_size (e.g. --infer_batch_size={max(batch // 2, 1)})")


@contextmanager
def explain_out_of_memory(stage: str, config: dict) -> Iterator[None]:
    """Re-raise a CUDA OOM (same type, original chained) with advice instead of only the allocator's numbers."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        first_line = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
        raise torch.cuda.OutOfMemoryError(f"{out_of_memory_advice(stage, config)} ({first_line})") from err
