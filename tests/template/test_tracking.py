"""Training curves in TensorBoard and MLflow: what the trainer writes, and MLflow's URI handed down by AutoRunner."""

from __future__ import annotations

import csv
import logging
import math
import sys

import pytest
import yaml
from tracking import Tracking, epoch_metrics, mean_by_class, metric_names, open_tracking

from autoseg2d.synthetic.head_ct import write_dataset
from autoseg2d.templates import bundle_files
from tests.conftest import TEMPLATES, TINY_NETWORK

LOG = logging.getLogger("segresnet2d.test_tracking")


def test_class_names_name_the_dice_metrics():
    assert metric_names(["IPH", "IVH"], 3) == ["val/dice_IPH", "val/dice_IVH", "val/dice_class_3"]
    assert metric_names([], 1) == ["val/dice_class_1"]


def test_class_means_skip_volumes_without_the_class():
    means = mean_by_class([[0.5, math.nan], [0.7, math.nan], [math.nan, math.nan]], ["a", "b"])
    assert means["a"] == pytest.approx(0.6) and math.isnan(means["b"])


def test_epochs_without_validation_log_no_dice_and_nan_classes_are_left_out():
    assert epoch_metrics(0.5, 1e-3, None, None) == {"train/loss": 0.5, "train/learning_rate": 1e-3}
    metrics = epoch_metrics(0.5, 1e-3, 0.4, {"val/dice_IPH": 0.4, "val/dice_IVH": math.nan})
    assert metrics["val/dice"] == 0.4 and "val/dice_IVH" not in metrics


def test_a_failing_tracker_is_switched_off_with_one_warning(caplog):
    class Broken:
        calls = 0

        def log(self, metrics, epoch):
            Broken.calls += 1
            raise ConnectionError("server gone")

    tracking = Tracking([Broken()], LOG)
    with caplog.at_level(logging.WARNING):
        tracking.epoch_end(1, 0.5, 1e-3)
        tracking.epoch_end(2, 0.4, 1e-3)
    assert Broken.calls == 1
    assert [r.getMessage() for r in caplog.records] == ["Broken failed and is switched off: server gone"]


def test_an_mlflow_uri_without_mlflow_installed_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    config = {"mlflow_tracking_uri": "file:///tmp/mlruns", "mlflow_experiment_name": "x", "bundle_root": str(tmp_path)}
    with caplog.at_level(logging.WARNING):
        open_tracking(config, tmp_path / "tb", tmp_path / "run_id", main_process=True, first_epoch=0, log=LOG)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "mlflow_tracking_uri is file:///tmp/mlruns but mlflow is not installed" in warnings[0]


def test_other_ranks_write_nothing(tmp_path):
    config = {"mlflow_tracking_uri": None, "bundle_root": str(tmp_path)}
    tracking = open_tracking(config, tmp_path / "tb", tmp_path / "run_id", main_process=False, first_epoch=0, log=LOG)
    tracking.epoch_end(1, 0.5, 1e-3, 0.3, {})
    tracking.close(0.3)
    assert not tracking.sinks and not (tmp_path / "tb").exists()


def test_training_writes_tensorboard_curves_of_its_log(trained_bundle):
    """The demo-size training (2 epochs, each validated): loss, learning rate, Dice and Dice per class, by epoch."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = bundle_files(trained_bundle.parents[1])
    events = EventAccumulator(str(files.tensorboard))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/learning_rate", "val/dice", "val/dice_class_1"}
    rows = list(csv.DictReader(files.training_log.open()))
    for tag, column in (("train/loss", "loss"), ("val/dice", "val_dice"), ("train/learning_rate", "learning_rate")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-3, abs=1e-5)
    # one foreground class: its Dice over the volumes holding it (all of them here) is the mean
    assert [s.value for s in events.Scalars("val/dice_class_1")] == pytest.approx(
        [s.value for s in events.Scalars("val/dice")], abs=1e-6)


def test_autorunners_mlflow_uri_reaches_the_bundle_and_records_a_run(tmp_path, monkeypatch):
    """AutoRunner(mlflow_tracking_uri=...) -> BundleGen -> Segresnet2dAlgo.fill_template_config -> train.py: one
    MLflow run per bundle in a file store, with the epochs' metrics. One fold, 2 epochs, no ensemble."""
    mlflow = pytest.importorskip("mlflow")
    from monai.apps.auto3dseg import AutoRunner

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores unless asked
    datalist = write_dataset(tmp_path / "data", num_train=4, num_test=1, num_folds=2, num_slices=8)
    uri = (tmp_path / "mlruns").as_uri()
    runner = AutoRunner(work_dir=str(tmp_path / "work"), algos=["segresnet2d"], templates_path_or_url=str(TEMPLATES),
                        input={"modality": "CT", "datalist": str(datalist), "dataroot": str(datalist.parent)},
                        ensemble=False, mlflow_tracking_uri=uri, mlflow_experiment_name="ich")
    runner.set_analyze_params({"device": "cpu", "worker": 0, "do_ccp": False})
    runner.set_device_info(cmd_prefix=sys.executable)
    runner.set_training_params({"num_epochs": 2, "num_epochs_per_validation": 1, "num_images_per_batch": 2,
                                "num_workers": 0, **TINY_NETWORK})
    runner.set_num_fold(1)
    runner.run()

    config = yaml.safe_load((tmp_path / "work" / "segresnet2d_0" / "configs" / "hyper_parameters.yaml").read_text())
    assert config["mlflow_tracking_uri"] == uri and config["mlflow_experiment_name"] == "ich"
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ich").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "work/segresnet2d_0" and run.info.status == "FINISHED"
    assert run.data.params["fold"] == "0" and run.data.params["network.init_filters"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice")] == [1, 2]
    progress = yaml.safe_load((tmp_path / "work" / "segresnet2d_0" / "model" / "progress.yaml").read_text())
    assert run.data.metrics["best_avg_dice_score"] == pytest.approx(progress[-1]["best_avg_dice_score"])


def test_the_data_source_and_bundlegen_set_the_mlflow_keys_under_monais_names(tmp_path):
    """AutoRunner reads both keys from the data-source YAML too and hands them to BundleGen, which sets them on
    every algorithm it generates: the filled config keeps them (they were dropped before)."""
    from tests.template.test_algo import filled, make_algo

    algo = make_algo(tmp_path, mlflow_tracking_uri="sqlite:///mlflow.db")
    algo.set_mlflow_experiment_name("ich")  # as BundleGen.generate does with its own argument
    config = filled(algo, tmp_path)
    assert config["mlflow_tracking_uri"] == "sqlite:///mlflow.db" and config["mlflow_experiment_name"] == "ich"
    assert filled(make_algo(tmp_path / "plain"), tmp_path / "plain")["mlflow_tracking_uri"] is None
