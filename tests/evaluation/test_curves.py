"""Training curves from a literal trainer log."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import imread

from autoseg2d.evaluation.curves import plot_training_curves, read_training_log

LOG = """epoch,loss,val_dice,learning_rate,epoch_time_s
0,1.20,,0.0002,12.5
1,0.95,0.41,0.0002,11.9
2,0.80,,0.00015,12.1
3,0.71,0.58,0.0001,12.0
4,0.66,0.55,0.00005,12.2
"""


@pytest.fixture()
def log_csv(tmp_path):
    path = tmp_path / "model" / "training_log.csv"
    path.parent.mkdir()
    path.write_text(LOG)
    return path


def test_empty_val_dice_reads_as_nan(log_csv):
    log = read_training_log(log_csv)
    assert log["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert math.isnan(log["val_dice"][0]) and math.isnan(log["val_dice"][2])
    assert log["val_dice"][3] == pytest.approx(0.58)
    assert log["learning_rate"][-1] == pytest.approx(5e-5)


def test_plot_is_written_beside_the_log(log_csv):
    path = plot_training_curves(log_csv)
    assert path == log_csv.with_name("training_curves.png")
    picture = imread(str(path))
    assert picture.shape[:2] == (800, 700)
    assert np.ptp(picture[..., :3]) > 0.5  # something was drawn


def test_missing_column_names_file_and_columns(tmp_path):
    path = tmp_path / "training_log.csv"
    path.write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(ValueError, match=r"training_log.csv.*\['val_dice', 'learning_rate', 'epoch_time_s'\]"):
        read_training_log(path)


def test_header_only_log_is_a_clear_error(tmp_path):
    path = tmp_path / "training_log.csv"
    path.write_text("epoch,loss,val_dice,learning_rate,epoch_time_s\n")
    with pytest.raises(ValueError, match="no epochs yet"):
        plot_training_curves(path)


def test_bad_number_names_the_column(tmp_path):
    path = tmp_path / "training_log.csv"
    path.write_text("epoch,loss,val_dice,learning_rate,epoch_time_s\n0,abc,,0.1,1\n")
    with pytest.raises(ValueError, match="column 'loss'"):
        read_training_log(path)
