"""The bundle contract: file names from ckpt_path, atomic writes, masks, progress.yaml and the event file."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_contract import (EVENT_KEYS, BundleFiles, append_event, atomic_path, best_score, events_end,
                             is_finished, launch_command, mark_finished, read_events, read_progress, write_mask,
                             write_progress)


def test_every_file_lies_in_ckpt_path(tmp_path):
    files = BundleFiles(tmp_path / "weights")
    paths = [files.model, files.last_model, files.progress, files.training_log, files.text_log, files.events,
             files.openvino_model, files.cv_metrics]
    assert {p.parent for p in paths} == {tmp_path / "weights"}
    assert [p.name for p in paths[:3]] == ["model.pt", "model_last.pt", "progress.yaml"]  # MONAI's names


def test_an_atomic_write_replaces_the_file_only_when_it_succeeds(tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.endswith(".nii.gz")  # writers pick the format
        temporary.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
    with atomic_path(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_a_mask_keeps_the_source_geometry_as_uint8(tmp_path):
    affine = np.diag([0.5, 0.5, 5.0, 1.0])
    source = nib.Nifti1Image(np.zeros((4, 3, 2), np.int16), affine)
    source.header.set_slope_inter(2.0, -1024.0)
    target = write_mask(np.ones((4, 3, 2), np.int64), affine, source.header, tmp_path / "out" / "case.nii.gz")
    written = nib.load(str(target))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.ones((4, 3, 2)))
    np.testing.assert_allclose(written.affine, affine)
    assert written.header.get_slope_inter() in ((1.0, 0.0), (None, None))


def test_progress_is_finished_only_when_marked(tmp_path):
    path = tmp_path / "progress.yaml"
    assert read_progress(path) == [] and not is_finished([])
    progress = [{"best_avg_dice_score": 0.4, "best_epoch": 2}, {"best_avg_dice_score": 0.6, "best_epoch": 4}]
    write_progress(path, progress)
    assert not is_finished(read_progress(path)) and best_score(read_progress(path), path) == 0.6
    mark_finished(progress, num_epochs=4, num_steps=40)
    write_progress(path, progress)
    assert is_finished(read_progress(path)) and read_progress(path)[-1]["num_steps"] == 40
    with pytest.raises(ValueError, match="has no 'best_avg_dice_score'.*train it first"):
        best_score([], path)
    assert np.isnan(best_score([{"best_avg_dice_score": None, "finished": True}], path))  # fold -1: no validation


def test_events_are_read_from_an_offset_and_half_lines_wait(tmp_path):
    path = tmp_path / "events.jsonl"
    assert read_events(path) == ([], 0) and events_end(path) == 0
    append_event(path, 1, 4, 0.9, None)
    start = events_end(path)  # a reader started now ignores the earlier run's epoch
    append_event(path, 2, 4, 0.8, 0.5)
    with open(path, "a") as stream:
        stream.write('{"epoch": 3')  # still being written
    events, offset = read_events(path, start)
    assert events == [{"epoch": 2, "num_epochs": 4, "loss": 0.8, "val_dice": 0.5}]
    assert tuple(events[0]) == EVENT_KEYS
    with open(path, "a") as stream:
        stream.write(', "num_epochs": 4, "loss": 0.7, "val_dice": null}\n')
    assert read_events(path, offset)[0] == [{"epoch": 3, "num_epochs": 4, "loss": 0.7, "val_dice": None}]


def test_an_event_of_another_format_is_an_error_naming_the_keys(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"epoch": 1, "dice": 0.5}\n')
    with pytest.raises(ValueError, match=r"lacks \['num_epochs', 'loss', 'val_dice'\].*another template version"):
        read_events(path)


def test_torchrun_only_for_several_devices_from_this_interpreter():
    script = [str(Path("b/scripts/train.py")), "run"]
    assert launch_command(script, 1) == [sys.executable, *script]
    assert launch_command(script, 2) == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                                         "--nproc_per_node", "2", *script]
