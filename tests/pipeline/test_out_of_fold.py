"""Out-of-fold cases for the ensemble stage: which members predict which case, and the maps cross-validation
stored read instead of running the members (mean, vote, missing and stale maps, multi-class, no member loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from autoseg2d.datalist import case_name
from autoseg2d.pipeline.postprocess import apply_postprocessing, choose_postprocessing
from autoseg2d.pipeline.ensemble import out_of_fold_cases
from autoseg2d.pipeline.predict import EnsemblePredictor, predict_images
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.conftest import bundle_folder, trained_further
from tests.ensemble_fakes import ClassInferer, FixedInferer, RefusingInferer, fake_ensemble


class FoldModel:
    """A member trained on every fold but its own: refuses to predict a case it trained on."""

    def __init__(self, fold: int, folds_of_cases: dict, lesion: np.ndarray):
        self.fold, self.folds_of_cases, self.lesion, self.seen = fold, folds_of_cases, lesion, []

    def infer(self, image):
        import torch

        case = Path(image).name
        assert self.folds_of_cases[case] == self.fold, f"member of fold {self.fold} predicted {case}, a training case"
        self.seen.append(case)
        return torch.from_numpy(np.stack([1 - self.lesion, self.lesion]).astype(np.float32))


def test_out_of_fold_cases_use_only_members_that_did_not_train_on_them_and_cover_every_case(tmp_path):
    entries, folds_of_cases = [], {}
    for i in range(6):
        case = make_head_ct(size=16, num_slices=4, seed=i)
        write_case(case, tmp_path / f"c{i}.nii.gz", tmp_path / f"l{i}.nii.gz")
        entries.append({"image": f"c{i}.nii.gz", "label": f"l{i}.nii.gz", "fold": i % 3})
        folds_of_cases[f"c{i}.nii.gz"] = i % 3
    lesion = np.zeros((16, 16, 4), np.float32)
    lesion[4:8, 4:8, 1] = 0.4  # never reaches 0.5: only the never-empty guarantee finds it
    members = [{"fold": f, "bundle": f"b{f}"} for f in (0, 1, 2, 2)]
    ensemble = {"mode": "mean", "members": members}
    ens = fake_ensemble("mean")
    ens.members = [FoldModel(m["fold"], folds_of_cases, lesion) for m in members]
    ens.bundles = [bundle_folder(tmp_path / m["bundle"]) for m in members]  # no stored maps: the members run
    cases = out_of_fold_cases(ens, ensemble, training=entries, dataroot=tmp_path)
    assert sorted(c["case_id"] for c in cases) == [f"c{i}" for i in range(6)]
    assert sorted(ens.members[3].seen) == sorted(ens.members[2].seen) == ["c2.nii.gz", "c5.nii.gz"]
    assert all(c["prob"].dtype == np.float16 for c in cases)  # what the ensemble stage passes on
    choice = choose_postprocessing(cases)
    assert choice["steps"][-1]["name"] == "keep_nonempty"
    assert apply_postprocessing(cases[0]["prob"], cases[0]["spacing_mm"], choice).sum() == 16


def member_lesion(index: int) -> np.ndarray:
    """Member `index`'s lesion probabilities (16 x 16 x 4), some within 1e-4 and 1e-3 of 0.5 on either side."""
    lesion = np.random.default_rng(index).uniform(0, 1, (16, 16, 4)).astype(np.float32)
    lesion[0, :4, index % 4] = [0.4999, 0.5001, 0.499, 0.501]
    return lesion


def stored_ensemble(root: Path, mode: str, member_folds=(0, 0, 1), store: bool = True):
    """Six 16 x 16 x 4 cases in two folds and one bundle folder per member (its fold from member_folds) that,
    with store, holds its maps of its own fold's cases as cross-validation stores them. Returns the predictor
    (FixedInferer members), the ensemble and the training cases ({training, dataroot})."""
    from autoseg2d.run.fold_probabilities import store_foreground

    entries = []
    for i in range(6):
        write_case(make_head_ct(size=16, num_slices=4, seed=i), root / f"c{i}.nii.gz", root / f"l{i}.nii.gz")
        entries.append({"image": f"c{i}.nii.gz", "label": f"l{i}.nii.gz", "fold": i % 2})
    members = [{"fold": fold, "bundle": f"m{index}"} for index, fold in enumerate(member_folds)]
    ens = fake_ensemble(mode)
    ens.members = [FixedInferer(member_lesion(index)) for index in range(len(members))]
    ens.bundles = [bundle_folder(root / m["bundle"]) for m in members]
    for inferer, bundle, member in zip(ens.members, ens.bundles, members):
        for entry in entries if store else ():
            if entry["fold"] == member["fold"]:
                store_foreground(bundle, case_name(entry["image"]), inferer.infer(entry["image"]).numpy())
        inferer.seen.clear()
    return ens, {"mode": mode, "members": members}, {"training": entries, "dataroot": root}


def test_out_of_fold_cases_read_the_stored_maps_and_run_no_member(tmp_path):
    from autoseg2d.run.fold_probabilities import LEVELS, load_foreground

    ens, ensemble, data = stored_ensemble(tmp_path, "mean")
    ens.members = [RefusingInferer() for _ in ens.members]
    cases = out_of_fold_cases(ens, ensemble, **data)
    assert [c["case_id"] for c in cases] == ["c0", "c2", "c4", "c1", "c3", "c5"]
    for case in cases:
        bundles = [b for b, m in zip(ens.bundles, ensemble["members"]) if m["fold"] == case["fold"]]
        mean = np.mean([load_foreground(b, case["case_id"]) / LEVELS for b in bundles], axis=0)
        assert case["prob"].dtype == np.float16 and case["truth"].dtype == np.uint8
        np.testing.assert_allclose(case["prob"], mean, rtol=0, atol=2 ** -11)  # float16's step below 1
        assert case["truth"].shape == case["prob"].shape and case["spacing_mm"] == pytest.approx((0.45, 0.45, 5.0))


def test_vote_from_the_stored_maps_equals_vote_from_running_the_members(tmp_path):
    run, ensemble, data = stored_ensemble(tmp_path / "run", "vote", store=False)
    stored, _, stored_data = stored_ensemble(tmp_path / "stored", "vote")
    reference = out_of_fold_cases(run, ensemble, **data)
    cases = out_of_fold_cases(stored, ensemble, **stored_data)
    assert all(member.seen for member in run.members) and not any(member.seen for member in stored.members)
    assert sorted(np.unique(np.concatenate([c["prob"].ravel() for c in cases]))) == pytest.approx([0, 0.5, 1])
    for case, expected in zip(cases, reference):
        assert case["case_id"] == expected["case_id"]
        np.testing.assert_array_equal(case["prob"], expected["prob"])


def test_a_member_without_a_stored_map_runs_its_fold_for_that_case_only(tmp_path, caplog):
    import logging
    import shutil

    from autoseg2d.run.fold_probabilities import foreground_file, probabilities_folder

    ens, ensemble, data = stored_ensemble(tmp_path, "mean")
    shutil.rmtree(probabilities_folder(ens.bundles[1]))  # fold 0's second member: cross-validated before maps
    foreground_file(ens.bundles[2], "c3").unlink()  # fold 1's member: one case's map lost
    with caplog.at_level(logging.INFO, logger="autoseg2d.pipeline.ensemble"):
        cases = out_of_fold_cases(ens, ensemble, **data)
    assert ens.members[0].seen == ens.members[1].seen == ["c0", "c2", "c4"]
    assert ens.members[2].seen == ["c3"]
    expected = {"c0": [0, 1], "c3": [2]}  # members run: their mean, in float32 before float16
    for case in (c for c in cases if c["case_id"] in expected):
        mean = np.mean([member_lesion(i) for i in expected[case["case_id"]]], axis=0)
        np.testing.assert_array_equal(case["prob"], mean.astype(np.float16))
    assert [r.message for r in caplog.records if "out-of-fold probabilities" in r.message] == [
        "ensemble: out-of-fold probabilities of 2 cases from the members' stored cross-validation maps, "
        "4 predicted by running the members"]


def test_a_multiclass_ensemble_runs_its_members_whatever_maps_are_stored(tmp_path):
    ens, ensemble, data = stored_ensemble(tmp_path, "mean", member_folds=(0, 1))
    seen = []

    class CountingClasses(ClassInferer):
        def infer(self, image):
            seen.append(case_name(image))
            return super().infer(image)

    ens.members = [CountingClasses(), CountingClasses()]
    cases = out_of_fold_cases(ens, ensemble, **data)
    assert sorted(seen) == [f"c{i}" for i in range(6)]
    assert all(c["prob"].shape == (4, 16, 16, 4) and c["prob"].dtype == np.float16 for c in cases)


def test_a_map_older_than_its_members_model_is_predicted_again_and_current_ones_are_read(tmp_path, caplog):
    import logging
    import os

    from autoseg2d.run.fold_probabilities import foreground_file

    ens, ensemble, data = stored_ensemble(tmp_path, "mean")
    stale = foreground_file(ens.bundles[2], "c3")  # fold 1's member, trained further after c3 was stored
    model = trained_further(ens.bundles[2], stale)
    model_ns = model.stat().st_mtime_ns
    for case, ns in (("c1", model_ns), ("c5", model_ns + 10 ** 9)):  # as new as the model, and newer: current
        os.utime(foreground_file(ens.bundles[2], case), ns=(ns, ns))
    with caplog.at_level(logging.INFO, logger="autoseg2d.run.fold_probabilities"):
        cases = out_of_fold_cases(ens, ensemble, **data)
    assert ens.members[2].seen == ["c3"] and ens.members[0].seen == ens.members[1].seen == []
    c3 = next(c for c in cases if c["case_id"] == "c3")
    np.testing.assert_array_equal(c3["prob"], member_lesion(2).astype(np.float16))  # the member's own output
    assert [r.message for r in caplog.records] == [
        f"{stale} is older than {model} (trained further since), so it is computed again"]


def ensemble_records(ensemble: dict) -> list[dict]:
    """Cross-validation records of stored_ensemble's members (bundle names relative to its root)."""
    return [{"bundle": m["bundle"], "score": 0.9 - 0.1 * index, "fold": m["fold"], "seed": 0, "variant": "v"}
            for index, m in enumerate(ensemble["members"])]


def test_the_ensemble_stage_loads_no_member_when_every_map_is_stored_and_each_member_once_to_predict(
        tmp_path, monkeypatch):
    from autoseg2d.pipeline import predict as predict_module
    from autoseg2d.pipeline.ensemble import make_ensemble
    from autoseg2d.run.workdir import WorkDir

    _, stored, data = stored_ensemble(tmp_path, "mean")
    work = WorkDir(tmp_path.resolve())

    def refuse(bundle):
        raise AssertionError(f"{bundle}'s InferClass was built, though every out-of-fold map was stored")

    monkeypatch.setattr(predict_module, "load_inferer", refuse)
    built = make_ensemble(work, ensemble_records(stored), 3, "mean", **data)
    assert [m["bundle"] for m in built["members"]] == ["m0", "m1", "m2"] and built["postprocessing"]
    loads = Counter()

    def load(bundle):
        loads[bundle.name] += 1
        return FixedInferer(member_lesion(int(bundle.name[1:])))

    monkeypatch.setattr(predict_module, "load_inferer", load)
    predictor = EnsemblePredictor(work, built)
    assert predictor.class_names() == ["hemorrhage"] and not loads  # from the bundle's config
    results = predict_images(predictor, [tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz"], tmp_path / "out")
    assert [r["case"] for r in results] == ["c0", "c1"] and (tmp_path / "out" / "c1.nii.gz").is_file()
    assert loads == {"m0": 1, "m1": 1, "m2": 1}
    assert all(member.seen == ["c0", "c1"] for member in predictor.members)
