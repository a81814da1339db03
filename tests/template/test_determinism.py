"""deterministic: true (the default): two seeded CPU runs give identical validation metrics and checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from bundle_config import load_config
from trainer import Trainer

from tests.conftest import FAST_TRAINING

# oneDNN picks other kernels per instruction set: runs must repeat bit for bit on each (.ci/run caps it to AVX2)
pytestmark = [pytest.mark.cpu_isa, pytest.mark.usefixtures("one_torch_thread")]


def train(bundle: Path, run: str, **changes) -> Path:
    """Two short epochs, validated after each, into <bundle>/<run>; returns that checkpoint folder."""
    settings = {**FAST_TRAINING, "num_epochs": 2, "num_epochs_per_validation": 1, "resume": False,
                "ckpt_path": str(bundle / run), **changes}
    trainer = Trainer(load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **settings))
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    trainer.fit()
    return bundle / run


def validation_dice(run: Path) -> list[str]:
    return [row["val_dice"] for row in csv.DictReader((run / "training_log.csv").open())]


def tensors(run: Path) -> dict[str, torch.Tensor]:
    """Weights, and the AdamW moments that decide every later step."""
    state = torch.load(run / "model_last.pt", map_location="cpu", weights_only=False)
    moments = {f"adam.{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}
    return {**state["model"], **moments}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [key for key in a if not torch.equal(a[key], b[key])]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_seeded_cpu_runs_are_identical(bundle, num_workers):
    first = train(bundle, "first", num_workers=num_workers)
    second = train(bundle, "second", num_workers=num_workers)
    assert validation_dice(first) == validation_dice(second)
    assert differing(tensors(first), tensors(second)) == []
    best = [torch.load(run / "model.pt", map_location="cpu", weights_only=False) for run in (first, second)]
    assert best[0]["best_avg_dice_score"] == best[1]["best_avg_dice_score"]
    assert differing(best[0]["state_dict"], best[1]["state_dict"]) == []


def test_another_seed_trains_another_model(bundle):
    """The comparison above is not vacuous: the seed reaches initialisation, sampling and augmentation."""
    assert len(differing(tensors(train(bundle, "seed0")), tensors(train(bundle, "seed1", seed=1)))) > 0


def test_the_number_of_loader_workers_does_not_change_the_result(bundle):
    """Each sample carries its own seed, so 0 and 2 workers train the same model."""
    in_process = train(bundle, "in_process", num_workers=0)
    with_workers = train(bundle, "with_workers", num_workers=2)
    assert validation_dice(in_process) == validation_dice(with_workers)
    assert differing(tensors(in_process), tensors(with_workers)) == []
