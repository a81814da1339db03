"""run_autoseg.py export: a MONAI bundle that `monai.bundle run` executes without this repository, same masks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest

from autoseg2d.pipeline.export import ExportError, export_bundle
from autoseg2d.pipeline.runner import predict
from tests.conftest import TEMPLATE, configured_bundle

POSTPROCESSING = {"threshold": 0.5, "steps": [{"name": "remove_small_components", "min_volume_ml": 0.001}],
                  "rule": "hand-made for the test", "baseline": {}, "selected": {}, "evaluated": []}


def train_member(bundle, datalist, fold: int, epochs: int = 1) -> float:
    from bundle_config import load_config
    from trainer import Trainer

    config_file = configured_bundle(bundle, datalist, fold=fold, num_epochs=epochs, num_epochs_per_validation=epochs,
                                    input_variant="slices")
    return Trainer(load_config(str(config_file))).fit()


@pytest.fixture(scope="module")
def finished_work(tmp_path_factory, ct_dataset):
    """A work dir with a two-member ensemble (one per fold), hand-set post-processing and screen."""
    work = tmp_path_factory.mktemp("export") / "work"
    members = []
    for fold in (0, 1):
        bundle = work / "bundles" / "slices-test" / f"segresnet2d_{fold}"
        score = train_member(bundle, ct_dataset, fold, epochs=15 if fold == 0 else 1)  # 0 screens: sure of air
        members.append({"bundle": str(bundle.relative_to(work)), "score": score, "fold": fold, "seed": 0,
                        "variant": "slices"})
    (work / "ensemble").mkdir()
    ensemble = {"mode": "mean", "members": members, "postprocessing": POSTPROCESSING,
                "screen": {"members": [0], "below": 0.05}}  # member 1 runs where member 0 sees foreground
    (work / "ensemble" / "ensemble.json").write_text(json.dumps(ensemble))
    return work


def test_bundle_runs_without_the_repository_and_gives_the_masks_of_predict(finished_work, ct_dataset, tmp_path):
    scans = ct_dataset.parent / "imagesTs"
    results = predict(str(scans), str(tmp_path / "predict"), work_dir=str(finished_work))
    assert any(r["screened_slices"] for r in results)  # the bundle below must screen alike
    rows = {row["case"]: row for row in json.loads((tmp_path / "predict" / "report.json").read_text())["rows"]}
    for result in results:  # agreement of the members with a whole mask: member 0 alone where 1 skipped slices
        assert rows[result["case"]]["members_compared"] == (1 if result["screened_slices"] else 2)
    bundle = export_bundle(str(finished_work), str(tmp_path / "ich_bundle"))
    for name in ("configs/metadata.json", "configs/inference.json", "models/member_0/model.pt",
                 "models/member_1/model.pt", "docs/README.md", "LICENSE", "scripts/ensemble_inference.py"):
        assert (tmp_path / "ich_bundle" / name).is_file(), name
    shutil.move(bundle, tmp_path / "moved" / "ich_bundle")  # a bundle works wherever it is put
    blocked = ("import runpy, sys; sys.modules['autoseg2d'] = None; sys.argv = ['monai.bundle', *sys.argv[1:]];"
               " runpy.run_module('monai.bundle', run_name='__main__')")  # any import of this repository fails
    result = subprocess.run(
        [sys.executable, "-c", blocked, "run", "--config_file",
         str(tmp_path / "moved" / "ich_bundle" / "configs" / "inference.json"), "--dataset_dir", str(scans),
         "--output_dir", str(tmp_path / "bundle_masks")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "slices left to the screening members" in result.stdout  # it screened, as predict did
    for scan in sorted(scans.iterdir()):
        ours = nib.load(str(tmp_path / "predict" / scan.name))
        theirs = nib.load(str(tmp_path / "bundle_masks" / scan.name))
        np.testing.assert_array_equal(np.asanyarray(theirs.dataobj), np.asanyarray(ours.dataobj))
        np.testing.assert_allclose(theirs.affine, ours.affine)
        assert theirs.get_data_dtype() == np.uint8


def test_predict_compares_each_scan_with_the_work_dirs_training_spacing(finished_work, ct_dataset, tmp_path, capsys):
    """predict reads the training scans' spacing from the work dir's datastats.yaml: scans of 5 mm slices are
    flagged against a range of 2.5 mm ones, and without the file nothing is flagged."""
    scans = ct_dataset.parent / "imagesTs"
    datastats = finished_work / "datastats.yaml"
    stats = {"stats_summary": {"image_stats": {"spacing": {"min": [0.45, 0.45, 2.5], "max": [0.45, 0.45, 2.5]}}}}
    datastats.write_text(json.dumps(stats))  # JSON is YAML
    try:
        predict(str(scans), str(tmp_path / "flagged"), work_dir=str(finished_work))
    finally:
        datastats.unlink()  # the module's other tests use this work dir without one
    rows = json.loads((tmp_path / "flagged" / "report.json").read_text())["rows"]
    assert rows and all("spacing unlike training" in row["flags"] for row in rows)
    assert "on axis z" in capsys.readouterr().out
    predict(str(scans), str(tmp_path / "unflagged"), work_dir=str(finished_work))
    rows = json.loads((tmp_path / "unflagged" / "report.json").read_text())["rows"]
    assert all("spacing unlike training" not in row["flags"] for row in rows)


def test_metadata_passes_verify_metadata_offline(finished_work, tmp_path):
    export_bundle(str(finished_work), str(tmp_path / "b"))
    metadata_file = tmp_path / "b" / "configs" / "metadata.json"
    schema_file = tmp_path / "b" / "docs" / "metadata_schema.json"
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                             str(metadata_file), "--filepath", str(schema_file)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-2000:]
    metadata = json.loads(metadata_file.read_text())
    del metadata["license"]
    with pytest.raises(jsonschema.ValidationError, match="license"):
        jsonschema.validate(metadata, json.loads(schema_file.read_text()))


def test_bundle_post_processing_replays_the_ensembles_binary_and_multiclass(finished_work, tmp_path):
    """The bundle's copy of the combining code gives EnsemblePredictor's masks for both kinds of choice."""
    import importlib

    from autoseg2d.evaluation.postprocess import choose_multiclass_postprocessing
    from autoseg2d.pipeline.bundle_metadata import replayed_postprocessing
    from autoseg2d.pipeline.ensemble import EnsemblePredictor

    export_bundle(str(finished_work), str(tmp_path / "b"))
    sys.path.insert(0, str(tmp_path / "b" / "scripts"))
    try:
        bundle_side = importlib.import_module("ensemble_inference")
    finally:
        sys.path.remove(str(tmp_path / "b" / "scripts"))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([4, 1, 1], size=(12, 12, 4)).transpose(3, 0, 1, 2).astype(np.float32)
    truth = (probs.argmax(0) * (rng.random(probs.shape[1:]) > 0.3)).astype(np.uint8)
    multiclass = choose_multiclass_postprocessing([{"prob": probs, "truth": truth, "spacing_mm": (1, 1, 5)}])
    binary = np.stack([probs[0], probs[1] + probs[2]])
    for choice, p in ((POSTPROCESSING, binary), (multiclass, probs), (None, probs)):
        ours = EnsemblePredictor.__new__(EnsemblePredictor)
        ours.postprocessing = choice
        theirs = bundle_side.EnsembleInference.__new__(bundle_side.EnsembleInference)
        theirs.postprocessing = json.loads(json.dumps(replayed_postprocessing(choice)))
        np.testing.assert_array_equal(theirs.mask(p, (1, 1, 5)), ours.mask(p, (1, 1, 5)))


def test_unfinished_work_dir_is_refused_and_nothing_is_written(finished_work, tmp_path):
    unfinished = tmp_path / "work"
    shutil.copytree(finished_work, unfinished, ignore=shutil.ignore_patterns("ensemble.json"))
    with pytest.raises(ExportError, match=r"no finished ensemble \(ensemble/ensemble.json is missing\).*"
                                          r"run_autoseg.py ensemble --work_dir"):
        export_bundle(str(unfinished), str(tmp_path / "out"))
    shutil.copytree(finished_work, tmp_path / "untrained")
    (tmp_path / "untrained" / "bundles" / "slices-test" / "segresnet2d_1" / "model" / "model.pt").unlink()
    with pytest.raises(ExportError, match=r"segresnet2d_1 has no trained model .*model.pt is missing"):
        export_bundle(str(tmp_path / "untrained"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_bundle(str(finished_work), str(tmp_path / "full"))


def test_bundle_members_of_one_input_variant_read_each_scan_once(finished_work, ct_dataset, tmp_path, monkeypatch):
    import importlib.util

    bundle = tmp_path / "b"
    export_bundle(str(finished_work), str(bundle))
    spec = importlib.util.spec_from_file_location("exported_ensemble_inference",
                                                  bundle / "scripts" / "ensemble_inference.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    ensemble = runner.EnsembleInference([str(bundle / "models" / f"member_{i}") for i in (0, 1)])
    reads = []
    original = runner.InferClass.read
    monkeypatch.setattr(runner.InferClass, "read", lambda self, image: reads.append(image) or original(self, image))
    scan = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    together = ensemble.probabilities(str(scan))
    assert len(reads) == 1  # both members use the slices variant: one reading and windowing for both
    alone = np.mean([member.infer(str(scan)).numpy() for member in ensemble.members], axis=0)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_members_made_before_the_bundle_contract_get_the_templates_copy(tmp_path):
    """The exported ensemble runner imports bundle_contract; older members' scripts lack it."""
    from autoseg2d.pipeline.export import copy_scripts

    member = tmp_path / "old_member"
    shutil.copytree(TEMPLATE / "scripts", member / "scripts")
    (member / "scripts" / "bundle_contract.py").unlink()
    copy_scripts([{"path": member, "bundle": "old_member"}], tmp_path / "exported")
    assert (tmp_path / "exported" / "bundle_contract.py").read_bytes() == \
        (TEMPLATE / "scripts" / "bundle_contract.py").read_bytes()


def test_a_kept_conversion_travels_and_a_missing_one_is_skipped(tmp_path):
    """An exported member starts without converting again; a member never converted exports without one."""
    from bundle_contract import BundleFiles

    from autoseg2d.pipeline.export import copy_converted

    source, target = BundleFiles(tmp_path / "source"), BundleFiles(tmp_path / "target")
    Path(source.ckpt_path).mkdir()
    Path(target.ckpt_path).mkdir()
    copy_converted(source, target)
    assert not any(Path(target.ckpt_path).iterdir())  # never converted: nothing to copy, no error
    kept = [source.openvino_model, source.openvino_model.with_suffix(".bin")]
    for path in kept:
        path.write_text(path.name)
    copy_converted(source, target)
    copied = sorted(p.name for p in Path(target.ckpt_path).iterdir())
    assert copied == sorted(p.name for p in kept)
    for path in kept:
        assert (Path(target.ckpt_path) / path.name).read_text() == path.name
