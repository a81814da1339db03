"""Ensemble members, averaging and case-by-case prediction that keeps finished cases."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from autoseg2d.pipeline.ensemble import EnsemblePredictor, predict_images, select_members
from autoseg2d.synthetic import make_head_ct, write_case


class FixedInferer:
    """Stands in for a bundle's InferClass: returns the same probabilities for any image."""

    def __init__(self, lesion_probability: np.ndarray):
        self.lesion = lesion_probability

    def infer(self, image):
        import torch

        return torch.from_numpy(np.stack([1 - self.lesion, self.lesion]).astype(np.float32))


def predictor(mode: str, *lesions: np.ndarray) -> EnsemblePredictor:
    ensemble = EnsemblePredictor.__new__(EnsemblePredictor)
    ensemble.members, ensemble.mode, ensemble.postprocessing = [FixedInferer(p) for p in lesions], mode, None
    return ensemble


def test_best_members_across_variants_and_folds():
    records = [{"bundle": f"b{i}", "score": s, "fold": i % 2, "seed": 0, "variant": "v"}
               for i, s in enumerate([0.5, 0.9, 0.7, 0.8])]
    assert [m["bundle"] for m in select_members(records, 2)] == ["b1", "b3"]


def test_mean_and_vote():
    a, b, c = (np.full((2, 2, 2), v, np.float32) for v in (0.9, 0.4, 0.45))
    assert predictor("mean", a, b, c).probabilities("x")[1, 0, 0, 0] == np.float32((0.9 + 0.4 + 0.45) / 3)
    vote = predictor("vote", a, b, c).probabilities("x")
    assert vote[1, 0, 0, 0] == np.float32(1 / 3)
    assert predictor("vote", a, b, c).mask(vote, (1, 1, 1)).max() == 0


def test_prediction_keeps_finished_cases_and_ignores_leftover_temp_files(tmp_path):
    images = []
    for i in range(3):
        case = make_head_ct(size=16, num_slices=4, seed=i)
        write_case(case, tmp_path / "in" / f"c{i}.nii.gz", None)
        images.append(tmp_path / "in" / f"c{i}.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "c0.nii.gz").write_bytes(b"finished before")  # a finished case from an earlier run
    (out / ".tmp_c1.nii.gz").write_bytes(b"half")  # what a kill during writing leaves behind
    lesion = np.zeros((16, 16, 4), np.float32)
    lesion[4:8, 4:8, 1] = 0.9
    results = predict_images(predictor("mean", lesion), images, out)
    assert [r["case"] for r in results] == ["c1", "c2"]
    assert (out / "c0.nii.gz").read_bytes() == b"finished before"
    written = nib.load(str(out / "c1.nii.gz"))
    assert written.get_data_dtype() == np.uint8 and np.asanyarray(written.dataobj).sum() == 16
    assert results[0]["volume_ml"] == pytest.approx(16 * 0.45 * 0.45 * 5.0 / 1000, rel=1e-6)


def test_prediction_refuses_clashing_names_and_writing_over_the_inputs(tmp_path):
    images = []
    for site in ("siteA", "siteB"):
        write_case(make_head_ct(size=16, num_slices=4, seed=0), tmp_path / site / "001.nii.gz", None)
        images.append(tmp_path / site / "001.nii.gz")
    lesion = np.zeros((16, 16, 4), np.float32)
    with pytest.raises(ValueError, match=r"more than once .*\(001.nii.gz\)"):
        predict_images(predictor("mean", lesion), images, tmp_path / "out")
    with pytest.raises(ValueError, match="holds the input images"):
        predict_images(predictor("mean", lesion), images[:1], tmp_path / "siteA")
    assert not (tmp_path / "out").exists()
