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


def test_the_best_checkpoint_rebuilds_with_configparser_alone_and_older_ones_still_load(trained_bundle, ct_dataset,
                                                                                        tmp_path):
    """model.pt holds config["network"] and best_metric as MONAI's own templates store them: ConfigParser alone
    builds the network, which loads state_dict strictly and gives InferClass's probabilities. A checkpoint
    without them (written before they were saved) still loads in InferClass and gives the same masks."""
    import json
    import shutil

    import numpy as np
    import torch
    from infer import InferClass
    from monai.bundle import ConfigParser

    config = load_config(str(trained_bundle))
    checkpoint_file = tmp_path / "model" / "model.pt"
    shutil.copytree(config["ckpt_path"], checkpoint_file.parent)
    checkpoint = torch.load(checkpoint_file, weights_only=False)
    assert checkpoint["best_metric"] == checkpoint["best_avg_dice_score"] > 0
    network = ConfigParser({"network": checkpoint["config"]["network"]}).get_parsed_content("network")
    network.load_state_dict(checkpoint["state_dict"], strict=True)
    network.eval()

    infer = InferClass(str(trained_bundle), device="cpu", ckpt_path=str(checkpoint_file.parent))
    image = ct_dataset.parent / json.loads(ct_dataset.read_text())["testing"][0]["image"]
    batch = next(infer.predictor.batches(infer.read(str(image))[1])).x
    with torch.no_grad():
        ours, theirs = infer.predictor.model(batch), network(batch)
    torch.testing.assert_close(torch.softmax(theirs, 1), torch.softmax(ours, 1), atol=1e-5, rtol=0)

    expected = infer.infer(str(image)).numpy()
    torch.save({k: v for k, v in checkpoint.items() if k not in ("config", "best_metric")}, checkpoint_file)
    older = InferClass(str(trained_bundle), device="cpu", ckpt_path=str(checkpoint_file.parent))
    np.testing.assert_array_equal(older.infer(str(image)).numpy(), expected)


def test_fold_minus_one_trains_on_every_case_and_the_driver_finds_it_trained(tmp_path, ct_dataset):
    """fold -1 validates nothing, yet leaves what the driver's train_bundle needs: model.pt (the last weights,
    no score) and one finished progress.yaml entry; a second call finds the bundle trained."""
    import math

    import torch

    from autoseg2d.run.bundles import is_trained, train_bundle
    from tests.conftest import configured_bundle

    bundle = configured_bundle(tmp_path / "student", ct_dataset, fold=-1, num_epochs=2).parents[1]
    score = train_bundle(bundle, "student", datalist=ct_dataset, dataroot=ct_dataset.parent)
    assert math.isnan(score) and is_trained(bundle)
    model_dir = bundle / "model"
    progress = yaml.safe_load((model_dir / "progress.yaml").read_text())
    assert progress == [{"best_avg_dice_score": None, "best_epoch": 2, "input_variant": "both", "fold": -1,
                         "finished": True, "num_epochs": 2, "num_steps": progress[0]["num_steps"]}]
    checkpoint = torch.load(model_dir / "model.pt", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["best_metric"] is None and checkpoint["config"]["network"]
    last = torch.load(model_dir / "model_last.pt", weights_only=False)
    torch.testing.assert_close(checkpoint["state_dict"], last["model"], rtol=0, atol=0)
    rows = list(csv.DictReader((model_dir / "training_log.csv").open()))
    assert [r["val_dice"] for r in rows] == ["", ""]
    log = (model_dir / "training.log").read_text()
    assert "fold -1: every training case, no validation" in log and "loaded 8 training volumes" in log
    assert "loaded 0 validation volumes" in log
    assert math.isnan(train_bundle(bundle, "student", datalist=ct_dataset, dataroot=ct_dataset.parent))


def test_fold_minus_one_resumes_and_keeps_one_entry(bundle):
    import math

    train(bundle, fold=-1, num_epochs=1)
    assert math.isnan(train(bundle, fold=-1, num_epochs=2))
    progress = yaml.safe_load((bundle / "model" / "progress.yaml").read_text())
    assert [(p["best_epoch"], p["finished"]) for p in progress] == [(2, True)]
    rows = list(csv.DictReader((bundle / "model" / "training_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert "resumed from" in (bundle / "model" / "training.log").read_text()
