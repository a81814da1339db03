"""autoseg2d.datalist: layouts, folds stratified by lesion volume, and every datalist error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg2d.datalist import (
    LAYOUTS,
    DatalistError,
    build_datalist,
    case_name,
    ensure_folds,
    lesion_volume_ml,
    read_datalist,
    validate_folds,
)
from autoseg2d.synthetic.head_ct import make_head_ct, write_case


def _write(root: Path, image: str, label: str | None, seed: int = 0, num_lesions: int | None = None) -> None:
    case = make_head_ct(size=16, num_slices=4, num_lesions=num_lesions, seed=seed)
    write_case(case, root / image, root / label if label else None)


def instance22_tree(root: Path, num_train: int = 6, num_test: int = 2) -> Path:
    for i in range(1, num_train + 1):
        _write(root, f"train/data/{i:03d}.nii.gz", f"train/label/{i:03d}.nii.gz", seed=i)
    for i in range(num_train + 1, num_train + num_test + 1):
        _write(root, f"evaluation/{i:03d}.nii.gz", None, seed=i)
    return root


def nnunet_tree(root: Path, num_train: int = 6, num_test: int = 2) -> Path:
    for i in range(num_train):
        _write(root, f"imagesTr/ich_{i:03d}_0000.nii.gz", f"labelsTr/ich_{i:03d}.nii.gz", seed=i)
    for i in range(num_test):
        _write(root, f"imagesTs/ich_{100 + i:03d}_0000.nii.gz", None, seed=100 + i)
    return root


def build(root: Path, num_folds: int = 5, **kwargs) -> dict:
    output = build_datalist(str(root), str(root / "out" / "datalist.json"), num_folds, **kwargs)
    return json.loads(Path(output).read_text())


def test_instance22_layout(tmp_path):
    datalist = build(instance22_tree(tmp_path), num_folds=3)
    assert [e["image"] for e in datalist["training"]] == [f"train/data/{i:03d}.nii.gz" for i in range(1, 7)]
    assert [e["label"] for e in datalist["training"]] == [f"train/label/{i:03d}.nii.gz" for i in range(1, 7)]
    assert datalist["testing"] == [{"image": "evaluation/007.nii.gz"}, {"image": "evaluation/008.nii.gz"}]
    assert sorted(e["fold"] for e in datalist["training"]) == [0, 0, 1, 1, 2, 2]
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "datalist.json"]  # no temp file left


def test_nnunet_layout(tmp_path):
    datalist = build(nnunet_tree(tmp_path), num_folds=2)
    assert datalist["training"][0] == {"image": "imagesTr/ich_000_0000.nii.gz", "label": "labelsTr/ich_000.nii.gz",
                                       "fold": datalist["training"][0]["fold"]}
    assert [e["image"] for e in datalist["testing"]] == ["imagesTs/ich_100_0000.nii.gz", "imagesTs/ich_101_0000.nii.gz"]
    assert validate_folds(datalist, 2) == 2


def test_nnunet_extra_channel_is_an_error(tmp_path):
    nnunet_tree(tmp_path)
    _write(tmp_path, "imagesTr/ich_000_0001.nii.gz", None)
    with pytest.raises(DatalistError, match="ich_000_0001.nii.gz.*one CT channel"):
        build(tmp_path)


def test_decathlon_style_names_without_channel_suffix(tmp_path):
    from autoseg2d.synthetic.head_ct import write_dataset

    write_dataset(tmp_path, num_train=4, num_test=1, num_folds=2, size=16, num_slices=4)
    datalist = build(tmp_path, num_folds=2)
    assert [e["label"] for e in datalist["training"]] == [f"labelsTr/case_{i:03d}.nii.gz" for i in range(4)]
    assert datalist["testing"] == [{"image": "imagesTs/case_004.nii.gz"}]


def test_globs_layout_pairs_by_name_and_unlabelled_images_are_testing(tmp_path):
    for i in range(4):
        _write(tmp_path, f"scans/p{i}.nii.gz", f"masks/p{i}.nii.gz", seed=i)
    _write(tmp_path, "scans/new.nii", None)
    datalist = build(tmp_path, num_folds=2, image_glob="scans/*.nii*", label_glob="masks/*.nii.gz")
    assert [(e["image"], e["label"]) for e in datalist["training"]] == [
        (f"scans/p{i}.nii.gz", f"masks/p{i}.nii.gz") for i in range(4)]
    assert datalist["testing"] == [{"image": "scans/new.nii"}]


def test_globs_errors(tmp_path):
    _write(tmp_path, "scans/p0.nii.gz", "masks/p0.nii.gz")
    _write(tmp_path, "masks/orphan.nii.gz", None)
    with pytest.raises(DatalistError, match="needs --image_glob"):
        build(tmp_path, layout="globs")
    with pytest.raises(DatalistError, match="matches no file"):
        build(tmp_path, image_glob="nothing/*.nii.gz")
    with pytest.raises(DatalistError, match="is absolute"):
        build(tmp_path, image_glob=str(tmp_path / "scans/*.nii.gz"))
    with pytest.raises(DatalistError, match=r"labels without an image: \['orphan'\]"):
        build(tmp_path, image_glob="scans/*.nii.gz", label_glob="masks/*.nii.gz")


def test_layout_detection_and_unknown_names(tmp_path):
    with pytest.raises(DatalistError, match="no known layout.*instance22: train/data.*nnunet: imagesTr"):
        build(tmp_path)
    instance22_tree(tmp_path)
    nnunet_tree(tmp_path)
    with pytest.raises(DatalistError, match=r"several layouts \['instance22', 'nnunet'\]; pass --layout"):
        build(tmp_path)
    assert len(build(tmp_path, layout="nnunet", num_folds=2)["training"]) == 6
    with pytest.raises(DatalistError, match=r"--layout 'msd' is unknown; known layouts: \['auto', " + str(
            list(LAYOUTS))[1:-1].replace("[", r"\[")):
        build(tmp_path, layout="msd")
    with pytest.raises(DatalistError, match="used only by --layout globs"):
        build(tmp_path, layout="nnunet", image_glob="imagesTr/*.nii.gz")
    with pytest.raises(DatalistError, match="is not a folder"):
        build_datalist(str(tmp_path / "missing"), str(tmp_path / "x.json"), num_folds=5)


def test_label_without_image_and_fewer_cases_than_folds(tmp_path):
    instance22_tree(tmp_path, num_train=3, num_test=0)
    with pytest.raises(DatalistError, match="3 training cases cannot fill 5 folds; pass --num_folds 3"):
        build(tmp_path)
    _write(tmp_path, "train/label/099.nii.gz", None)
    with pytest.raises(DatalistError, match=r"labels without an image: \['099'\]"):
        build(tmp_path, num_folds=2)


def test_folds_are_stratified_by_lesion_volume_and_seeded(tmp_path):
    for i in range(20):
        _write(tmp_path, f"train/data/{i:03d}.nii.gz", f"train/label/{i:03d}.nii.gz", seed=i, num_lesions=1 + i % 3)
    datalist = build(tmp_path, num_folds=5, seed=3)
    volumes = np.array([lesion_volume_ml(tmp_path / e["label"]) for e in datalist["training"]])
    folds = np.array([e["fold"] for e in datalist["training"]])
    quartile = np.argsort(np.argsort(volumes, kind="stable"), kind="stable") * 4 // 20  # 20 // 5 folds = 4 bins
    for fold in range(5):
        assert sorted(quartile[folds == fold]) == [0, 1, 2, 3]  # one small ... one large bleed per fold
    fold_medians = [np.median(volumes[folds == f]) for f in range(5)]
    assert np.ptp(fold_medians) < np.ptp(volumes) / 2
    assert build(tmp_path, num_folds=5, seed=3) == datalist
    assert build(tmp_path, num_folds=5, seed=4) != datalist


def test_unreadable_labels_fall_back_to_plain_kfold(tmp_path, caplog):
    instance22_tree(tmp_path, num_test=0)
    (tmp_path / "train/label/002.nii.gz").write_bytes(b"not a nifti")
    datalist = build(tmp_path, num_folds=3)
    assert validate_folds(datalist, 3) == 3
    assert "plain k-fold" in caplog.text


def _datalist(folds: list, testing: list | None = None) -> dict:
    training = [{"image": f"img/{i}.nii.gz", "label": f"lbl/{i}.nii.gz", "fold": f} for i, f in enumerate(folds)]
    return {"training": training, "testing": [{"image": t} for t in testing or []]}


def test_validate_folds_accepts_and_infers_k():
    assert validate_folds(_datalist([0, 1, 2, 0, 1, 2])) == 3
    assert validate_folds(_datalist([0, 1, 0, 1]), 2) == 2


@pytest.mark.parametrize("datalist, num_folds, message", [
    ({"testing": []}, None, "non-empty 'training' list"),
    ({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}, 2, r"training entry 0 \(a.nii.gz\) has no fold"),
    ({"training": [{"image": "a.nii.gz", "fold": 0}]}, 2, "has no label"),
    (_datalist([0, "1"]), 2, r"img/1.nii.gz\) has fold '1'; folds are integers"),
    (_datalist([0, True]), 2, "has fold True"),
    (_datalist([0, -1]), 2, "has fold -1"),
    (_datalist([0, 1, 2]), 2, r"img/2.nii.gz has fold 2, outside 0..1 for 2 folds; .*num_folds=3"),
    (_datalist([0, 0, 2]), None, r"folds \[1\] hold no training case"),
    (_datalist([0, 1]), 5, "2 training cases cannot fill 5 folds"),
    (_datalist([0]), None, "num_folds=1 must be an integer >= 2"),
    ({"training": _datalist([0, 1])["training"] * 2}, 2, "training lists img/0.nii.gz 2 times"),
    (_datalist([0, 1], ["t.nii.gz", "./t.nii.gz"]), 2, "testing lists t.nii.gz 2 times"),
    (_datalist([0, 1], ["img/1.nii.gz"]), 2, "img/1.nii.gz is in both training and testing"),
])
def test_validate_folds_errors(datalist, num_folds, message):
    with pytest.raises(DatalistError, match=message):
        validate_folds(datalist, num_folds)


def test_ensure_folds_adds_folds_without_touching_the_input():
    plain = {"training": [{"image": f"i{n}.nii.gz", "label": f"l{n}.nii.gz"} for n in range(7)], "testing": []}
    result = ensure_folds(plain, 3, seed=1)
    assert "fold" not in plain["training"][0]
    assert validate_folds(result, 3) == 3
    assert ensure_folds(plain, 3, seed=1) == result


def test_ensure_folds_never_resplits(tmp_path):
    existing = _datalist([1, 0, 1, 0])
    assert ensure_folds(existing, 2, seed=99) == existing
    with pytest.raises(DatalistError, match="already has 2 folds but num_folds=3.*pass num_folds=2"):
        ensure_folds(existing, 3, seed=0)
    partial = _datalist([0, 1, 0])
    del partial["training"][1]["fold"]
    with pytest.raises(DatalistError, match="2 of 3 training entries have a fold but img/1.nii.gz has none"):
        ensure_folds(partial, 2, seed=0)


def test_ensure_folds_stratifies_with_a_dataroot(tmp_path):
    instance22_tree(tmp_path, num_train=10, num_test=0)
    plain = {"training": [{"image": f"train/data/{i:03d}.nii.gz", "label": f"train/label/{i:03d}.nii.gz"}
                          for i in range(1, 11)]}
    assert validate_folds(ensure_folds(plain, 5, seed=0, dataroot=str(tmp_path)), 5) == 5


def test_instance22_reference_datalist():
    datalist = json.loads((Path(__file__).parents[1] / "datalists" / "instance22.json").read_text())
    assert validate_folds(datalist, 5) == 5
    assert [e["image"] for e in datalist["training"]] == [f"train/data/{i:03d}.nii.gz" for i in range(1, 101)]
    assert all(e["label"] == e["image"].replace("/data/", "/label/") for e in datalist["training"])
    assert [e["image"] for e in datalist["testing"]] == [f"evaluation/{i}.nii.gz" for i in range(101, 131)]
    assert [sum(e["fold"] == f for e in datalist["training"]) for f in range(5)] == [20] * 5
    assert {e["image"]: e["fold"] for e in datalist["training"]}["train/data/001.nii.gz"] == 4


def test_adding_folds_names_an_entry_without_a_label():
    datalist = {"training": [{"image": "a.nii.gz", "label": "la.nii.gz"}, {"image": "b.nii.gz"}]}
    with pytest.raises(DatalistError, match=r"training entry 1 \(b.nii.gz\) has no label path"):
        ensure_folds(datalist, num_folds=2, dataroot="/nowhere")


def test_a_bare_name_finds_the_shipped_datalist(tmp_path, monkeypatch, caplog):
    from autoseg2d.datalist import SHIPPED_DATALISTS, resolve_datalist

    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        assert resolve_datalist("instance22.json") == SHIPPED_DATALISTS / "instance22.json"
    assert "using the shipped" in caplog.text
    (tmp_path / "instance22.json").write_text("{}")
    assert resolve_datalist("instance22.json").resolve() == tmp_path / "instance22.json"  # the user's own wins
    with pytest.raises(DatalistError, match="datalist other.json not found .* which holds instance22.json"):
        resolve_datalist("other.json")


@pytest.mark.parametrize("content, message", [
    (None, "datalist .*missing.json not found"),
    ("{\"training\": [", r"datalist .*bad.json is not valid JSON \(.*\); fix the line named or rebuild it"),
    ("[]", r"datalist .*bad.json holds list, not a JSON object with a 'training' list"),
    ('{"testing": []}', r"holds an object with keys \['testing'\], not a JSON object with a 'training' list"),
    ('{"training": {}}', "not a JSON object with a 'training' list"),
])
def test_read_datalist_names_the_file_and_the_fix(tmp_path, content, message):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatalistError, match=message):
        read_datalist(path)


def test_read_datalist_returns_the_content(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(_datalist([0, 1], ["t.nii.gz"])))
    assert read_datalist(str(path)) == _datalist([0, 1], ["t.nii.gz"])


@pytest.mark.parametrize("path, name", [
    ("a.nii.gz", "a"), ("a.nii", "a"), ("a.b.nii.gz", "a.b"), ("a.gz", "a.gz"), ("dir.nii/a.nii.gz", "a"),
    ("a.nii.gz.nii", "a.nii.gz"), ("case_0000.nii.gz", "case_0000"), ("a", "a"),
])
def test_case_name_is_the_templates(path, name):
    from autoseg2d.check import template_module

    assert case_name(path) == name
    assert template_module("volumes").case_name(path) == name
