"""Shared fixtures: small synthetic head-CT sets and fast training settings.

The template's scripts are put on sys.path the way a bundle's train.py sees them
(plain sibling modules), so tests import e.g. ``inputs`` and ``volumes`` directly. Plain
sys.path is right here, not autoseg2d.templates' loader: the tests exercise the template as
MONAI runs it (one scripts folder, plain names), and that loader keeps every copy it loads out
of sys.modules, so the driver's copies and these never mix.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from autoseg2d.run.profiles import load_profile
from autoseg2d.synthetic.head_ct import write_dataset

# Two torch processes on the same cores (two copies of the suite, or the suite beside other work): libgomp's
# default spin-wait has each wait out the other's descheduled threads, so a training child took about 5x as long
# as alone instead of 2x; 1000 spins (libgomp's own count for an oversubscribed team) keep that 2x and cost little
# alone. It changes no result. Set before torch is imported, so this process and every child started inherit it.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "algorithm_templates"
TEMPLATE = TEMPLATES / "segresnet2d"
SCRIPTS = TEMPLATE / "scripts"
sys.path.insert(0, str(SCRIPTS))

# Small but real: the demo profile's network (a 4-level network of 8 initial filters) and loader settings, owned
# by autoseg2d/run/profiles.yaml, train in seconds on 2 CPU cores. The tests choose their own epochs, crop
# the 64 px synthetic slices whole, validate every 5 epochs and train at one fixed learning rate inside the demo's
# searched range, so their assertions do not depend on a draw.
DEMO_TRAINING = load_profile("demo")["train_overrides"]
FAST_TRAINING = {
    **{key: value for key, value in DEMO_TRAINING.items() if key not in ("num_epochs", "num_epochs_per_validation")},
    "roi_size": [64, 64],
    "num_epochs_per_validation": 5,
    "learning_rate": 0.003,
}
# The whole-pipeline tests (the CLI, AutoRunner, slice thickness) train many bundles: one level fewer than the
# demo's network keeps them short, and their Dice floors were measured with it.
TINY_NETWORK = {"network#init_filters": DEMO_TRAINING["network#init_filters"], "network#blocks_down": [1, 1, 1],
                "network#dsdepth": 2}


# A bound for a hung child process, not a speed claim: a Python start that imports torch and MONAI takes seconds,
# minutes on a machine that a second copy of the suite loads as well.
SUBPROCESS_TIMEOUT_S = 600


@pytest.fixture
def one_torch_thread():
    """Results are bit-identical for a fixed thread count; one thread also keeps a shared 2-core machine fast."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def configured_bundle(target: Path, datalist: Path, **settings) -> Path:
    """A copy of the template at `target` with FAST_TRAINING, the data paths and `settings` ('a#b' reaches nested
    keys) written into its config, as BundleGen would have; returns the config file."""
    import shutil

    import yaml
    from bundle_config import set_nested

    shutil.copytree(TEMPLATE, target)
    config_file = target / "configs" / "hyper_parameters.yaml"
    config = yaml.safe_load(config_file.read_text())
    for key, value in {**FAST_TRAINING, "bundle_root": str(target), "data_list_file_path": str(datalist),
                       "data_file_base_dir": str(datalist.parent), **settings}.items():
        set_nested(config, key, value, str(config_file))
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_file


def bundle_folder(path: Path) -> Path:
    """A bundle folder as far as the places of its files go: its config names ckpt_path, as BundleGen's does."""
    config = path / "configs" / "hyper_parameters.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("bundle_root: ''\nckpt_path: \"$@bundle_root + '/model'\"\n")
    return path


def trained_further(bundle: Path, *results: Path) -> Path:
    """Write the bundle's model.pt and date `results` (files its model wrote) 1 s before it, as if the bundle
    trained further after writing them; returns model.pt."""
    import os

    from autoseg2d.templates import bundle_files

    model = bundle_files(bundle).model
    model.write_bytes(b"weights")
    older = model.stat().st_mtime_ns - 10 ** 9
    for path in results:
        os.utime(path, ns=(older, older))
    return model


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory) -> Path:
    """8 training cases (2 folds) + 2 testing cases of 64 x 64 x 12 CT; returns the datalist path."""
    return write_dataset(tmp_path_factory.mktemp("ct"), num_train=8, num_test=2, num_folds=2, num_slices=12)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, ct_dataset) -> Path:
    """A bundle trained for 2 epochs on ct_dataset (fold 0), shared by the tests that only read it; returns its
    config file."""
    from bundle_config import load_config
    from trainer import Trainer

    config_file = configured_bundle(tmp_path_factory.mktemp("trained") / "segresnet2d_0", ct_dataset, num_epochs=2,
                                    num_epochs_per_validation=1)
    Trainer(load_config(str(config_file))).fit()
    return config_file


@pytest.fixture
def foldless(tmp_path) -> Path:
    """6 training cases without "fold" keys (the pipeline must split them) + 1 testing case; the datalist path."""
    import json

    datalist = write_dataset(tmp_path / "data", num_train=6, num_test=1, num_folds=2, size=32, num_slices=4)
    content = json.loads(datalist.read_text())
    for entry in content["training"]:
        del entry["fold"]
    datalist.write_text(json.dumps(content))
    return datalist


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


def native_bf16_only(test):
    """For a test of bf16 inference: it runs where the product would use bf16 (predictor.cpu_has_native_bf16, which
    honours a ONEDNN_MAX_CPU_ISA cap) and skips elsewhere; marked cpu_isa, so CI runs it again under an AVX2 cap."""
    from predictor import cpu_has_native_bf16

    reason = "no native bf16 here (AMX or AVX-512 bf16, within ONEDNN_MAX_CPU_ISA): the product runs fp32 on this CPU"
    return pytest.mark.cpu_isa(pytest.mark.skipif(not cpu_has_native_bf16(), reason=reason)(test))
