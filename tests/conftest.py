"""Shared fixtures: small synthetic head-CT sets and fast training settings.

The template's scripts are put on sys.path the way a bundle's train.py sees them
(plain sibling modules), so tests import e.g. ``inputs`` and ``volumes`` directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autoseg2d.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "algorithm_templates"
TEMPLATE = TEMPLATES / "segresnet2d"
SCRIPTS = TEMPLATE / "scripts"
sys.path.insert(0, str(SCRIPTS))

# Small but real: a 3-level network on 64 x 64 crops trains in seconds on 2 CPU cores.
FAST_TRAINING = {
    "roi_size": [64, 64],
    "batch_size": 8,
    "num_workers": 0,
    "num_epochs_per_validation": 5,
    "learning_rate": 0.003,
    "network#init_filters": 8,
    "network#blocks_down": [1, 1, 1, 1],
    "network#dsdepth": 3,
}


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory) -> Path:
    """8 training cases (2 folds) + 2 testing cases of 64 x 64 x 12 CT; returns the datalist path."""
    return write_dataset(tmp_path_factory.mktemp("ct"), num_train=8, num_test=2, num_folds=2, num_slices=12)


@pytest.fixture
def bundle(tmp_path, ct_dataset) -> Path:
    """A copy of the template with paths filled by hand (no planning), ready for train.py."""
    import shutil

    import yaml

    target = tmp_path / "segresnet2d_0"
    shutil.copytree(TEMPLATE, target)
    config_file = target / "configs" / "hyper_parameters.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.update(bundle_root=str(target), data_list_file_path=str(ct_dataset),
                  data_file_base_dir=str(ct_dataset.parent))
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return target
