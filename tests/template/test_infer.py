"""InferClass and infer.py run: probabilities and masks in the input file's own grid and header."""

import json
import logging
import shutil

import bundle_config
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from infer import InferClass, run


def slices_first_copy(source, target):
    """Rewrite a case with the axial axis stored first (and flipped), as some scanners do."""
    img = nib.load(str(source))
    data = np.moveaxis(np.asanyarray(img.dataobj), 2, 0)[::-1]
    affine = img.affine @ np.array([[0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, data.shape[0] - 1], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(data, affine), target)
    return target


def test_probabilities_in_the_original_grid(trained_bundle, ct_dataset, tmp_path):
    image = ct_dataset.parent / json.loads(ct_dataset.read_text())["testing"][0]["image"]
    reoriented = slices_first_copy(image, tmp_path / "case.nii.gz")
    infer = InferClass(str(trained_bundle))
    for path in (image, reoriented):
        probabilities = infer.infer(str(path))
        assert probabilities.shape == (2, *nib.load(str(path)).shape)
        np.testing.assert_allclose(probabilities.affine.numpy(), nib.load(str(path)).affine, atol=1e-6)
        torch.testing.assert_close(probabilities.sum(0), torch.ones(probabilities.shape[1:]), atol=1e-5, rtol=0)
    # the same scan stored differently gets the same prediction, moved with it
    original = infer.infer(str(image)).numpy()
    moved = infer.infer(str(reoriented)).numpy()
    np.testing.assert_allclose(np.moveaxis(original, 3, 1)[:, ::-1], moved, atol=1e-5)


@pytest.mark.parametrize("skip_air", [True, False])
def test_the_config_says_whether_air_slices_are_left_out(trained_bundle, skip_air):
    infer = InferClass(str(trained_bundle), infer_skip_air_slices=skip_air, infer_cpu_runtime="torch")
    assert infer.predictor.skip_air_slices is skip_air


def test_a_config_from_before_the_speed_keys_were_removed_still_predicts_and_says_what_runs(
        trained_bundle, ct_dataset, tmp_path, caplog, monkeypatch):
    """A bundle config asking for the head crop, INT8 and fp32 on CPUs (keys this template no longer has) runs the
    template's defaults, with one warning per key that names it, its file and what runs instead."""
    monkeypatch.setattr(bundle_config, "_warned", set())
    bundle = tmp_path / "old_bundle"
    shutil.copytree(trained_bundle.parents[1], bundle)
    config_file = bundle / "configs" / "hyper_parameters.yaml"
    old = {**yaml.safe_load(config_file.read_text()), "infer_crop_to_head": True, "infer_head_margin_px": 16,
           "infer_cpu_int8": True, "infer_cpu_bf16": False, "infer_cpu_streams": 1}
    config_file.write_text(yaml.safe_dump(old))
    image = ct_dataset.parent / json.loads(ct_dataset.read_text())["testing"][0]["image"]
    with caplog.at_level(logging.WARNING, logger="segresnet2d"):
        infer = InferClass(str(config_file), infer_cpu_runtime="torch")
        again = InferClass(str(config_file), infer_cpu_runtime="torch")
    warned = [r.getMessage() for r in caplog.records if r.name == "segresnet2d"]
    assert len(warned) == 5 and all(str(config_file) in m and "Delete the key there" in m for m in warned)
    assert any("infer_crop_to_head" in m and "whole slices" in m for m in warned)
    assert any("infer_cpu_bf16" in m and "amp decides" in m for m in warned)
    assert not set(bundle_config.REMOVED_KEYS) & set(infer.config) and infer.predictor.skip_air_slices
    current = InferClass(str(trained_bundle), infer_cpu_runtime="torch")
    np.testing.assert_array_equal(again.infer(str(image)).numpy(), current.infer(str(image)).numpy())


def test_ensemble_keys_are_accepted(trained_bundle, ct_dataset):
    image = ct_dataset.parent / json.loads(ct_dataset.read_text())["testing"][0]["image"]
    infer = InferClass(str(trained_bundle), rank=0, image_save_func={"_target_": "SaveImage"})
    assert infer.infer({"image": str(image)}).shape[0] == 2


def test_run_writes_uint8_masks_with_the_input_header(trained_bundle, ct_dataset, tmp_path):
    written = run(str(trained_bundle), output_dir=str(tmp_path / "out"))
    sources = [ct_dataset.parent / e["image"] for e in json.loads(ct_dataset.read_text())["testing"]]
    assert [p.split("/")[-1] for p in written] == [s.name for s in sources]
    for path, source_path in zip(written, sources):
        mask, source = nib.load(path), nib.load(str(source_path))
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine)
