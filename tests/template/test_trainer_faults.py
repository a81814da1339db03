"""Trainer faults: bad cases stop before training, GPU OOM names the setting, crash leftovers never poison a rerun."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bundle_config import load_config
from gpu_memory import MemorySettings, out_of_memory_advice
from trainer import Trainer
from volumes import VolumeError

from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.conftest import FAST_TRAINING

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(bundle: Path, **changes) -> dict:
    return load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **{**FAST_TRAINING, **changes})


def small_datalist(root: Path, empty_label: int | None = None) -> Path:
    training = []
    for i in range(4):
        case = make_head_ct(size=32, num_slices=6, num_lesions=1, seed=i)
        if i == empty_label:
            case = type(case)(case.image_hu, np.zeros_like(case.label), case.affine)
        write_case(case, root / f"img/c{i}.nii.gz", root / f"lab/c{i}.nii.gz")
        training.append({"image": f"img/c{i}.nii.gz", "label": f"lab/c{i}.nii.gz", "fold": i % 2})
    (root / "datalist.json").write_text(json.dumps({"training": training}))
    return root / "datalist.json"


def test_every_bad_case_is_listed_before_training(bundle, tmp_path):
    datalist = small_datalist(tmp_path)
    (tmp_path / "img/c0.nii.gz").unlink()
    write_case(make_head_ct(size=32, num_slices=1, seed=2), tmp_path / "img/c2.nii.gz", tmp_path / "lab/c2.nii.gz")
    with pytest.raises(VolumeError) as raised:
        Trainer(config(bundle, data_list_file_path=str(datalist), data_file_base_dir=str(tmp_path)))
    message = str(raised.value)
    assert f"2 of 2 validation cases cannot be used; fix them or remove them from {datalist}" in message
    assert "case c0: file not found" in message and "case c2 (" in message and "1 axial slice" in message
    assert not (bundle / "model" / "model_last.pt").exists()


def test_empty_label_is_logged_not_refused(bundle, tmp_path):
    datalist = small_datalist(tmp_path, empty_label=1)
    Trainer(config(bundle, data_list_file_path=str(datalist), data_file_base_dir=str(tmp_path)))
    assert "case c1 (" in (bundle / "model" / "training.log").read_text()
    assert "the label is empty (no foreground voxel)" in (bundle / "model" / "training.log").read_text()


@pytest.mark.parametrize(
    ("step", "advice"),
    [
        ("train_epoch", "GPU out of memory while training with batch_size=8, roi_size=[64, 64], amp=True: "
                        "lower batch_size first (e.g. --batch_size=4), then roi_size"),
        ("validate", "GPU out of memory during validation with infer_batch_size=16 whole slices per forward pass: "
                     "lower infer_batch_size (e.g. --infer_batch_size=8)"),
    ],
)
def test_gpu_out_of_memory_names_the_setting_to_lower(bundle, monkeypatch, step, advice):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer = Trainer(config(bundle, num_epochs=1, num_epochs_per_validation=1))
    monkeypatch.setattr(trainer, step, out_of_memory)
    if step == "validate":
        monkeypatch.setattr(trainer, "train_epoch", lambda epoch: 1.0)
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:
        trainer.fit()
    assert advice in str(raised.value) and "(CUDA out of memory. Tried to allocate 2.00 GiB)" in str(raised.value)


def test_inference_out_of_memory_advice():
    advice = out_of_memory_advice("inference", MemorySettings(32, (384, 384), True, infer_batch_size=1))
    assert "infer_batch_size=1" in advice and "--infer_batch_size=1" in advice


def test_crash_leftovers_are_dropped_on_resume(bundle):
    """A run killed after writing model.pt/progress.yaml (or half a log row) but before model_last.pt."""
    Trainer(config(bundle, num_epochs=2, num_epochs_per_validation=1)).fit()
    model_dir = bundle / "model"
    with open(model_dir / "training_log.csv", "a") as log:
        log.write("3,0.51")  # half a row
    progress = yaml.safe_load((model_dir / "progress.yaml").read_text())
    stale = {"best_avg_dice_score": 0.987654, "best_epoch": 3, "input_variant": "both", "fold": 0}
    (model_dir / "progress.yaml").write_text(yaml.safe_dump([*progress, stale], sort_keys=False))

    Trainer(config(bundle, num_epochs=3, num_epochs_per_validation=1)).fit()
    rows = list(csv.DictReader((model_dir / "training_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and all(r["loss"] != "0.51" for r in rows)
    entries = yaml.safe_load((model_dir / "progress.yaml").read_text())
    assert 0.987654 not in [e["best_avg_dice_score"] for e in entries]
    assert [e["best_epoch"] for e in entries] == sorted({e["best_epoch"] for e in entries})
    assert list(model_dir.glob("*.tmp")) == []
    assert set(torch.load(model_dir / "model_last.pt", weights_only=False)["rng"]) >= {"python", "numpy", "torch"}
