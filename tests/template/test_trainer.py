"""Training on generated CT: it learns, logs, keeps the best checkpoint and resumes."""

import csv

import pytest
import yaml
from bundle_config import load_config
from trainer import Trainer

from tests.conftest import FAST_TRAINING

# An all-background model scores 0 here (every validation case has a lesion), and a random
# model about 2 * lesion fraction < 0.05; 0.6 needs real localisation of the lesions.
LEARNED_DICE = 0.6


def train(bundle, **changes):
    settings = {**FAST_TRAINING, **changes}
    return Trainer(load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **settings)).fit()


def test_short_cpu_training_learns_the_lesions(bundle):
    best = train(bundle, num_epochs=30)
    assert best > LEARNED_DICE

    model_dir = bundle / "model"
    progress = yaml.safe_load((model_dir / "progress.yaml").read_text())
    assert progress[-1]["best_avg_dice_score"] == pytest.approx(best)
    rows = list(csv.DictReader((model_dir / "training_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 31))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert sum(1 for r in rows if r["val_dice"]) == 6
    assert float(rows[0]["learning_rate"]) == pytest.approx(0.003)
    assert float(rows[-1]["learning_rate"]) < 1e-4  # cosine towards zero
    assert "epoch 30/30" in (model_dir / "training.log").read_text()


def test_rerun_continues_from_the_last_epoch(bundle):
    train(bundle, num_epochs=4, num_epochs_per_validation=2)
    train(bundle, num_epochs=6, num_epochs_per_validation=2)
    rows = list(csv.DictReader((bundle / "model" / "training_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "resumed from" in (bundle / "model" / "training.log").read_text()


def test_resume_off_starts_again(bundle):
    train(bundle, num_epochs=2, num_epochs_per_validation=1)
    train(bundle, num_epochs=1, num_epochs_per_validation=1, resume=False)
    rows = list(csv.DictReader((bundle / "model" / "training_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1]
