"""run_autoseg.py as a user meets it: one message per expected error, no traceback, no raw return values."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np

from tests.conftest import REPO, SUBPROCESS_TIMEOUT_S
from tests.test_check import NUM_TRAIN, write_dataset


def run_cli(*args: str, cwd, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, str(REPO / "run_autoseg.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S, env=environment)


def nan_image(root) -> None:
    path = root / "images/case_001.nii.gz"
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(path))


def test_an_input_error_is_one_message_without_traceback(tmp_path):
    write_dataset(tmp_path)
    nan_image(tmp_path)
    result = run_cli("check", "--datalist", "datalist.json", "--dataroot", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "case case_001: " in result.stderr and "NaN or inf voxels" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    debug = run_cli("check", "--datalist", "datalist.json", "--dataroot", str(tmp_path), "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputCheckError" in debug.stderr
    env = run_cli("check", "--datalist", "datalist.json", "--dataroot", str(tmp_path), cwd=tmp_path,
                  AUTOSEG2D_DEBUG="1")
    assert "Traceback" in env.stderr


def test_check_prints_its_summary_and_no_return_value(tmp_path):
    write_dataset(tmp_path)
    result = run_cli("check", "--datalist", "datalist.json", "--dataroot", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "input check: 5 cases checked" in result.stderr
    assert "cleaned_datalist" not in result.stdout and "num_folds" not in result.stdout


def test_shipped_datalist_by_bare_name_and_a_missing_dataroot(tmp_path):
    """The design card's command from any folder: the shipped datalist is found, the data root is not."""
    result = run_cli("check", "--datalist", "instance22.json", "--dataroot", str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 1
    assert f"using the shipped {REPO / 'datalists' / 'instance22.json'}" in result.stderr
    assert f"--dataroot {tmp_path / 'data'} does not exist" in result.stderr
    assert "train/data/001.nii.gz" in result.stderr and "train/label/001.nii.gz" in result.stderr
    assert "file not found" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n  ") < 5  # one problem, not one line per listed file


def test_an_unknown_work_dir_is_one_message(tmp_path):
    result = run_cli("predict", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                     "--work_dir", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 1 and "no ensemble in" in result.stderr and "Traceback" not in result.stderr


def test_a_misspelt_option_suggests_the_right_one(tmp_path):
    result = run_cli("--datalist", "d.json", "--dataroot", str(tmp_path), "--num_fold", "3", cwd=tmp_path)
    assert result.returncode == 1 and "unknown option --num_fold; did you mean --num_folds?" in result.stderr
    demo = run_cli("--demo", "--num_clases", "3", "--work_dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert demo.returncode == 1 and "did you mean --num_classes?" in demo.stderr
    assert not (tmp_path / "demo").exists()


def test_stage_commands_run_the_pipeline_up_to_their_stage(tmp_path):
    """`run_autoseg.py crossval ...` failed with a TypeError (every option passed positionally) before any stage."""
    write_dataset(tmp_path)
    nan_image(tmp_path)
    for stage in ("analyze", "sweep", "crossval", "ensemble"):
        result = run_cli(stage, "--datalist", "datalist.json", "--dataroot", str(tmp_path), "--work_dir",
                         str(tmp_path / "work"), cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert "NaN or inf voxels" in result.stderr and "Traceback" not in result.stderr  # the check stage ran
    misspelt = run_cli("crossval", "--datalist", "datalist.json", "--num_fold", "3", cwd=tmp_path)
    assert misspelt.returncode == 1
    assert "crossval: unknown option --num_fold; did you mean --num_folds?" in misspelt.stderr


def test_help_of_run_and_the_stage_commands_lists_their_options_and_runs_nothing(tmp_path):
    for command in ("run", "crossval"):
        result = run_cli(command, "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Options: --datalist, --dataroot, --work_dir" in result.stdout and "unknown option" not in result.stderr
    assert not (tmp_path / "work").exists()


def test_other_libraries_lines_go_to_the_log_file_and_debug_shows_them(tmp_path):
    """MONAI's INFO lines, the DataAnalyzer's progress bar and library warnings: the log file only, or both."""
    write_dataset(tmp_path)
    args = ("analyze", "--datalist", "datalist.json", "--dataroot", str(tmp_path), "--work_dir")
    result = run_cli(*args, str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    console = result.stdout + result.stderr
    assert "=== stage 2/7: analyze ===" in console and f"log: {tmp_path / 'work' / 'autoseg.log'}" in console
    log = (tmp_path / "work" / "autoseg.log").read_text()
    bar = f"{NUM_TRAIN}/{NUM_TRAIN} ["
    for line in ("INFO monai.apps.auto3dseg.data_analyzer: Using CPU for data analyzing!", bar):
        assert line in log and line.split(": ")[-1] not in console
    assert "Warning" not in console and "%|" not in console
    debug = run_cli(*args, str(tmp_path / "debug"), "--debug", cwd=tmp_path)
    assert "Using CPU for data analyzing!" in debug.stdout + debug.stderr
