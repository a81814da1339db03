"""run_autoseg.py export: a MONAI bundle that `monai.bundle run` executes without this repository, same masks."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest

from autoseg2d.export.bundle import ExportError, export_bundle
from autoseg2d.pipeline.runner import predict
from tests.conftest import SUBPROCESS_TIMEOUT_S, TEMPLATE, configured_bundle

# Acts on the test scans (one voxel is about 0.001 mL: the members leave specks of a few voxels, and a scan with
# nothing left is rescued), so a bundle that skipped or changed post-processing would give other masks.
POSTPROCESSING = {"threshold": 0.5, "steps": [{"name": "remove_small_components", "min_volume_ml": 0.01},
                                              {"name": "keep_nonempty", "floor": 0.4}],
                  "rule": "hand-made for the test", "baseline": {}, "selected": {}, "evaluated": []}
# Any import of this repository fails in a process started with it: the bundle must run on its own.
BLOCKED = "import runpy, sys; sys.modules['autoseg2d'] = None; "
# What 3D Slicer's MONAIAuto3DSeg bundle runner does (its Scripts/monaibundle_inference.py), written for this test:
# the bundle root is the folder above the first model.pt under the unpacked bundle, read with a bare ConfigParser.
THIRD_PARTY_RUNNER = """
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

unpacked, image, output_dir = (Path(arg) for arg in sys.argv[1:4])
root = next(unpacked.rglob("model.pt")).parent.parent
parser = ConfigParser()
parser.read_config(str(root / "configs" / "inference.json"))
parser["bundle_root"] = root.as_posix()
parser["dataset_dir"] = image.parent.as_posix()
parser["output_dir"] = output_dir.as_posix()
parser["datalist"] = [image.as_posix()]
parser["device"] = torch.device("cpu")
parser["inferer"]["device"] = torch.device("cpu")
parser["dataloader"]["num_workers"] = 0
assert len(parser.get_parsed_content("dataloader")) > 0
parser.get_parsed_content("evaluator").run()
"""


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


@pytest.fixture(scope="module")
def predicted(finished_work, ct_dataset, tmp_path_factory) -> Path:
    """predict's masks of the test scans (the masks every way of running the bundle must give)."""
    output = tmp_path_factory.mktemp("predict")
    results = predict(str(ct_dataset.parent / "imagesTs"), str(output), work_dir=str(finished_work))
    assert any(r["screened_slices"] for r in results)  # the bundle must screen alike
    rows = {row["case"]: row for row in json.loads((output / "report.json").read_text())["rows"]}
    for result in results:  # agreement of the members with a whole mask: member 0 alone where 1 skipped slices
        assert rows[result["case"]]["members_compared"] == (1 if result["screened_slices"] else 2)
    return output


@pytest.fixture(scope="module")
def exported(finished_work, tmp_path_factory) -> Path:
    """The exported bundle, moved after export: a bundle works wherever it is put."""
    folder = tmp_path_factory.mktemp("exported")
    shutil.move(export_bundle(str(finished_work), str(folder / "staging" / "ich_bundle")), folder / "ich_bundle")
    return folder / "ich_bundle"


def write_nrrd(image: Path, target: Path) -> Path:
    """The scan as an uncompressed NRRD in LPS space, as 3D Slicer writes a volume for a bundle runner."""
    import nrrd

    source = nib.load(str(image))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ source.affine
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3],
              "encoding": "raw"}
    nrrd.write(str(target), np.asanyarray(source.dataobj), header)
    return target


def assert_same_mask(theirs_file: Path, ours_file: Path) -> None:
    theirs, ours = nib.load(str(theirs_file)), nib.load(str(ours_file))
    np.testing.assert_array_equal(np.asanyarray(theirs.dataobj), np.asanyarray(ours.dataobj))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-6)
    assert theirs.get_data_dtype() == np.uint8


def run_isolated(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A Python command in a process that cannot import this repository, on the CPU."""
    result = subprocess.run([sys.executable, "-c", BLOCKED + command[0], *command[1:]], cwd=cwd, capture_output=True,
                            text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd),
                                                         "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_monai_bundle_run_gives_the_masks_of_predict_for_nifti_nrrd_and_dicom(
        exported, predicted, finished_work, ct_dataset, tmp_path):
    from autoseg2d.pipeline.predict import EnsemblePredictor
    from autoseg2d.run.workdir import WorkDir
    from tests.dicom.series_writer import write_series

    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/labels.csv",
                 "models/member_0/model.pt", "models/member_1/model.pt", "docs/README.md", "LICENSE",
                 "scripts/ensemble_inference.py", "scripts/postprocess.py"):
        assert (exported / name).is_file(), name
    niftis = sorted((ct_dataset.parent / "imagesTs").iterdir())
    scans = tmp_path / "scans"
    scans.mkdir()
    expected = {}  # mask file the bundle writes -> predict's mask of the same scan
    for image in niftis:
        case = image.name[: -len(".nii.gz")]
        shutil.copy2(image, scans / image.name)
        write_nrrd(image, scans / f"{case}_nrrd.nrrd")
        expected |= {image.name: predicted / image.name, f"{case}_nrrd.nii.gz": predicted / image.name}
    write_series(niftis[0], scans / "series_dicom")  # a DICOM series folder
    expected["series_dicom.nii.gz"] = predicted / niftis[0].name
    result = run_isolated(["sys.argv = ['monai.bundle', *sys.argv[1:]]; runpy.run_module('monai.bundle', "
                           "run_name='__main__')", "run", "--config_file", str(exported / "configs" / "inference.json"),
                           "--dataset_dir", str(scans), "--output_dir", str(tmp_path / "masks")], cwd=tmp_path)
    assert "slices left to the screening members" in result.stdout  # it screened, as predict did
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.nii.gz")) == sorted(expected)
    for written, ours in expected.items():
        assert_same_mask(tmp_path / "masks" / written, ours)
    # post-processing changed predict's masks here: a bundle without it (or with another) could not match them
    ensemble = json.loads(WorkDir(finished_work).ensemble_file.read_text())
    raw = EnsemblePredictor(WorkDir(finished_work), {**ensemble, "postprocessing": None})
    assert any(not np.array_equal(raw.predict(image, nib.load(str(image)).header.get_zooms()[:3])[0],
                                  np.asanyarray(nib.load(str(predicted / image.name)).dataobj)) for image in niftis)


def test_a_third_party_bundle_runner_finds_the_bundle_and_gives_the_masks_of_predict(
        exported, predicted, ct_dataset, tmp_path):
    """The layout and inference.json work for a tool that drives the bundle itself (see THIRD_PARTY_RUNNER)."""
    unpacked = tmp_path / "unpacked"
    shutil.copytree(exported, unpacked / "ich_bundle")
    assert next(unpacked.rglob("model.pt")).parent.parent == unpacked / "ich_bundle"
    image = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    (tmp_path / "input").mkdir()
    volume = write_nrrd(image, tmp_path / "input" / "input-volume.nrrd")
    (tmp_path / "runner.py").write_text(THIRD_PARTY_RUNNER)
    run_isolated(["sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                  str(tmp_path / "runner.py"), str(unpacked), str(volume), str(tmp_path / "result")], cwd=tmp_path)
    assert_same_mask(tmp_path / "result" / "input-volume.nii.gz", predicted / image.name)
    with open(next(unpacked.rglob("model.pt")).parent / "labels.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))  # beside the first model.pt, where the tool reads it
    assert [(row["LabelValue"], row["Name"], row["SegmentedPropertyTypeCodeSequence.CodeValue"]) for row in rows] == \
        [("1", "hemorrhage", "50960005")]


def test_each_member_rebuilds_from_its_checkpoint_with_configparser_alone(exported, ct_dataset):
    """checkpoint["config"]["network"] as MONAI's tools read it: the network loads state_dict strictly and gives
    the member's probabilities; models/model.pt (what a single-network tool loads) is member 0."""
    import torch
    from infer import InferClass
    from monai.bundle import ConfigParser

    image = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    members = sorted((exported / "models").glob("member_*"))
    assert (exported / "models" / "model.pt").read_bytes() == (members[0] / "model.pt").read_bytes()
    for folder in members:
        checkpoint = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)
        network = ConfigParser({"network": checkpoint["config"]["network"]}).get_parsed_content("network")
        network.load_state_dict(checkpoint["state_dict"], strict=True)
        member = InferClass(str(folder / "hyper_parameters.yaml"), device="cpu", ckpt_path=str(folder),
                            bundle_root=str(folder))
        batch = next(member.predictor.batches(member.read(str(image))[1])).x
        with torch.no_grad():
            ours, theirs = member.predictor.model(batch), network.eval()(batch)
        torch.testing.assert_close(torch.softmax(theirs, 1), torch.softmax(ours, 1), atol=1e-5, rtol=0)


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
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-2000:]
    metadata = json.loads(metadata_file.read_text())
    del metadata["license"]
    with pytest.raises(jsonschema.ValidationError, match="license"):
        jsonschema.validate(metadata, json.loads(schema_file.read_text()))


def test_bundle_post_processing_replays_the_ensembles_binary_and_multiclass(finished_work, tmp_path):
    """The bundle's copy of the combining code gives EnsemblePredictor's masks for both kinds of choice."""
    import importlib

    from autoseg2d.pipeline.postprocess import choose_multiclass_postprocessing
    from autoseg2d.export.metadata import replayed_postprocessing
    from autoseg2d.pipeline.predict import EnsemblePredictor

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
    from autoseg2d.export.bundle import copy_scripts

    member = tmp_path / "old_member"
    shutil.copytree(TEMPLATE / "scripts", member / "scripts")
    (member / "scripts" / "bundle_contract.py").unlink()
    copy_scripts([{"path": member, "bundle": "old_member"}], tmp_path / "exported")
    assert (tmp_path / "exported" / "bundle_contract.py").read_bytes() == \
        (TEMPLATE / "scripts" / "bundle_contract.py").read_bytes()


def test_a_kept_conversion_travels_and_a_missing_one_is_skipped(tmp_path):
    """An exported member starts without converting again; a member never converted exports without one."""
    from bundle_contract import BundleFiles

    from autoseg2d.export.bundle import copy_converted

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


def test_subtypes_carry_hemorrhage_and_their_region_codes_as_dicom_lists_them():
    """Every hemorrhage class is SNOMED CT 50960005 Hemorrhage; the subtype is the region. The codes taken from
    DICOM's lists (PS3.16) are checked against pydicom's copy of them; unknown names carry no code."""
    from pydicom.sr.codedict import codes

    from autoseg2d.export.label_codes import CATEGORY, HEMORRHAGE, LABELS_COLUMNS, labels_csv

    names = ["IPH", "intraventricular hemorrhage", "SAH", "Subdural", "EDH", "hemorrhage", "edema"]
    rows = list(csv.DictReader(labels_csv(names).splitlines()))
    assert list(rows[0]) == list(LABELS_COLUMNS) and [row["Name"] for row in rows] == names
    regions = [row["AnatomicRegionSequence.CodeValue"] for row in rows]
    assert regions == ["12738006", "35764002", "35951006", "54214006", "1101003", "1101003", ""]
    assert all(row["SegmentedPropertyTypeCodeSequence.CodeValue"] == "50960005" for row in rows[:-1])
    assert rows[-1]["SegmentedPropertyTypeCodeSequence.CodeValue"] == ""  # not a hemorrhage class
    dicom = {code.value: code for code in (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Hemorrhage,
                                           codes.SCT.Intracranial, codes.SCT.Brain, codes.SCT.BrainVentricle,
                                           codes.SCT.SubarachnoidSpace)}
    for scheme, value, meaning in [CATEGORY, HEMORRHAGE] + [
            (row["AnatomicRegionSequence.CodingSchemeDesignator"], row["AnatomicRegionSequence.CodeValue"],
             row["AnatomicRegionSequence.CodeMeaning"]) for row in rows[:3]]:
        assert scheme == "SCT" and value in dicom
