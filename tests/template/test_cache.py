"""The slice cache: same arrays as load_volume, slice-major, memory-mapped entries written once."""

import json

import numpy as np
from cache import cache_key, cached_volume, slice_major
from volumes import load_volume

import cache as cache_module


def first_case(ct_dataset):
    entry = json.loads(ct_dataset.read_text())["training"][0]
    return ct_dataset.parent / entry["image"], ct_dataset.parent / entry["label"]


def test_slice_major_keeps_values_and_makes_slices_contiguous():
    array = np.arange(4 * 5 * 3).reshape(4, 5, 3)
    stored = slice_major(array)
    np.testing.assert_array_equal(stored, array)
    assert stored[..., 1].flags.c_contiguous and not array[..., 1].flags.c_contiguous


def test_memory_and_mmap_caches_match_load_volume(ct_dataset, tmp_path, monkeypatch):
    image, label = first_case(ct_dataset)
    reference = load_volume(image, label, "ct")
    for cache_dir in (None, tmp_path / "cache"):
        volume = cached_volume(image, label, "ct", cache_dir)
        assert volume.name == reference.name
        assert volume.source == reference.source and str(image) in volume.source  # messages name the files
        np.testing.assert_array_equal(volume.image, reference.image)
        np.testing.assert_array_equal(volume.label, reference.label)
        np.testing.assert_allclose(volume.affine, reference.affine)
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir()) == [
        "affine.npy", "image.npy", "label.npy"]
    monkeypatch.setattr(cache_module, "load_volume", lambda *a: (_ for _ in ()).throw(AssertionError("re-read")))
    again = cached_volume(image, label, "ct", tmp_path / "cache")  # served from the files, not the NIfTI
    assert isinstance(again.image.base, np.memmap) or isinstance(again.image, np.memmap)


def test_a_changed_source_file_gets_a_new_key(ct_dataset, tmp_path):
    image, label = first_case(ct_dataset)
    copy = tmp_path / image.name
    copy.write_bytes(image.read_bytes())
    before = cache_key(copy, label, "ct")
    copy.write_bytes(image.read_bytes() + b"\0")
    assert cache_key(copy, label, "ct") != before
    assert cache_key(copy, label, "mr") != cache_key(copy, label, "ct")
