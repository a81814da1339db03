"""The training loop: epochs of 2D crops, per-volume validation, best checkpoint and progress.yaml."""

from __future__ import annotations

import csv
import dataclasses
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from bundle_contract import (FINISHED_KEYS, LOG_COLUMNS, SCORE_KEY, BundleFiles, append_event, atomic_path,
                             mark_finished, read_progress, write_progress, write_text_atomic)
from cache import cached_distill_target, cached_volume
from datalist_split import read_datalist, split_by_fold
from distributed import (Session, check_replicas_agree, gather_lists, rank_logger, rank_seed,
                         sum_over_ranks, wrap_for_training)
from inputs import channel_plan, windows_for
from network import (NetworkSettings, build_loss, build_network, count_parameters, network_config,
                     shape_divisor)
from predictor import SlicePredictor
from schedule import training_budget, warmup_cosine
from slice_dataset import Augmentation, SliceDataset, SliceSampler, foreground_pixels, resolve_num_workers
from tracking import mean_by_class, metric_names, open_tracking
from gpu_memory import MemorySettings, explain_out_of_memory
from volumes import Volume, VolumeError, check_training_case

INPUT_KEYS = ("modality", "input_variant", "num_adjacent_slices", "ct_windows_hu", "output_classes", "network")


def atomic_save(obj, path: Path) -> None:
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def rng_states() -> dict:
    """Every global random generator, so a resumed run continues as if it had never stopped."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def make_logger(log_file: Path) -> logging.Logger:
    logger = logging.getLogger(f"segresnet2d.{log_file}")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    return logger


def distill_folder(config: dict) -> Path | None:
    """The distill_targets folder (relative to data_file_base_dir, as datalist paths are); None trains on the
    labels alone."""
    if not config["distill_targets"]:
        return None
    folder = Path(config["data_file_base_dir"]) / config["distill_targets"]  # an absolute path stays itself
    if not folder.is_dir():
        raise VolumeError(f"distill_targets: {folder} is not a folder; give the folder of the training cases'"
                          " <case>.npz soft targets, or null to train on the labels alone")
    weight = config["distill_weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"distill_weight is {weight!r}; give a number >= 0 (the soft-target term's weight beside "
                         "the label loss)")
    return folder


def volume_dice(probabilities: np.ndarray, label: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in the truth or the prediction of one volume; a volume with
    none in either (empty truth predicted empty) counts as 1.

    A class absent from both says nothing about the model (the challenge scores each class where it occurs):
    counted as 1 it would lift every scan without that subtype, and this score picks the best checkpoint.
    """
    num_classes = probabilities.shape[0]
    pred = one_hot(torch.from_numpy(probabilities.argmax(0))[None, None], num_classes)
    truth = one_hot(torch.from_numpy(label.astype(np.int64))[None, None], num_classes)
    dice = compute_dice(pred, truth, include_background=False, ignore_empty=False)[0]
    present = (pred[0, 1:].flatten(1).any(1) | truth[0, 1:].flatten(1).any(1))
    return float(dice[present].mean()) if present.any() else 1.0


def class_dice(probabilities: np.ndarray, label: np.ndarray) -> list[float]:
    """Dice of each foreground class of one volume; NaN where the truth lacks the class (nothing to find)."""
    num_classes = probabilities.shape[0]
    pred = one_hot(torch.from_numpy(probabilities.argmax(0))[None, None], num_classes)
    truth = one_hot(torch.from_numpy(label.astype(np.int64))[None, None], num_classes)
    return compute_dice(pred, truth, include_background=False, ignore_empty=True)[0].tolist()


class Trainer:
    def __init__(self, config: dict, run: Session | None = None):
        self.config = config
        self.run = run or Session()  # one process unless train.py runs under torchrun
        self.device = self.run.device
        self.files = BundleFiles(Path(config["ckpt_path"]))
        self.files.ckpt_path.mkdir(parents=True, exist_ok=True)
        self.log = make_logger(self.files.text_log) if self.run.is_main else rank_logger(self.run)
        self.cache_dir = None if config["cache_in_memory"] else Path(config["cache_dir"])
        seed_everything(config["seed"], config["deterministic"])

        self.windows = windows_for(config["modality"], config["ct_windows_hu"])
        self.plan = channel_plan(config["input_variant"], len(self.windows), config["num_adjacent_slices"])
        self.model = build_network(NetworkSettings.from_config(config), len(self.plan)).to(self.device)
        self.distill_targets = distill_folder(config)
        self.loss_fn = build_loss(config["network"]["dsdepth"],
                                  None if self.distill_targets is None else config["distill_weight"])
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"]
        )
        self.amp = bool(config["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.best_dice, self.best_epoch = -1.0, -1

        train_files, val_files = split_by_fold(
            read_datalist(config["data_list_file_path"]), config["data_file_base_dir"], config["fold"],
            source=config["data_list_file_path"],
        )
        self.train_volumes = self._load(train_files, "training", self.distill_targets)
        self.val_volumes = self._load(val_files, "validation")
        self.sampler, self.loader = self._training_loader()
        self.budget = training_budget(config["num_epochs"], config["num_steps"], len(self.loader),
                                      config["num_warmup_epochs"], config["batch_size"], self.run.world_size)
        self.num_epochs = self.budget.num_epochs
        self.scheduler = warmup_cosine(self.optimizer, self.budget.total_steps, self.budget.warmup_steps)
        self.predictor = SlicePredictor(self.model, self.plan, self.windows,
                                        shape_divisor(config["network"]["blocks_down"]), config["infer_batch_size"],
                                        self.device, bool(config["amp"]), tta=False)  # inference's precision, CPUs too
        self.train_model = wrap_for_training(self.model, self.run)  # after the predictor made it channels_last

    def _training_loader(self) -> tuple[SliceSampler, DataLoader]:
        """One loader for the whole run: its workers persist, and the sampler picks each epoch's slices."""
        foreground = [foreground_pixels(v) for v in self.train_volumes]
        sampler = SliceSampler(foreground, [v.num_slices for v in self.train_volumes],
                               self.config["background_slice_ratio"], self.config["seed"],
                               self.run.rank, self.run.world_size)
        dataset = SliceDataset(self.train_volumes, foreground, self.plan, self.windows, self.config["roi_size"],
                               self.config["foreground_crop_ratio"], Augmentation.from_config(self.config))
        workers = resolve_num_workers(self.config["num_workers"])
        loader = DataLoader(dataset, batch_size=self.config["batch_size"], sampler=sampler, num_workers=workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(self.config["seed"]))  # not torch's global one
        return sampler, loader

    def _load(self, files: list[dict], role: str, soft_targets: Path | None = None) -> list[Volume]:
        """Load and check every case (with its soft target from that folder, if given), then stop with all
        problems at once: one run lists every fix."""
        start = time.time()
        volumes, problems = [], []
        for f in files:
            try:
                volume = cached_volume(f["image"], f["label"], self.config["modality"], self.cache_dir)
                notes = check_training_case(volume, self.config["output_classes"], self.config["modality"])
                if soft_targets is not None:
                    volume = dataclasses.replace(
                        volume, soft_target=cached_distill_target(soft_targets, volume, self.cache_dir))
            except VolumeError as err:
                problems.append(str(err))
                continue
            for note in notes:
                self.log.warning(note)
            volumes.append(volume)
        if problems:
            raise VolumeError(f"{len(problems)} of {len(files)} {role} cases cannot be used; fix them or remove them "
                              f"from {self.config['data_list_file_path']}:\n  " + "\n  ".join(problems))
        slices = sum(v.num_slices for v in volumes)
        targets = f", soft targets from {soft_targets}" if soft_targets is not None else ""
        self.log.info(f"loaded {len(volumes)} {role} volumes ({slices} slices{targets}) in {time.time() - start:.1f}s")
        return volumes

    def fit(self) -> float:
        """Train for num_epochs (continuing from model_last.pt if present); return the best validation Dice, NaN
        when there is no validation (fold -1: model.pt then holds the last epoch's weights)."""
        num_epochs = self.num_epochs
        start_epoch = self._resume()
        tracking = open_tracking(self.config, self.files.tensorboard, self.files.mlflow_run_id, log=self.log,
                                 main_process=self.run.is_main, first_epoch=start_epoch)
        self.log.info(
            f"{self._describe_fold()} {self.config['input_variant']} input, {len(self.plan)} channels, "
            f"{count_parameters(self.model) / 1e6:.1f}M parameters, {num_epochs} epochs on {self.device}, "
            f"{len(self.sampler)} samples per epoch, {self.loader.num_workers} loader workers"
            f"{f' x {self.run.world_size} processes' if self.run.distributed else ''}; {self.budget.describe()}"
        )
        done = start_epoch
        try:
            for epoch in range(start_epoch, num_epochs):
                started, lr = time.time(), self.scheduler.get_last_lr()[0]  # the rate the epoch starts at
                with explain_out_of_memory("training", MemorySettings.from_config(self.config)):
                    loss = self.train_epoch(epoch)
                with explain_out_of_memory("validation", MemorySettings.from_config(self.config)):
                    dice = self.validate() if self._validation_due(epoch) else None
                if dice is not None and dice > self.best_dice:
                    self.best_dice, self.best_epoch = dice, epoch
                    self._save_best(epoch)
                self._record(epoch, loss, dice, lr, time.time() - started)
                tracking.epoch_end(epoch + 1, loss, lr, dice, self.class_dice if dice is not None else None)
                self._save_resume_state(epoch)
                done = epoch + 1
                self._publish(epoch, loss, dice)
        except BaseException as err:
            stopped = isinstance(err, (KeyboardInterrupt, SystemExit))  # SystemExit: SIGTERM (train.py)
            tracking.close(self.score, status="KILLED" if stopped else "FAILED")
            if stopped:
                self.log.info(f"stopped after epoch {done}/{num_epochs}; training this bundle again continues "
                              "from there")
            raise
        if self.run.distributed:
            self.log.info(f"weights agree across {self.run.world_size} processes "
                          f"(checksum {check_replicas_agree(self.model, self.run):.6e})")
        if not self.val_volumes:
            self._save_model(num_epochs - 1, score=None)
        self._save_finished()
        tracking.close(self.score)
        self.log.info(f"done: best validation Dice {self.best_dice:.4f} at epoch {self.best_epoch + 1}"
                      if self.val_volumes else f"done: model.pt holds the weights after epoch {num_epochs}")
        return self.score

    @property
    def score(self) -> float:
        """The best validation Dice so far; NaN before any validation and without validation cases (fold -1)."""
        return self.best_dice if self.val_volumes and self.best_epoch >= 0 else float("nan")

    def _describe_fold(self) -> str:
        fold = self.config["fold"]
        return f"fold {fold}:" if self.val_volumes else f"fold {fold}: every training case, no validation;"

    def train_epoch(self, epoch: int) -> float:
        # Samples and their augmentation follow from (seed, epoch): a resumed run repeats them.
        self.sampler.set_epoch(epoch)
        torch.manual_seed(rank_seed(self.config["seed"] * 100_003 + epoch, self.run.rank))
        self.train_model.train()
        total, count = 0.0, 0
        for batch in self.loader:
            image = batch["image"].to(self.device, non_blocking=True, memory_format=torch.channels_last)
            label = batch["label"].to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                loss = self.loss_fn(self.train_model(image), label)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()  # per optimizer step: the schedule is set in steps (schedule.py)
            total, count = total + loss.item() * len(image), count + len(image)
        total, count = sum_over_ranks([total, count], self.run)
        return total / max(count, 1)

    def validate(self) -> float:
        """Mean Dice over the validation volumes; each rank predicts every world_size-th one. Each class's Dice
        over the volumes that hold it is kept in class_dice, for the trackers."""
        mine = self.val_volumes[self.run.rank::self.run.world_size]
        scores, by_class = [], []
        for volume in mine:
            probabilities = self.predictor.predict_slices_last(volume)
            scores.append(volume_dice(probabilities, volume.label))
            by_class.append(class_dice(probabilities, volume.label))
        names = metric_names(self.config["class_names"], self.config["output_classes"] - 1)
        self.class_dice = mean_by_class(gather_lists(by_class, self.run), names)
        return float(np.mean(gather_lists(scores, self.run)))

    def _validation_due(self, epoch: int) -> bool:
        if not self.val_volumes:  # fold -1: every case trains
            return False
        return (epoch + 1) % self.config["num_epochs_per_validation"] == 0 or epoch + 1 == self.num_epochs

    def _record(self, epoch: int, loss: float, dice: float | None, lr: float, seconds: float) -> None:
        if not self.run.is_main:  # only rank 0 writes files
            return
        log_csv = self.files.training_log
        new = not log_csv.exists()
        with open(log_csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(LOG_COLUMNS)
            dice_text = "" if dice is None else f"{dice:.5f}"
            writer.writerow([epoch + 1, f"{loss:.5f}", dice_text, f"{lr:.3e}", f"{seconds:.2f}"])
        remaining = (self.num_epochs - epoch - 1) * seconds
        dice_text = f" val_dice {dice:.4f} (best {self.best_dice:.4f})" if dice is not None else ""
        self.log.info(f"epoch {epoch + 1}/{self.num_epochs} loss {loss:.4f}{dice_text} "
                      f"lr {lr:.2e} {seconds:.1f}s eta {remaining / 60:.1f}min")

    def _publish(self, epoch: int, loss: float, dice: float | None) -> None:
        """The epoch's event, for the driver's progress bar and pruning; last, so that a driver that stops
        the training on it finds the epoch saved."""
        if self.run.is_main:
            append_event(self.files.events, epoch + 1, self.num_epochs, loss, dice)

    def _save_best(self, epoch: int) -> None:
        self._save_model(epoch, self.best_dice)

    def _save_model(self, epoch: int, score: float | None) -> None:
        """model.pt and its progress.yaml entry; score None: nothing was validated (fold -1), so the one entry
        describes the final weights."""
        if not self.run.is_main:
            return
        # "config" and "best_metric" as MONAI's own Auto3DSeg templates store them (tools rebuild config["network"])
        network = network_config(NetworkSettings.from_config(self.config), len(self.plan))
        atomic_save({"state_dict": self.model.state_dict(), "config": {"network": network}, "epoch": epoch + 1,
                     SCORE_KEY: score, "best_metric": score,
                     "inputs": {k: self.config[k] for k in INPUT_KEYS}}, self.files.model)
        progress = read_progress(self.files.progress) if score is not None else []
        progress.append({SCORE_KEY: score, "best_epoch": epoch + 1,
                         "input_variant": self.config["input_variant"], "fold": self.config["fold"]})
        write_progress(self.files.progress, progress)

    def _save_finished(self) -> None:
        """Mark the last progress.yaml entry (the one MONAI's get_score reads): the whole budget ran."""
        if not self.run.is_main:
            return
        progress = read_progress(self.files.progress)
        if progress:
            mark_finished(progress, self.num_epochs, self.budget.total_steps)
            write_progress(self.files.progress, progress)

    def _save_resume_state(self, epoch: int) -> None:
        if not self.run.is_main:
            return
        atomic_save({"epoch": epoch + 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "best_dice": self.best_dice, "best_epoch": self.best_epoch, "rng": rng_states()},
                    self.files.last_model)

    def _resume(self) -> int:
        path = self.files.last_model
        if not self.config["resume"] or not path.exists():
            for stale in () if not self.run.is_main else (self.files.training_log, self.files.progress,
                                                          self.files.model):
                stale.unlink(missing_ok=True)
            return 0
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_dice, self.best_epoch = state["best_dice"], state["best_epoch"]
        if "rng" in state:
            restore_rng_states(state["rng"])
        self._truncate_log(state["epoch"])
        self._truncate_progress(state["epoch"])
        best = f" (best Dice {self.best_dice:.4f})" if self.val_volumes else ""
        self.log.info(f"resumed from {path} after epoch {state['epoch']}{best}")
        return state["epoch"]

    def _truncate_log(self, epochs_done: int) -> None:
        """Drop log rows of epochs after the checkpoint: a killed run may have logged one more, or half a row."""
        if not self.run.is_main:
            return
        log_csv = self.files.training_log
        if log_csv.exists():
            rows = list(csv.reader(log_csv.open()))
            kept = [r for r in rows if len(r) == len(LOG_COLUMNS) and r[0].isdigit() and int(r[0]) <= epochs_done]
            write_text_atomic(log_csv, "".join(",".join(r) + "\n" for r in [LOG_COLUMNS, *kept]))

    def _truncate_progress(self, epochs_done: int) -> None:
        """Drop progress.yaml entries newer than the checkpoint (killed between saving model.pt and model_last.pt)."""
        if not self.run.is_main:
            return
        progress = read_progress(self.files.progress)
        kept = [{k: v for k, v in p.items() if k not in FINISHED_KEYS} for p in progress
                if p.get("best_epoch", 0) <= epochs_done]  # training goes on: not finished any more
        if kept != progress:
            write_progress(self.files.progress, kept)
