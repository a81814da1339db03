"""Training curves for TensorBoard and MLflow, written at epoch ends by the main process only.

Both are optional extras. TensorBoard event files go to the bundle's tensorboard folder whenever the
`tensorboard` package is installed; an MLflow run is recorded when `mlflow_tracking_uri` is set (MONAI's
key, which AutoRunner and BundleGen hand every algorithm) and `mlflow` is installed. A tracking backend
that fails never stops training: it says so in one line and is switched off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bundle_contract import write_text_atomic

SCALAR_TYPES = (bool, int, float, str)


def metric_names(class_names: list[str], num_classes: int) -> list[str]:
    """One validation Dice name per foreground class: its name where the config gives one."""
    return [f"val/dice_{class_names[i] if i < len(class_names) else f'class_{i + 1}'}" for i in range(num_classes)]


def mean_by_class(rows: list[list[float]], names: list[str]) -> dict[str, float]:
    """Each class's mean over the volumes (rows) where it is a number; NaN where no volume holds the class."""
    values = np.array(rows, dtype=float).reshape(len(rows), len(names))
    counts = (~np.isnan(values)).sum(axis=0)
    sums = np.nansum(values, axis=0)
    return {name: float(total / count) if count else float("nan") for name, total, count in zip(names, sums, counts)}


def epoch_metrics(loss: float, lr: float, dice: float | None, class_dice: dict[str, float] | None) -> dict:
    metrics = {"train/loss": loss, "train/learning_rate": lr}
    if dice is not None:
        metrics["val/dice"] = dice
        metrics.update({k: v for k, v in (class_dice or {}).items() if v == v})  # a class no volume holds: NaN
    return metrics


def run_params(config: dict) -> dict:
    """The config's scalar and list settings as MLflow parameters ('network.init_filters' for nested ones: MLflow
    refuses '#' in names)."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (*SCALAR_TYPES, list))})
        elif isinstance(value, (*SCALAR_TYPES, list)):
            params[key] = value
    return {k: str(v)[:500] for k, v in params.items()}  # MLflow refuses longer parameter values


class TensorBoardSink:
    """Event files that `tensorboard --logdir <bundle>/model/tensorboard` shows; written by a background thread."""

    def __init__(self, log_dir: Path, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run rewrites the epochs after its checkpoint, TensorBoard hides the old ones
        self.writer = SummaryWriter(str(log_dir), purge_step=first_epoch + 1)

    def log(self, metrics: dict, epoch: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()  # a pruned run is stopped between epochs: what it logged is on disk

    def close(self, best_dice: float, status: str) -> None:
        self.writer.close()


class MlflowSink:
    """One MLflow run per bundle, named after it and its folder; a resumed training continues its run."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict, run_id_file: Path):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        try:
            if not run_id:
                mlflow.log_params(params)
                write_text_atomic(run_id_file, run.info.run_id)
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise

    def log(self, metrics: dict, epoch: int) -> None:
        self.mlflow.log_metrics(metrics, step=epoch, synchronous=False)  # a remote server never holds training up

    def close(self, best_dice: float, status: str) -> None:
        self.mlflow.log_metric("best_avg_dice_score", best_dice)
        self.mlflow.end_run(status=status)  # ended here, before MLflow's exit hook would call any end FINISHED


class Tracking:
    """The trainer's one interface to its trackers: epoch_end after each epoch, close at the end (also of a
    training that stops early, with its status)."""

    def __init__(self, sinks: list, log: logging.Logger):
        self.sinks, self.log = sinks, log

    def epoch_end(self, epoch: int, loss: float, lr: float, dice: float | None = None,
                  class_dice: dict[str, float] | None = None) -> None:
        """epoch is 1-based; dice and class_dice are None on epochs without validation."""
        metrics = epoch_metrics(loss, lr, dice, class_dice)
        self._each(lambda sink: sink.log(metrics, epoch))

    def close(self, best_dice: float, status: str = "FINISHED") -> None:
        """status (MLflow's names): FINISHED, KILLED (stopped: pruned, interrupted, SIGTERM) or FAILED (an error)."""
        self._each(lambda sink: sink.close(best_dice, status))
        self.sinks = []

    def _each(self, call) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as err:  # tracking is a view of training, never a reason to stop it
                self.log.warning(f"{type(sink).__name__} failed and is switched off: {err}")
                self.sinks.remove(sink)


def open_tracking(config: dict, log_dir: Path, run_id_file: Path, *, main_process: bool, first_epoch: int,
                  log: logging.Logger) -> Tracking:
    """The trackers this process writes: none on other ranks (DDP), TensorBoard where installed, MLflow
    where config's mlflow_tracking_uri is set and mlflow is installed."""
    if not main_process:
        return Tracking([], log)
    if first_epoch == 0:  # a training from scratch is a new run, not more of an older one's curves
        for stale in [*Path(log_dir).glob("events.out.tfevents.*"), Path(run_id_file)]:
            stale.unlink(missing_ok=True)
    sinks = []
    try:
        sinks.append(TensorBoardSink(log_dir, first_epoch))
    except ImportError:
        pass  # TensorBoard is an optional extra: no event files without it
    uri = config.get("mlflow_tracking_uri")
    if uri:
        try:
            run_name = "/".join(Path(config["bundle_root"]).parts[-2:])  # <configuration or work dir>/<bundle>
            sinks.append(MlflowSink(uri, config["mlflow_experiment_name"], run_name, run_params(config), run_id_file))
        except ImportError:
            log.warning(f"mlflow_tracking_uri is {uri} but mlflow is not installed: no MLflow run is recorded "
                        "(pip install mlflow)")
        except Exception as err:
            log.warning(f"MLflow tracking at {uri} is off: {str(err).splitlines()[0] if str(err) else err!r}")
    return Tracking(sinks, log)
