"""End to end on the hard generator: a bundle trained as BundleGen writes it, predicting held-out cases through the
product's predict path, must beat every fixed HU window on those same cases by a clear margin.

On the demo generator a fixed 50-150 HU threshold scores Dice 0.93-0.97 with no learning, so a floor there cannot
tell a model that learned from one that thresholds. On the hard generator acute blood (50-90 HU) shares its
densities with noisy brain, calcified mimics, the falx and beam-hardening streaks, and most bleeds are small.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from autoseg2d.evaluation.metrics import dice_score
from autoseg2d.pipeline.predict import EnsemblePredictor, predict_images
from autoseg2d.run.profiles import load_profile
from autoseg2d.run.workdir import WorkDir
from autoseg2d.synthetic.hard import write_hard_dataset
from tests.conftest import SUBPROCESS_TIMEOUT_S, configured_bundle

# The `cpu` profile's network (4 levels, 16 filters) on 128 px slices, cropped and batched as the planner does for
# them on a CPU (96 px, 4 per step), for half the profile's steps at a rate inside its searched range: about a
# minute on 2 cores. fold -1 trains on all 20 training cases; the 8 testing cases are never seen.
HARD_TRAINING = {
    **load_profile("cpu")["train_overrides"],
    "num_steps": 600,
    "learning_rate": 0.001,
    "roi_size": [96, 96],
    "batch_size": 4,
    "input_variant": "windows",
    "fold": -1,
}
# Fixed thresholds on the raw HU, none learned: acute-blood windows and the demo's. The best of them is chosen on
# the testing cases themselves, so the baseline is stronger than any rule fixed beforehand.
FIXED_WINDOWS_HU = ((40, 90), (45, 80), (50, 90), (55, 85), (60, 100), (50, 150))
# Measured (torch 2.13 CPU, 2-core AMD EPYC): the bundle's mean Dice 0.49 (0.49 with oneDNN capped to AVX2) against
# 0.147 for the best window; on two other generator seeds 0.43 and 0.44 against 0.123 and 0.133. The same bundle's
# masks moved one slice along z still scored 0.31-0.36, so this test guards learning, not alignment (the exact
# slice tests in tests/template/test_screen.py catch a one-slice shift).
MARGIN_OVER_BEST_WINDOW = 0.15


@pytest.fixture(scope="module")
def hard_predictions(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    datalist = write_hard_dataset(root / "data", num_train=20, num_test=8, num_folds=2, size_px=128, seed=0)
    config = configured_bundle(root / "bundle", datalist, **HARD_TRAINING)
    result = subprocess.run([sys.executable, str(root / "bundle" / "scripts" / "train.py"), "run",
                             f"--config_file={config}"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    testing = json.loads(datalist.read_text())["testing"]
    images = [datalist.parent / entry["image"] for entry in testing]
    ensemble = {"mode": "mean", "members": [{"fold": -1, "bundle": str(root / "bundle")}]}
    predict_images(EnsemblePredictor(WorkDir(root), ensemble), images, root / "predictions")
    return [(image, datalist.parent / entry["label"], root / "predictions" / image.name)
            for entry, image in zip(testing, images)]


def read(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_a_trained_bundle_beats_every_fixed_hu_window_on_held_out_hard_cases(hard_predictions):
    model, windows = [], {window: [] for window in FIXED_WINDOWS_HU}
    for image, label, mask in hard_predictions:
        truth, hu = read(label) > 0, read(image)
        model.append(float(dice_score(read(mask) > 0, truth)))
        for low, high in FIXED_WINDOWS_HU:
            windows[(low, high)].append(float(dice_score((hu >= low) & (hu <= high), truth)))
    best_window = max(FIXED_WINDOWS_HU, key=lambda window: np.mean(windows[window]))
    baseline = float(np.mean(windows[best_window]))
    print(f"held-out hard cases: bundle Dice {np.mean(model):.3f} {[round(s, 3) for s in model]}; "
          f"best fixed window {best_window} HU {baseline:.3f}")
    assert baseline > 0.05  # the windows find some blood, so beating them is not beating nothing
    assert np.mean(model) > baseline + MARGIN_OVER_BEST_WINDOW
