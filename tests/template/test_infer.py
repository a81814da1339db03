"""InferClass and infer.py run: probabilities and masks in the input file's own grid and header."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from infer import InferClass, head_crop, run
from predictor import HeadCrop


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


@pytest.mark.parametrize("skip_air, crop, expected", [
    (True, False, HeadCrop(-500.0, None)), (True, True, HeadCrop(-500.0, 16)), (False, True, HeadCrop(-500.0, 16)),
    (False, False, None)])
def test_the_config_picks_whole_slices_air_slices_out_or_the_head_box(trained_bundle, skip_air, crop, expected):
    infer = InferClass(str(trained_bundle), infer_skip_air_slices=skip_air, infer_crop_to_head=crop,
                       infer_head_margin_px=16)
    assert head_crop(infer.config) == expected == infer.predictor.crop


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
