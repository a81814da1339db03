"""Beyond binary CT: multi-class labels and MRI (z-score normalization instead of CT windows)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from bundle_config import load_config
from infer import InferClass
from trainer import Trainer

from autoseg2d.synthetic.head_ct import write_dataset
from tests.conftest import FAST_TRAINING, TEMPLATE


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_three_class_training_and_inference(tmp_path, modality):
    datalist = write_dataset(tmp_path / "data", num_train=4, num_test=1, num_folds=2, num_slices=6, num_classes=2)
    bundle = tmp_path / "segresnet2d_0"
    shutil.copytree(TEMPLATE, bundle)
    config_file = bundle / "configs" / "hyper_parameters.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.update(data_list_file_path=str(datalist), data_file_base_dir=str(datalist.parent), output_classes=3,
                  modality=modality, num_epochs=2, num_epochs_per_validation=1)
    config_file.write_text(yaml.safe_dump(config))

    best = Trainer(load_config(str(config_file), **FAST_TRAINING)).fit()
    assert 0.0 <= best <= 1.0
    image = datalist.parent / json.loads(datalist.read_text())["testing"][0]["image"]
    probabilities = InferClass(str(config_file), **FAST_TRAINING).infer(str(image))
    assert probabilities.shape == (3, 64, 64, 6)
