"""Greedy member selection on stored out-of-fold maps where the right answer is known, fold by fold."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg2d.datalist import case_name
from autoseg2d.evaluation.metrics import case_metrics
from autoseg2d.pipeline import crossval, greedy_members, predict
from autoseg2d.pipeline.ensemble import build_ensemble, select_greedy
from autoseg2d.run.fold_probabilities import LEVELS, load_foreground, quantize, store_foreground
from autoseg2d.pipeline.greedy_members import load_fold, members_per_fold
from autoseg2d.run.workdir import WorkDir
from tests.conftest import bundle_folder, trained_further
from tests.ensemble_fakes import FixedInferer

SHAPE = (8, 8, 2)
SPACING_MM = (0.45, 0.45, 5.0)
HALF_A, HALF_B = (slice(0, 2), slice(0, 4), 0), (slice(4, 6), slice(0, 4), 0)  # 8 lesion voxels each


def lesion_map(a: float, b: float, rest: float | np.ndarray = 0.0) -> np.ndarray:
    probability = np.broadcast_to(np.asarray(rest, np.float32), SHAPE).copy()
    probability[HALF_A], probability[HALF_B] = a, b
    return probability


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, SHAPE).astype(np.float32)


# fold -> bundle name -> (validation score, lesion probability map); the truth is halves A and B.
# Fold 0: "noise" scores best on validation but only adds false positives; "half_a" and "half_b" each find
# one half (Dice 0.667 alone), their mean finds both (Dice 1.0).
# Fold 1: "good" finds the lesion, "weak" (p 0.3) alone finds nothing, but does not hurt "good".
FOLDS = {
    0: {"noise": (0.90, lambda case: noise(case)), "half_a": (0.80, lambda case: lesion_map(1.0, 0.2)),
        "half_b": (0.70, lambda case: lesion_map(0.2, 1.0))},
    1: {"weak": (0.65, lambda case: lesion_map(0.3, 0.3)), "good": (0.60, lambda case: lesion_map(0.9, 0.9))},
}


def write_fold_data(tmp_path: Path) -> tuple[WorkDir, dict, list[dict]]:
    """Two validation cases per fold with labels on disk; each bundle stores maps of its own fold's cases only.
    Returns the work dir, the training cases ({training, dataroot}) and the cross-validation records."""
    work = WorkDir.create(tmp_path / "work")
    truth = lesion_map(1.0, 1.0).astype(np.uint8)
    entries, records = [], []
    for fold, bundles in FOLDS.items():
        cases = [f"f{fold}c{i}" for i in range(2)]
        for case in cases:
            nib.save(nib.Nifti1Image(truth, np.diag([*SPACING_MM, 1.0])), tmp_path / f"{case}_label.nii.gz")
            entries.append({"image": f"{case}.nii.gz", "label": f"{case}_label.nii.gz", "fold": fold})
        for name, (score, make) in bundles.items():
            bundle = bundle_folder(work.bundles / name / f"segresnet2d_{fold}")
            for number, case in enumerate(cases):
                lesion = make(number + 10 * fold)
                store_foreground(bundle, case, np.stack([1 - lesion, lesion]))
            records.append({"bundle": work.relative(bundle), "score": score, "fold": fold, "seed": 0,
                            "variant": name})
    return work, {"training": tuple(entries), "dataroot": tmp_path}, records


def test_greedy_drops_the_noisy_member_and_pairs_the_complementary_ones_within_each_fold(tmp_path):
    work, data, records = write_fold_data(tmp_path)
    members, greedy = select_greedy(work, records, size=6, tolerance=0.0, **data)
    chosen = {(m["fold"], m["variant"]) for m in members}
    assert chosen == {(0, "half_a"), (0, "half_b"), (1, "good"), (1, "weak")}  # the noise, best on score, left out
    assert greedy["per_fold"] == {0: 2, 1: 2}  # fold balance: the same count from each fold's own bundles
    first_of_fold_0 = next(m for m in members if m["fold"] == 0)
    assert first_of_fold_0["variant"] == "half_a" and first_of_fold_0["reason"].startswith("greedy step 1 of fold 0")
    curve = {row["members_per_fold"]: row for row in greedy["curve"]}
    assert curve[1]["dice"] == pytest.approx((2 / 3 * 2 + 1.0 * 2) / 4, abs=1e-4)  # one member: half_a, good
    assert curve[2]["dice"] == pytest.approx(1.0, abs=1e-4) and curve[2]["num_hd_inf"] == 0
    assert curve[2]["dice_by_score"] < 0.9  # each fold's 2 best validation scores: noise + half_a, weak + good
    assert curve[3]["dice"] < curve[2]["dice"]  # the noise added last lowers it
    assert curve[2]["hd_mm_mean"] == pytest.approx(0.0)
    by_size = select_greedy(work, records, size=2, tolerance=None, **data)[0]
    assert {(m["fold"], m["variant"]) for m in by_size} == {(0, "half_a"), (1, "good")}


def test_a_fold_is_predicted_only_by_its_own_bundles(tmp_path, monkeypatch):
    work, data, records = write_fold_data(tmp_path)
    fold_1_bundle = work.absolute(records[-1]["bundle"])
    with pytest.raises(FileNotFoundError, match="only its own validation fold"):
        load_foreground(fold_1_bundle, "f0c0")
    reads = []

    def spy(bundle, case_id):
        reads.append((int(Path(bundle).name.split("_")[-1]), int(case_id[1])))  # (bundle's fold, case's fold)
        return load_foreground(bundle, case_id)

    monkeypatch.setattr(greedy_members, "load_foreground", spy)
    select_greedy(work, records, size=4, tolerance=None, **data)
    assert sorted(set(reads)) == [(0, 0), (1, 1)] and len(reads) == 2 * 3 + 2 * 2  # each bundle, its 2 cases


def test_members_per_fold_by_size_gives_extra_places_to_the_largest_gain_and_by_tolerance_the_fewest():
    paths = {0: [0.5, 0.7, 0.71], 1: [0.6, 0.65, 0.9]}
    counts = {0: 10, 1: 10}
    assert members_per_fold(paths, counts, size=5, tolerance=None) == {0: 2, 1: 3}
    assert members_per_fold(paths, counts, size=1, tolerance=None) == {0: 1, 1: 1}  # at least one per fold
    assert members_per_fold(paths, counts, size=6, tolerance=0.2) == {0: 2, 1: 2}  # 0.675 within 0.2 of 0.805
    assert members_per_fold(paths, counts, size=6, tolerance=0.0) == {0: 3, 1: 3}
    assert members_per_fold(paths, counts, size=4, tolerance=0.0) == {0: 2, 1: 2}  # size caps the count
    flat = {0: [0.8, 0.8, 0.8], 1: [0.7, 0.7, 0.7]}
    assert members_per_fold(flat, counts, size=6, tolerance=0.0) == {0: 1, 1: 1}  # ties: fewer members


def test_metrics_on_the_reduced_case_equal_those_of_the_whole_scan(tmp_path):
    work, data, records = write_fold_data(tmp_path)
    fold_0 = [r for r in records if r["fold"] == 0]
    cases = crossval.validation_cases(0, **data)
    fold_cases = load_fold([work.absolute(r["bundle"]) for r in fold_0], cases)
    truth = lesion_map(1.0, 1.0).astype(np.uint8)
    for members in ([0], [0, 1], [0, 1, 2], [1, 2]):
        mean = np.mean([load_foreground(work.absolute(fold_0[i]["bundle"]), "f0c1").astype(float) for i in members],
                       axis=0)
        whole = case_metrics((mean > LEVELS / 2).astype(np.uint8), truth, SPACING_MM)
        reduced = fold_cases[1].metrics(members)
        assert {k: reduced[k] for k in ("dice", "nsd", "hd_mm", "pred_volume_ml")} == pytest.approx(
            {k: whole[k] for k in ("dice", "nsd", "hd_mm", "pred_volume_ml")})
    vote = load_fold([work.absolute(r["bundle"]) for r in fold_0], cases, vote=True)
    assert vote[0].dice([1, 2]) < 0.01  # as masks, half_a and half_b tie on every lesion voxel: no majority


def test_cross_validation_stores_the_maps_it_predicts_and_old_bundles_predict_them_once(tmp_path, monkeypatch):
    work, data, _ = write_fold_data(tmp_path)
    lesion = lesion_map(0.7, 0.1)
    inferer = FixedInferer(lesion)
    monkeypatch.setattr(crossval, "load_inferer", lambda bundle: inferer)
    bundle = bundle_folder(work.bundles / "new" / "segresnet2d_0")
    crossval.evaluate_bundle(bundle, 0, crossval.validation_cases(0, **data))
    np.testing.assert_array_equal(load_foreground(bundle, "f0c0"), quantize(lesion))
    assert load_foreground(bundle, "f0c0").dtype == np.uint8
    old = bundle_folder(work.bundles / "old" / "segresnet2d_0")
    monkeypatch.setattr(greedy_members, "load_inferer", lambda bundle: inferer)
    inferer.seen.clear()
    greedy_members.ensure_stored(old, crossval.validation_cases(0, **data))
    greedy_members.ensure_stored(old, crossval.validation_cases(0, **data))
    assert inferer.seen == ["f0c0", "f0c1"]  # predicted once, then read
    np.testing.assert_array_equal(load_foreground(old, "f0c1"), quantize(lesion))


def test_cross_validation_evaluates_again_when_the_bundle_trained_further_and_reuses_a_current_result(
        tmp_path, monkeypatch, caplog):
    import logging

    from autoseg2d.run.fold_probabilities import foreground_file
    from autoseg2d.templates import bundle_files

    work, data, _ = write_fold_data(tmp_path)
    validation = crossval.validation_cases(0, **data)
    loads = []
    inferers = iter([FixedInferer(lesion_map(0.7, 0.1)), FixedInferer(lesion_map(0.9, 0.9))])

    def load(bundle):
        loads.append(bundle)
        return next(inferers)

    monkeypatch.setattr(crossval, "load_inferer", load)
    bundle = bundle_folder(work.bundles / "resumed" / "segresnet2d_0")
    first = crossval.evaluate_bundle(bundle, 0, validation)
    cv_metrics = bundle_files(bundle).cv_metrics
    model = trained_further(bundle, cv_metrics, foreground_file(bundle, "f0c0"), foreground_file(bundle, "f0c1"))
    with caplog.at_level(logging.INFO, logger="autoseg2d.run.fold_probabilities"):
        again = crossval.evaluate_bundle(bundle, 0, validation)
    assert len(loads) == 2 and first[0]["dice"] < 0.9 and again[0]["dice"] == pytest.approx(1.0, abs=1e-4)
    assert json.loads(cv_metrics.read_text()) == json.loads(json.dumps(again))  # rewritten with the new model's
    np.testing.assert_array_equal(load_foreground(bundle, "f0c0"), quantize(lesion_map(0.9, 0.9)))
    assert [r.message for r in caplog.records] == [
        f"{cv_metrics} is older than {model} (trained further since), so it is computed again"]
    assert crossval.evaluate_bundle(bundle, 0, validation) == again and len(loads) == 2  # now current: reused


def test_greedy_selection_predicts_again_a_map_older_than_its_bundles_model(tmp_path, monkeypatch):
    import os

    from autoseg2d.run.fold_probabilities import foreground_file

    work, data, _ = write_fold_data(tmp_path)
    bundle = work.bundles / "half_a" / "segresnet2d_0"
    model_ns = trained_further(bundle, foreground_file(bundle, "f0c1")).stat().st_mtime_ns
    os.utime(foreground_file(bundle, "f0c0"), ns=(model_ns, model_ns))  # as new as the model: current
    inferer = FixedInferer(lesion_map(0.1, 0.8))
    monkeypatch.setattr(greedy_members, "load_inferer", lambda bundle: inferer)
    greedy_members.ensure_stored(bundle, crossval.validation_cases(0, **data))
    assert inferer.seen == ["f0c1"]  # the current map of f0c0 is read
    np.testing.assert_array_equal(load_foreground(bundle, "f0c1"), quantize(lesion_map(0.1, 0.8)))
    np.testing.assert_array_equal(load_foreground(bundle, "f0c0"), quantize(lesion_map(1.0, 0.2)))


class StoredInferer:
    """A member that predicts from its stored validation maps: it can predict only its own fold's cases."""

    config = {"output_classes": 2}

    def __init__(self, bundle: Path):
        self.bundle = bundle

    def infer(self, image):
        import torch

        lesion = load_foreground(self.bundle, case_name(image)).astype(np.float32) / LEVELS
        return torch.from_numpy(np.stack([1 - lesion, lesion]))


def test_the_ensemble_stage_with_greedy_selection_writes_and_prints_its_table(tmp_path, monkeypatch, capsys):
    work, data, records = write_fold_data(tmp_path)
    monkeypatch.setattr(predict, "load_inferer", StoredInferer)
    built = build_ensemble(work, records, size=6, mode="mean", selection="greedy", tolerance=0.0, **data)
    assert built["selection"] == "greedy" and len(built["members"]) == 4
    stored = json.loads(work.ensemble_file.read_text())
    assert stored["greedy"]["per_fold"] == {"0": 2, "1": 2} and len(stored["greedy"]["curve"]) == 3
    table = (work.ensemble_file.parent / "member_selection.md").read_text()
    assert "| 2 (chosen) | 4 | 1.0000 |" in table
    assert "| 2 (chosen) | 4 | 1.0000 |" in capsys.readouterr().out
    assert built["postprocessing"]["baseline"]["dice_mean"] == pytest.approx(1.0, abs=1e-4)
