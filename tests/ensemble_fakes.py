"""Stand-ins for bundles' InferClass, and an EnsemblePredictor built from them, for the ensemble, greedy
selection and case-report tests (no network runs)."""

from __future__ import annotations

import numpy as np

from autoseg2d.datalist import case_name
from autoseg2d.pipeline.predict import EnsemblePredictor


class FixedInferer:
    """A binary bundle returning the same lesion probabilities for any image; notes each case it predicts."""

    config = {"output_classes": 2}

    def __init__(self, lesion_probability: np.ndarray):
        self.lesion, self.seen = lesion_probability, []

    def infer(self, image):
        import torch

        self.seen.append(case_name(image))
        return torch.from_numpy(np.stack([1 - self.lesion, self.lesion]).astype(np.float32))


class ClassInferer:
    """A 3-class bundle: class ids in one half of a 16 x 16 x 4 volume, with named classes."""

    config = {"output_classes": 4, "class_names": ["IPH", "IVH", "SAH"]}

    def infer(self, image):
        import torch

        probabilities = np.zeros((4, 16, 16, 4), np.float32)
        probabilities[0] = 1.0
        probabilities[:, 2:6, 2:6, 1] = np.eye(4, dtype=np.float32)[1][:, None, None]  # 16 voxels of IPH
        probabilities[:, 8:10, 8:10, 2] = np.eye(4, dtype=np.float32)[3][:, None, None]  # 4 voxels of SAH
        return torch.from_numpy(probabilities)


class RefusingInferer:
    """A member that must not run (its stored maps were there to read)."""

    config = {"output_classes": 2}

    def infer(self, image):
        raise AssertionError(f"a member ran on {image}, whose stored map was there to read")


def fake_ensemble(mode: str, *members) -> EnsemblePredictor:
    """An EnsemblePredictor of the given members (inferers, or lesion maps for FixedInferers), no bundles."""
    ensemble = EnsemblePredictor.__new__(EnsemblePredictor)
    ensemble.members = [FixedInferer(m) if isinstance(m, np.ndarray) else m for m in members]
    ensemble.mode, ensemble.postprocessing, ensemble.screen = mode, None, None
    return ensemble
