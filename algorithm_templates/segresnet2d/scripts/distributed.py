"""Training in several processes (one per GPU, on one or several nodes) under torchrun.

torchrun (also the one MONAI starts itself when more than one GPU is visible) sets RANK,
LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op single process. NCCL
joins GPUs, gloo joins CPU processes (used by the tests). Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Session:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session() -> Iterator[Session]:
    """One process group for the duration of a training run; torn down even when training fails."""
    if not launched_by_torchrun():
        yield Session()
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    try:
        yield Session(dist.get_rank(), dist.get_world_size(), device)
        dist.barrier()  # after a run that ended well, the ranks tear down together
    finally:
        dist.destroy_process_group()


def leave_finished_process() -> None:
    """End a torchrun process whose training finished (files written and closed, group destroyed) with status 0,
    skipping the interpreter's and C++ runtime's teardown.

    DistributedDataParallel keeps the gloo process group alive after destroy_process_group (torch holds
    references to it that nothing releases), so its worker and TCP-loop threads still run while a normal exit
    tears down the runtime around them; the other rank exiting at that moment closes their sockets and they
    call into destroyed state: "terminate called without an active exception", exit -6, for a finished training.
    Without torchrun nothing is left running and the process exits normally.
    """
    if not launched_by_torchrun():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def wrap_for_training(model: torch.nn.Module, run: Session) -> torch.nn.Module:
    """The module to train: the model itself, or a DDP wrapper sharing its parameters.

    Batch norm becomes SyncBatchNorm on GPUs: per-GPU batches of 2D crops can be small, and
    statistics over the global batch keep training equal to one large-batch GPU. Parameters
    are reused, so the caller's optimizer and state_dict keys (no 'module.') are unchanged.
    Rank 0's initial weights are broadcast to the others when DDP is built.
    """
    if not run.distributed:
        return model
    if run.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[run.device.index])
    return DistributedDataParallel(model)


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank torch seed (rank 0 keeps the single-process one); samples and their augmentation
    take their seeds from SliceSampler instead, the same on every rank."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def sum_over_ranks(values: list[float], run: Session) -> list[float]:
    if not run.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_lists(values: list, run: Session) -> list:
    """Concatenate each rank's list (in rank order) on every rank."""
    if not run.distributed:
        return values
    gathered: list = [None] * run.world_size
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def weights_checksum(model: torch.nn.Module) -> float:
    """Parameters only: with plain batch norm each rank updates its running statistics from its own batch."""
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()))


def check_replicas_agree(model: torch.nn.Module, run: Session) -> float:
    """Raise if the ranks ended with different weights (a broken sync would otherwise pass silently)."""
    checksum = weights_checksum(model)
    sums = gather_lists([checksum], run)
    if max(sums) - min(sums) > 1e-9 * max(abs(checksum), 1.0):
        raise RuntimeError(f"ranks hold different weights after training (checksums {sums}); DDP sync is broken")
    return checksum


def rank_logger(run: Session) -> logging.Logger:
    """Non-zero ranks log warnings only, to stdout, prefixed with their rank."""
    logger = logging.getLogger(f"segresnet2d.rank{run.rank}")
    logger.setLevel(logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[rank {run.rank}] %(message)s"))
        logger.addHandler(handler)
    return logger
