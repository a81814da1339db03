"""The hard synthetic CT: reproducible, realistic geometry and HU, the bleed sizes and mimics it promises."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_fill_holes

from autoseg2d.check import check_inputs
from autoseg2d.synthetic.hard import KINDS, METADATA_NAME, draw_lesion_volumes_ml, make_hard_head_ct, write_hard_dataset

NUM_CASES = 40


@pytest.fixture(scope="module")
def cases():
    """40 cases at 128 px: enough bleeds to see the volume law, and every mimic."""
    return [make_hard_head_ct([0, index], size_px=128) for index in range(NUM_CASES)]


@pytest.fixture(scope="module")
def large_case():
    """Case 4 of `cases` (a 5 mL subarachnoid bleed) at 512 px: the same seed, the same head."""
    return make_hard_head_ct([0, 4], size_px=512)


def _file_digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_hard_dataset(tmp_path / name, num_train=2, num_test=1, num_folds=2, seed=seed)
    first, again, other = (_file_digests(tmp_path / name) for name in "abc")
    assert first == again
    assert len(first) == 2 * 3 + 2  # images and labels, datalist, cases.json
    assert first["imagesTr/case_000.nii.gz"] != other["imagesTr/case_000.nii.gz"]


@pytest.mark.parametrize("size_px, pixel_mm", [(128, (1.6, 2.0)), (512, (0.4, 0.5))])
def test_geometry_and_types_per_size(size_px, pixel_mm, cases, large_case):
    case = cases[4] if size_px == 128 else large_case
    image, label, affine = case.ct.image_hu, case.ct.label, case.ct.affine
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.shape[:2] == (size_px, size_px) and 18 <= image.shape[2] <= 40 and label.shape == image.shape
    spacing = np.abs(np.diag(affine)[:3])
    assert pixel_mm[0] <= spacing[0] == spacing[1] <= pixel_mm[1] and spacing[2] == 5.0
    assert case.info["spacing_mm"] == pytest.approx(spacing.tolist(), abs=1e-3)


def test_the_same_head_at_128_and_512_px(cases, large_case):
    """A CPU run at 128 px must see the anatomy and bleeds a GPU run sees at 512 px, only coarser."""
    small, large = cases[4], large_case
    assert small.info["spacing_mm"][0] * 128 == pytest.approx(large.info["spacing_mm"][0] * 512, abs=0.1)
    assert small.ct.image_hu.shape[2] == large.ct.image_hu.shape[2]
    assert [le["drawn_ml"] for le in small.info["lesions"]] == [le["drawn_ml"] for le in large.info["lesions"]]
    assert small.info["lesion_volume_ml"] > 0
    assert small.info["lesion_volume_ml"] == pytest.approx(large.info["lesion_volume_ml"], rel=0.3)


def test_hounsfield_values_of_the_tissues(cases):
    for case in cases[:8]:
        image, label = case.ct.image_hu.astype(np.float32), case.ct.label
        brain = case.intracranial & (label == 0) & ~case.mimic
        assert 20 <= np.median(image[brain]) <= 40
        assert image.max() >= 700  # bone
        assert np.percentile(image, 5) <= -1000  # air, or -2048 outside the reconstruction circle
    blood = np.concatenate([case.ct.image_hu[case.ct.label > 0] for case in cases])
    assert 50 <= np.median(blood) <= 90  # acute blood; single voxels by the skull mix with bone
    noise = [case.info["noise_sd_hu"] for case in cases]
    assert 3 <= min(noise) < 5 and 10 < max(noise) <= 12
    assert {case.ct.image_hu.min() for case in cases} >= {-2048}


def test_bleed_volumes_are_mostly_small_with_a_long_tail(cases):
    volumes = np.array([lesion["volume_ml"] for case in cases for lesion in case.info["lesions"]])
    assert len(volumes) >= NUM_CASES
    assert np.mean(volumes < 5) >= 0.7
    assert volumes.min() < 0.3 and volumes.max() > 20
    assert {lesion["kind"] for case in cases for lesion in case.info["lesions"]} == set(KINDS)
    drawn = draw_lesion_volumes_ml(np.random.default_rng(0), 10_000)
    assert drawn.min() >= 0.1 and drawn.max() <= 60 and 0.5 < np.median(drawn) < 2


def test_each_bleed_reaches_about_its_drawn_volume(cases):
    lesions = [lesion for case in cases for lesion in case.info["lesions"]]
    ratios = np.array([lesion["volume_ml"] / lesion["drawn_ml"] for lesion in lesions])
    assert np.median(ratios) == pytest.approx(1.0, abs=0.2)


def test_mimics_are_bright_but_never_labelled(cases):
    with_calcification = 0
    for case in cases:
        image, label = case.ct.image_hu, case.ct.label
        assert case.mimic.any()
        assert not label[case.mimic].any()
        assert image[case.mimic & case.intracranial].max() >= 60
        with_calcification += int({"choroid_plexus", "pineal"} & set(case.info["mimics"]) != set())
    assert with_calcification >= NUM_CASES // 2
    bright = [(c.ct.image_hu >= 60) & c.intracranial for c in cases]
    bright_mimic = sum(int((b & c.mimic).sum()) for b, c in zip(bright, cases))
    bright_bleed = sum(int((b & (c.ct.label > 0)).sum()) for b, c in zip(bright, cases))
    assert bright_mimic > bright_bleed  # a threshold at 60 HU finds more mimic than bleed


def test_labels_lie_inside_the_skull(cases):
    for case in cases:
        image, label = case.ct.image_hu, case.ct.label
        for z in np.nonzero(label.any(axis=(0, 1)))[0]:
            within_skull = binary_fill_holes(image[..., z] > 300)
            assert within_skull[label[..., z] > 0].all()


def test_three_classes_label_each_kind_by_its_index():
    for index in range(12):
        case = make_hard_head_ct([0, index], size_px=128, num_classes=3)
        expected = {KINDS.index(le["kind"]) + 1 for le in case.info["lesions"] if le["volume_ml"] > 0}
        assert {le["kind"] for le in case.info["lesions"]} <= set(KINDS[:3])
        assert set(np.unique(case.ct.label).tolist()) - {0} == expected


def test_num_classes_out_of_range_is_refused():
    with pytest.raises(ValueError, match="num_classes=5"):
        make_hard_head_ct([0, 0], num_classes=5)


def test_normal_test_cases_have_empty_labels_and_are_marked(tmp_path):
    datalist = write_hard_dataset(tmp_path, num_train=2, num_test=3, num_folds=2, num_normal_test=2)
    testing = json.loads(datalist.read_text())["testing"]
    labels = [np.asarray(nib.load(tmp_path / entry["label"]).dataobj) for entry in testing]
    assert labels[0].any() and not labels[1].any() and not labels[2].any()
    metadata = json.loads((tmp_path / METADATA_NAME).read_text())
    assert [metadata[entry["image"]]["normal"] for entry in testing] == [False, True, True]
    assert metadata[testing[1]["image"]]["lesions"] == [] and metadata[testing[1]["image"]]["mimics"]


def test_a_bleed_under_half_a_voxel_everywhere_is_still_labelled():
    """Seed [1, 53]'s only bleed (0.1 mL, intraventricular) fills no voxel to half: labelled only where the
    fraction reached 0.5, the case came out empty although not normal (an infinite HD in every benchmark)."""
    case = make_hard_head_ct([1, 53], size_px=128)
    (lesion,) = case.info["lesions"]
    assert not case.info["normal"] and lesion["drawn_ml"] == pytest.approx(0.1)
    assert case.ct.label.any() and 0 < lesion["volume_ml"] < 3 * lesion["drawn_ml"]


def test_more_normal_test_cases_than_test_cases_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_normal_test=3 must be between 0 and num_test=2"):
        write_hard_dataset(tmp_path, num_test=2, num_normal_test=3)


def test_datalist_schema_and_the_input_check_accepts_the_set(tmp_path):
    datalist = write_hard_dataset(tmp_path, num_train=10, num_test=2, num_folds=5, num_classes=4, seed=1)
    content = json.loads(datalist.read_text())
    assert sorted(e["fold"] for e in content["training"]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(set(e) == {"image", "label"} for e in content["testing"])
    metadata = json.loads((tmp_path / METADATA_NAME).read_text())
    assert len(metadata) == 12 and any(m["padding_hu"] == -2048 for m in metadata.values())
    report = check_inputs(str(datalist), str(tmp_path), modality="ct", output_classes=5)
    assert report["errors"] == [] and len(report["cases"]) == 12
