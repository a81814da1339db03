"""Ensemble members, averaging and case-by-case prediction that keeps finished cases."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from autoseg2d.datalist import case_name
from autoseg2d.pipeline.postprocess import choose_postprocessing
from autoseg2d.pipeline.ensemble import out_of_fold_cases, select_members
from autoseg2d.pipeline.predict import EnsemblePredictor, predict_images
from autoseg2d.run.inference import read_mask
from autoseg2d.synthetic.head_ct import make_head_ct, write_case
from tests.conftest import native_bf16_only
from tests.ensemble_fakes import ClassInferer, RefusingInferer, fake_ensemble


PAPER_FOLD_DICE = (0.730, 0.851, 0.821, 0.762, 0.816)


def cv_records(fold_dice=PAPER_FOLD_DICE, runs: int = 9) -> list[dict]:
    """3 variants x 3 runs x 5 folds = 45 bundles whose scores follow their fold's difficulty."""
    rng = np.random.default_rng(0)
    return [{"bundle": f"v{run // 3}-s{run % 3}-f{fold}", "score": dice + rng.normal(0, 0.01), "fold": fold,
             "seed": run % 3, "variant": f"v{run // 3}"}
            for run in range(runs) for fold, dice in enumerate(fold_dice)]


def test_fold_balanced_gives_the_hardest_folds_members():
    """The 18 best scores overall would all come from folds 1, 2 and 4; every fold gets its share."""
    assert {r["fold"] for r in sorted(cv_records(), key=lambda r: -r["score"])[:18]} == {1, 2, 4}
    new = select_members(cv_records(), 18)
    per_fold = Counter(m["fold"] for m in new)
    assert len(new) == 18 and set(per_fold) == set(range(5)) and min(per_fold.values()) == 3
    assert all({"fold", "variant", "seed", "score", "reason", "rank_in_fold"} <= m.keys() for m in new)
    assert sum(m["reason"].startswith("extra") for m in new) == 3
    for fold in range(5):  # each fold's members are its best bundles
        scores = sorted((r["score"] for r in cv_records() if r["fold"] == fold), reverse=True)
        assert sorted((m["score"] for m in new if m["fold"] == fold), reverse=True) == scores[:per_fold[fold]]


def test_one_easy_fold_still_gives_every_fold_members_and_small_ensembles_cover_every_fold():
    easy = cv_records(fold_dice=(0.95, 0.5, 0.5, 0.5, 0.5))
    assert Counter(m["fold"] for m in select_members(easy, 5)) == {f: 1 for f in range(5)}
    assert Counter(m["fold"] for m in select_members(easy, 2)) == {f: 1 for f in range(5)}  # raised to one per fold
    few = [r for r in easy if r["fold"] != 0 or r["seed"] == 0 and r["variant"] == "v0"]  # fold 0: one bundle
    members = select_members(few, 10)
    assert len(members) == 10 and Counter(m["fold"] for m in members)[0] == 1
    with pytest.raises(ValueError, match="unknown member selection strategy 'best'.*fold_balanced"):
        select_members(easy, 5, "best")


def test_mean_and_vote():
    a, b, c = (np.full((2, 2, 2), v, np.float32) for v in (0.9, 0.4, 0.45))
    assert fake_ensemble("mean", a, b, c).probabilities("x")[1, 0, 0, 0] == np.float32((0.9 + 0.4 + 0.45) / 3)
    vote = fake_ensemble("vote", a, b, c).probabilities("x")
    assert vote[1, 0, 0, 0] == np.float32(1 / 3)
    assert fake_ensemble("vote", a, b, c).mask(vote, (1, 1, 1)).max() == 0


def test_prediction_keeps_finished_cases_and_ignores_leftover_temp_files(tmp_path):
    images = []
    for i in range(3):
        case = make_head_ct(size=16, num_slices=4, seed=i)
        write_case(case, tmp_path / "in" / f"c{i}.nii.gz", None)
        images.append(tmp_path / "in" / f"c{i}.nii.gz")
    out = tmp_path / "out"
    lesion = np.zeros((16, 16, 4), np.float32)
    lesion[4:8, 4:8, 1] = 0.9
    predict_images(fake_ensemble("mean", lesion), images[:1], out)  # a finished case from an earlier run
    finished = (out / "c0.nii.gz").stat().st_mtime_ns
    (out / ".tmp_c1.nii.gz").write_bytes(b"half")  # what a kill during writing leaves behind
    results = predict_images(fake_ensemble("mean", lesion), images, out)
    assert [r["case"] for r in results] == ["c1", "c2"]
    assert (out / "c0.nii.gz").stat().st_mtime_ns == finished
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
        predict_images(fake_ensemble("mean", lesion), images, tmp_path / "out")
    with pytest.raises(ValueError, match="holds the input images"):
        predict_images(fake_ensemble("mean", lesion), images[:1], tmp_path / "siteA")
    assert not (tmp_path / "out").exists()


def test_multiclass_prediction_writes_class_ids_and_prints_ml_per_class(tmp_path, capsys):
    write_case(make_head_ct(size=16, num_slices=4, seed=0), tmp_path / "in" / "c0.nii.gz", None)
    ensemble = fake_ensemble("mean", ClassInferer())
    results = predict_images(ensemble, [tmp_path / "in" / "c0.nii.gz"], tmp_path / "out")
    mask = np.asanyarray(nib.load(str(tmp_path / "out" / "c0.nii.gz")).dataobj)
    assert sorted(np.unique(mask)) == [0, 1, 3]
    voxel_ml = 0.45 * 0.45 * 5.0 / 1000
    assert results[0]["class_volume_ml"] == pytest.approx({"IPH": 16 * voxel_ml, "IVH": 0.0, "SAH": 4 * voxel_ml})
    assert "hemorrhage 0.02 mL (IPH 0.02, IVH 0.00, SAH 0.00)" in capsys.readouterr().out


def test_the_ensemble_applies_the_binary_choice_only_to_two_classes_and_the_rescue_setting_to_both_kinds():
    faint = np.full((2, 2, 2), 0.2, np.float32)
    ensemble = fake_ensemble("mean", faint)
    ensemble.postprocessing = {"threshold": 0.5, "steps": [{"name": "keep_nonempty", "floor": 0.1}]}
    three = np.stack([1 - faint, faint / 4, faint * 3 / 4])  # class 2 wins nowhere: all background
    three[:, 0, 0, 0] = [0.3, 0.1, 0.6]
    mask, peak = ensemble.postprocess(three, (1, 1, 1))  # a binary choice on 3 classes: the argmax only
    assert np.array_equal(mask, three.argmax(0)) and mask.sum() == 2 and peak is None
    ensemble.postprocessing = {"kind": "multiclass", "per_class": {"1": {"threshold": 0.5, "steps": []},
                                                                   "2": {"threshold": 0.5, "steps": []}},
                               "foreground": {"threshold": 0.5, "steps": [{"name": "keep_nonempty", "floor": 0.1}]}}
    empty = np.stack([1 - faint, faint / 4, faint * 3 / 4])
    assert ensemble.postprocess(empty, (1, 1, 1))[0].all()  # rescued: the faint map is one component
    ensemble.never_empty = False
    mask, peak = ensemble.postprocess(empty, (1, 1, 1))
    assert not mask.any() and peak == pytest.approx(0.2, abs=1e-3)


class ScreeningInferer:
    """A member of a screened ensemble whose screen left slices to it: summed lesion probabilities of 0.4 per
    member, and no whole mask for the two later members."""

    config = {"output_classes": 2}
    shared_inputs = "one pass"

    def infer_screened(self, image, members, screen, vote, member_masks, where, complete_if):
        lesion = np.full((2, 2, 2), 0.4 * len(members), np.float32)
        masks = [np.zeros((2, 2, 2), np.uint8), None, None]
        return np.stack([len(members) - lesion, lesion]), masks, 3


def test_a_screened_ensemble_means_over_every_member_not_only_those_with_whole_masks():
    ensemble = fake_ensemble("mean", ScreeningInferer(), ScreeningInferer(), ScreeningInferer())
    ensemble.screen = {"members": [0], "below": 0.25}
    ensemble.postprocessing = {"threshold": 0.5, "steps": []}
    mask, whole, skipped, peak = ensemble.predict("x", (1, 1, 1))
    assert not mask.any() and len(whole) == 1 and skipped == 3 and peak is None  # a mean of 0.4 < 0.5


@pytest.fixture(scope="module")
def trained_members(tmp_path_factory, ct_dataset):
    """Bundle A trained briefly (finds the lesions), and B: A's model with another inference batch size, so
    an ensemble [A, A, B] has two input groups. Returns (bundles, validation cases)."""
    import shutil

    import yaml
    from bundle_config import load_config
    from trainer import Trainer

    from tests.conftest import configured_bundle

    root = tmp_path_factory.mktemp("members")
    a = root / "a" / "segresnet2d_0"
    config_file = configured_bundle(a, ct_dataset, num_epochs=15, num_epochs_per_validation=15)
    Trainer(load_config(str(config_file))).fit()
    b = root / "b" / "segresnet2d_0"
    shutil.copytree(a, b)
    config = yaml.safe_load(config_file.read_text())
    config["infer_batch_size"] = 3
    (b / "configs" / "hyper_parameters.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cases = [{"image": ct_dataset.parent / e["image"], "label": ct_dataset.parent / e["label"]}
             for e in json.loads(ct_dataset.read_text())["training"] if e["fold"] == 0]
    return [a, a, b], cases


def ensemble_of(bundles, precision=None) -> EnsemblePredictor:
    from autoseg2d.run.inference import load_inferer

    members = [load_inferer(bundle, infer_cpu_runtime="torch") for bundle in bundles]  # not OpenVINO, where installed
    for member in members:  # in the given precision
        member.predictor.dtype = precision
    ensemble = EnsemblePredictor.__new__(EnsemblePredictor)
    ensemble.members, ensemble.mode, ensemble.postprocessing, ensemble.screen = members, "mean", None, None
    return ensemble


def test_a_member_loads_with_overrides_of_its_config(trained_members):
    from autoseg2d.run.inference import load_inferer

    bundles, _ = trained_members
    member = load_inferer(bundles[0], infer_tta=True, infer_cpu_runtime="torch")
    assert member.config["infer_tta"] is True and len(member.predictor.flips) == 4 and member.predictor.network is None


def test_shared_inputs_keep_the_ensemble_answers(trained_members):
    """The ensemble as it was (each member reads the image itself, fp32) against the shared path: members grouped
    by their inputs give the same probabilities and masks (bf16: test_bf16_keeps_the_ensemble_dice)."""
    from autoseg2d.evaluation.metrics import dice_score
    from autoseg2d.run.inference import read_mask

    bundles, cases = trained_members
    old, shared = ensemble_of(bundles), ensemble_of(bundles)
    scores = []
    for case in cases:
        truth, _ = read_mask(case["label"])
        alone = [m.infer(str(case["image"])).numpy() for m in old.members]
        reference = np.mean(alone, axis=0)
        together, masks = shared.probabilities(case["image"], return_members=True)
        np.testing.assert_allclose(together, reference, atol=1e-5)
        for mask, probabilities in zip(masks, alone):
            np.testing.assert_array_equal(mask, probabilities.argmax(0))
        scores.append(dice_score(reference.argmax(0), truth))
    assert min(scores) > 0.3  # a model that finds the lesions, so the comparison means something
    subset = shared.probabilities(cases[0]["image"], members=shared.members[2:])
    np.testing.assert_allclose(subset, old.members[2].infer(str(cases[0]["image"])).numpy(), atol=1e-5)


@native_bf16_only
def test_bf16_keeps_the_ensemble_dice(trained_members):
    """Where the product runs bf16 (native units): mean Dice within 0.002 of fp32 (measured +0.001), and only a
    few voxels at lesion borders change."""
    import torch

    from autoseg2d.evaluation.metrics import dice_score

    bundles, cases = trained_members
    fp32, bf16 = ensemble_of(bundles), ensemble_of(bundles, torch.bfloat16)
    scores: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for case in cases:
        truth, _ = read_mask(case["label"])
        masks = {"fp32": fp32.probabilities(case["image"]).argmax(0),
                 "bf16": bf16.probabilities(case["image"]).argmax(0)}
        for precision, mask in masks.items():
            scores[precision].append(dice_score(mask, truth))
        assert np.mean(masks["fp32"] != masks["bf16"]) < 1e-3
    assert min(scores["fp32"]) > 0.3  # a model that finds the lesions, so the comparison means something
    assert abs(np.mean(scores["bf16"]) - np.mean(scores["fp32"])) <= 0.002, scores


def test_a_screened_ensemble_gives_the_masks_of_every_member_on_every_slice(trained_members):
    """Three copies of one trained model: where the screening member sees no foreground the others see none
    either, so screening must give the whole ensemble's masks while skipping slices; the report gets the masks
    of members that ran on every slice; where the never-empty rescue would act, every member runs everywhere."""
    bundles, cases = trained_members
    full, screened = ensemble_of([bundles[0]] * 3), ensemble_of([bundles[0]] * 3)
    screened.screen = {"members": [1], "below": 0.05}
    skipped = []
    for case in cases:
        _, spacing = read_mask(case["label"])
        mask, member_masks, count, _ = screened.predict(case["image"], spacing)
        np.testing.assert_array_equal(mask, full.mask(full.probabilities(case["image"]), spacing))
        assert len(member_masks) == (1 if count else 3)
        skipped.append(count)
    assert sum(skipped) > 0, skipped  # a test of nothing if no slice was left to the screening member
    emptied = {"threshold": 0.5, "steps": [{"name": "remove_small_components", "min_volume_ml": 1e6},
                                           {"name": "keep_nonempty", "floor": 0.05}]}
    full.postprocessing = screened.postprocessing = emptied
    case = cases[int(np.argmax(skipped))]
    _, spacing = read_mask(case["label"])
    mask, member_masks, count, _ = screened.predict(case["image"], spacing)
    assert count == 0 and len(member_masks) == 3 and mask.any()
    np.testing.assert_array_equal(mask, full.mask(full.probabilities(case["image"]), spacing))


def test_a_screened_ensemble_reports_the_masks_of_its_screening_members_in_order(trained_members, trained_bundle):
    """Distinct members, the screening one in the middle: on a case with slices skipped, the report gets that
    member's own mask (the others skipped slices: no whole mask); the predicted mask is post-processed."""
    bundles, cases = trained_members
    other = trained_bundle.parents[1]  # another model (2 epochs), cut into the same batches
    screened = ensemble_of([other, bundles[0], other])
    screened.screen = {"members": [1], "below": 0.25}
    alone = ensemble_of([bundles[0]]).members[0]
    counts = []
    for case in cases:
        spacing = read_mask(case["label"])[1]
        mask, member_masks, count, _ = screened.predict(case["image"], spacing)
        counts.append(count)
        if count:
            assert len(member_masks) == 1
            np.testing.assert_array_equal(member_masks[0], alone.infer(str(case["image"])).numpy().argmax(0))
    assert any(counts), counts
    screened.screen = {"members": [1, 1], "below": 0.25}
    with pytest.raises(ValueError, match=r"screen members \[1, 1\] are not distinct.*ensemble/ensemble.json"):
        screened.predict(cases[0]["image"], read_mask(cases[0]["label"])[1])


def test_each_folds_first_member_screens_and_a_screen_of_every_member_is_none():
    from autoseg2d.pipeline.ensemble import screen_settings, screening_members

    members = [{"fold": f} for f in (0, 0, 1, 1, 1, 2)]
    assert screening_members(members) == [0, 2, 5]
    assert screen_settings(members, 0.05) == {"members": [0, 2, 5], "below": 0.05}
    assert screen_settings(members, None) is None and screen_settings(members, 0) is None
    assert screen_settings([{"fold": 0}, {"fold": 1}], 0.05) is None  # nobody left to skip anything


@pytest.mark.cpu_isa
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed (extra: cpu)")
def test_openvino_members_keep_the_ensemble_dice(trained_members):
    """Where OpenVINO is installed (auto picks it on CPUs): f32 gives the old path's masks, bf16 its Dice where the
    product would run bf16 (native units). Skipped before its members are trained where there is no OpenVINO."""
    from predictor import cpu_has_native_bf16
    from runtime import OpenVINONetwork

    from autoseg2d.evaluation.metrics import dice_score
    from autoseg2d.run.inference import read_mask

    bundles, cases = trained_members
    old = ensemble_of(bundles)
    runs = {}
    for precision in ("f32", "bf16") if cpu_has_native_bf16() else ("f32",):
        runs[precision] = ensemble_of(bundles)
        for member, bundle in zip(runs[precision].members, bundles):
            member.predictor.network = OpenVINONetwork(member.predictor.model, len(member.predictor.plan),
                                                       bundle / "model" / "model_openvino.xml", precision == "bf16")
    scores: dict[str, list[float]] = {"old": [], **{precision: [] for precision in runs}}
    for case in cases:
        truth, _ = read_mask(case["label"])
        reference = old.probabilities(case["image"])
        scores["old"].append(dice_score(reference.argmax(0), truth))
        for precision, ensemble in runs.items():
            probabilities = ensemble.probabilities(case["image"])
            scores[precision].append(dice_score(probabilities.argmax(0), truth))
            if precision == "f32":
                np.testing.assert_array_equal(probabilities.argmax(0), reference.argmax(0))
    for precision in runs:
        assert abs(np.mean(scores[precision]) - np.mean(scores["old"])) <= 0.002, scores


def test_out_of_fold_cases_from_stored_maps_match_running_the_trained_members(trained_members, ct_dataset,
                                                                              monkeypatch):
    """The maps stored as cross-validation stores them (InferClass.infer, store_foreground) against the
    members run again: each probability within 1/255 (plus float16), votes equal, the same post-processing."""
    import shutil

    from autoseg2d.run.fold_probabilities import probabilities_folder, store_foreground
    from autoseg2d.run.inference import load_inferer
    from autoseg2d.run.workdir import WorkDir

    bundles, cases = trained_members
    bundles = bundles[1:]  # A and B: two input groups, and fewer scans to predict than [A, A, B]
    training = [e for e in json.loads(ct_dataset.read_text())["training"] if e["fold"] == 0]  # the members' fold
    data = {"training": training, "dataroot": ct_dataset.parent}
    ensemble = {"mode": "mean", "members": [{"fold": 0, "bundle": str(bundle)} for bundle in bundles]}
    ens = EnsemblePredictor(WorkDir(ct_dataset.parent), ensemble)
    try:
        rerun = {}
        for mode in ("mean", "vote"):
            ens.mode = mode
            rerun[mode] = out_of_fold_cases(ens, ensemble, **data)
        for bundle in bundles:
            inferer = load_inferer(bundle)
            for case in cases:
                store_foreground(bundle, case_name(case["image"]), inferer.infer(str(case["image"])).numpy())
        monkeypatch.setattr(ens, "probabilities", lambda image, members: RefusingInferer().infer(image))
        for mode in ("mean", "vote"):
            ens.mode = mode
            stored = out_of_fold_cases(ens, ensemble, **data)
            assert [c["case_id"] for c in stored] == [c["case_id"] for c in rerun[mode]] and len(stored) == 4
            for case, expected in zip(stored, rerun[mode]):
                difference = np.abs(case["prob"].astype(np.float32) - expected["prob"].astype(np.float32))
                assert difference.max() <= (1 / 255 + 1e-3 if mode == "mean" else 0)
                np.testing.assert_array_equal(case["truth"], expected["truth"])
            assert choose_postprocessing(stored)["steps"] == choose_postprocessing(rerun[mode])["steps"]
    finally:
        for bundle in bundles:
            shutil.rmtree(probabilities_folder(bundle), ignore_errors=True)
