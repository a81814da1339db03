"""What predict guarantees about the masks it hands out: post-processing replayed, never empty (and said so),
only scans in HU, and no stale mask kept from another ensemble or input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from autoseg2d.pipeline.predict import predict_images
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.conftest import bundle_folder
from tests.ensemble_fakes import RefusingInferer, fake_ensemble
from tests.test_console import run_cli

SHAPE = (16, 16, 4)  # make_head_ct(size=16, num_slices=4): 0.45 x 0.45 x 5 mm, one voxel ~0.001 mL
VOXEL_ML = 0.45 * 0.45 * 5.0 / 1000
RESCUE = {"threshold": 0.5, "steps": [{"name": "keep_nonempty", "floor": 0.05}]}


def scans(folder, count: int = 2, offset_hu: int = 0) -> list:
    images = []
    for seed in range(count):
        case = make_head_ct(size=SHAPE[0], num_slices=SHAPE[2], seed=seed)
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image((case.image_hu + offset_hu).astype(np.int16), case.affine),
                 str(folder / f"c{seed}.nii.gz"))
        images.append(folder / f"c{seed}.nii.gz")
    return images


def ensemble_of(lesion: np.ndarray, postprocessing: dict | None = None, identity: str = "A", never_empty=True):
    ensemble = fake_ensemble("mean", lesion)
    ensemble.postprocessing, ensemble.identity, ensemble.never_empty = postprocessing, identity, never_empty
    return ensemble


def read(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def rows_of(out) -> dict:
    return {row["case"]: row for row in json.loads((out / "report.json").read_text())["rows"]}


def test_the_binary_mask_replays_the_ensembles_post_processing(tmp_path):
    """Fails if EnsemblePredictor skipped binary post-processing: the speck is 8 voxels, above one voxel's volume
    and under the threshold of 0.02 mL, and without cleaning it would stay in the mask."""
    lesion = np.zeros(SHAPE, np.float32)
    lesion[2:6, 2:6, 1:3] = 0.9  # 32 voxels, 0.032 mL
    lesion[11:13, 11:13, 1:3] = 0.8  # 8 voxels, 0.008 mL
    choice = {"threshold": 0.5, "steps": [{"name": "remove_small_components", "min_volume_ml": 0.02}]}
    ensemble = ensemble_of(lesion, choice)
    probabilities = np.stack([1 - lesion, lesion])
    assert 8 * VOXEL_ML > VOXEL_ML and 8 * VOXEL_ML < 0.02 < 32 * VOXEL_ML
    np.testing.assert_array_equal(ensemble.mask(probabilities, (0.45, 0.45, 5.0)), lesion == np.float32(0.9))
    results = predict_images(ensemble, scans(tmp_path / "in", 1), tmp_path / "out")
    assert read(tmp_path / "out" / "c0.nii.gz").sum() == 32
    assert results[0]["volume_ml"] == pytest.approx(32 * VOXEL_ML, rel=1e-6)


def test_a_case_below_the_floor_is_rescued_at_predict_time_and_says_so(tmp_path, capsys):
    """Fails if the rescue were not applied at predict time: the ensemble's map peaks at 0.04, under the floor."""
    lesion = np.full(SHAPE, 0.001, np.float32)
    lesion[5:8, 5:8, 2] = 0.03
    lesion[6, 6, 2] = 0.04
    results = predict_images(ensemble_of(lesion, RESCUE), scans(tmp_path / "in", 1), tmp_path / "out")
    mask = read(tmp_path / "out" / "c0.nii.gz")
    assert mask.sum() == 9 and mask[5:8, 5:8, 2].all()
    row = rows_of(tmp_path / "out")["c0"]
    assert "rescued" in row["flags"] and "empty" not in row["flags"]
    assert row["rescue_peak_probability"] == pytest.approx(0.04)
    assert results[0]["rescue"] == "rescued"
    assert "c0.nii.gz: rescued: the ensemble found no voxel above 0.5" in capsys.readouterr().out
    csv = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert "rescue_peak_probability" in csv[0].split(",") and ",rescued," in csv[1]


def test_with_the_rescue_off_the_mask_stays_empty_and_the_report_names_the_case(tmp_path, capsys):
    lesion = np.full(SHAPE, 0.001, np.float32)
    lesion[6, 6, 2] = 0.04
    predict_images(ensemble_of(lesion, RESCUE, never_empty=False), scans(tmp_path / "in", 1), tmp_path / "out")
    assert not read(tmp_path / "out" / "c0.nii.gz").any()
    row = rows_of(tmp_path / "out")["c0"]
    assert row["flags"][:1] == ["empty"] and "would be rescued" in row["flags"]
    assert row["rescue_peak_probability"] == pytest.approx(0.04)
    assert "would be rescued: the ensemble found no voxel above 0.5; left empty" in capsys.readouterr().out


def test_a_scan_not_in_hu_is_refused_before_any_network_runs_or_mask_is_written(tmp_path):
    good = scans(tmp_path / "good", 1)
    stored = [path.rename(path.with_name("s0.nii.gz"))  # stored values without the intercept: air at about 0
              for path in scans(tmp_path / "stored", 1, offset_hu=1024)]
    with pytest.raises(ValueError) as refused:
        predict_images(fake_ensemble("mean", RefusingInferer()), good + stored, tmp_path / "out")
    message = str(refused.value)
    assert str(stored[0]) in message and "nothing below -500 HU" in message and "RescaleIntercept" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


def test_the_cli_refuses_a_scan_not_in_hu_in_one_line(tmp_path):
    work = tmp_path / "work"
    bundle_folder(work / "bundles" / "b0")
    (work / "ensemble").mkdir(parents=True)
    (work / "ensemble" / "ensemble.json").write_text(json.dumps({"mode": "mean", "members": [
        {"bundle": "bundles/b0", "score": 0.5, "fold": 0, "seed": 0, "variant": "v"}], "postprocessing": None}))
    stored = scans(tmp_path / "in", 1, offset_hu=1024)
    result = run_cli("predict", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--work_dir", str(work), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(stored[0]) in error[0] and "not Hounsfield units" in error[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


def test_an_old_folder_is_predicted_again_unless_this_ensemble_wrote_it_from_this_scan(tmp_path, capsys):
    lesion = np.zeros(SHAPE, np.float32)
    lesion[4:8, 4:8, 1] = 0.9
    images, out = scans(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    (out / "c0.nii.gz").write_bytes(b"an old mask, written by an earlier version without a record")
    assert [r["case"] for r in predict_images(ensemble_of(lesion), images, out)] == ["c0", "c1"]
    assert read(out / "c0.nii.gz").sum() == 16
    assert [r["case"] for r in predict_images(ensemble_of(lesion), images, out)] == []  # this ensemble's: kept
    assert "done before by this ensemble from this scan, kept" in capsys.readouterr().out

    other = lesion.copy()
    other[10:12, 10:12, 2] = 0.9
    assert [r["case"] for r in predict_images(ensemble_of(other, identity="B"), images, out)] == ["c0", "c1"]
    assert read(out / "c0.nii.gz").sum() == 20 and "predicted again" in capsys.readouterr().out
    assert rows_of(out)["c0"]["written_by"]["ensemble"] == "B"

    write_case(make_head_ct(size=SHAPE[0], num_slices=SHAPE[2], seed=7), images[1], None)  # a new scan, same name
    assert [r["case"] for r in predict_images(ensemble_of(other, identity="B"), images, out)] == ["c1"]
    switched = ensemble_of(other, identity="B", never_empty=False)
    assert [r["case"] for r in predict_images(switched, images, out)] == ["c0", "c1"]
