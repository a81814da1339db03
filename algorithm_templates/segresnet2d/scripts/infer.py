"""Inference entry points: ``InferClass`` for MONAI's ensembles and ``infer.py run`` to write masks.

``InferClass(config_file).infer(image)`` returns channel-first class probabilities in the
image file's own grid (no resampling), as a MetaTensor carrying the file's affine.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules; MONAI loads this file by path

import fire  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

from bundle_config import ENSEMBLE_ONLY_KEYS, load_config  # noqa: E402
from bundle_contract import BundleFiles, write_mask  # noqa: E402
from datalist_split import read_datalist, testing_files  # noqa: E402
from gpu_memory import MemorySettings, explain_out_of_memory  # noqa: E402
from inputs import channel_plan, windows_for  # noqa: E402
from network import NetworkSettings, shape_divisor, trained_network  # noqa: E402
from predictor import SlicePredictor, autocast_dtype, inference_device, predict_together  # noqa: E402
from runtime import OpenVINONetwork, choose_runtime  # noqa: E402
from screen import Screen, screened_together  # noqa: E402
from volumes import Volume, from_ras, load_volume  # noqa: E402

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = BUNDLE_ROOT / "configs" / "hyper_parameters.yaml"


class InferClass:
    def __init__(self, config_file: str | list[str] | None = None, device: str | torch.device | None = None,
                 **override):
        """device: where the model runs (None: the GPU where there is one, else the CPU)."""
        override = {k: v for k, v in override.items() if k not in ENSEMBLE_ONLY_KEYS}
        config = load_config(config_file or str(DEFAULT_CONFIG), **override)
        files = BundleFiles(Path(config["ckpt_path"]))
        checkpoint_path = files.model
        if not checkpoint_path.is_file():
            raise FileNotFoundError(
                f"no trained model at {checkpoint_path}; train this bundle first (scripts/train.py)")
        self.device = inference_device() if device is None else torch.device(device)
        checkpoint = torch.load(checkpoint_path, map_location=self.device, weights_only=False)
        config.update(checkpoint["inputs"])  # the inputs the model was trained on win over later edits
        self.config = config
        windows = windows_for(config["modality"], config["ct_windows_hu"])
        plan = channel_plan(config["input_variant"], len(windows), config["num_adjacent_slices"])
        model = trained_network(NetworkSettings.from_config(config), len(plan), checkpoint["state_dict"],
                                device=self.device)
        self.predictor = SlicePredictor(model, plan, windows, shape_divisor(config["network"]["blocks_down"]),
                                        config["infer_batch_size"], self.device, config["amp"], config["infer_tta"],
                                        bool(config["infer_skip_air_slices"]))
        if choose_runtime(config["infer_cpu_runtime"], self.device) == "openvino":
            bf16 = autocast_dtype(self.device, config["amp"]) is not None
            self.predictor.network = OpenVINONetwork(model, len(plan), files.openvino_model, bf16)

    def infer(self, image_file: str | dict) -> MetaTensor:
        """Probabilities (C, X, Y, Z) for one image path (or a datalist entry {'image': path})."""
        path, volume = self.read(image_file)
        with explain_out_of_memory("inference", MemorySettings.from_config(self.config)):
            probabilities = torch.from_numpy(self.predictor.predict(volume))
        return MetaTensor(probabilities, affine=torch.as_tensor(volume.affine), meta={"filename_or_obj": str(path)})

    def read(self, image_file: str | dict | Volume) -> tuple[str, Volume]:
        """A path or datalist entry read here, or a Volume read elsewhere (the exported bundle reads with MONAI)."""
        if isinstance(image_file, Volume):
            return image_file.source, image_file
        path = image_file["image"] if isinstance(image_file, dict) else image_file
        return path, load_volume(path, None, self.config["modality"])

    @property
    def shared_inputs(self) -> tuple:
        """InferClasses with equal values can be predicted together (infer_together): they read the image alike
        and cut it into the same batches (each still builds its own input variant's channels)."""
        return self.config["modality"], self.predictor.batch_key

    def infer_together(self, image_file: str | dict, members: list[InferClass], vote: bool = False,
                       member_masks: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Several bundles' models over one image, which is read once for all of them and windowed once per
        input variant.

        Returns the sum of their probabilities (with vote, of their one-hot masks), (C, X, Y, Z) in
        the file's grid, and with member_masks each member's argmax mask (X, Y, Z) uint8.
        """
        volume = self._read_for(image_file, members)
        with explain_out_of_memory("inference", MemorySettings.from_config(self.config)):
            total, masks = predict_together([m.predictor for m in members], volume, vote, member_masks)
        return from_ras(total, volume.affine), [from_ras(mask[None], volume.affine)[0] for mask in masks]

    def infer_screened(self, image_file: str | dict, members: list[InferClass], screen: dict, vote: bool = False,
                       member_masks: bool = False, complete_if: Callable[[np.ndarray], bool] | None = None,
                       where: str = "the ensemble's screen") -> tuple[np.ndarray, list[np.ndarray | None], int]:
        """infer_together with a screening pass (screen.py): `screen` = {members: indices of the screening
        members, below: probability}, as an ensemble file stores it (`where` names that file in errors).

        `complete_if(mean probabilities (C, X, Y, Z))` True runs the skipped slices through every member
        as well. Returns the summed probabilities, each member's mask in the members' order (None for a
        member that skipped slices: it has no whole mask) and the number of slices skipped.
        """
        settings = Screen.from_settings(screen, len(members), where)
        volume = self._read_for(image_file, members)
        asked = None if complete_if is None else \
            (lambda summed: complete_if(from_ras(summed / len(members), volume.affine)))
        with explain_out_of_memory("inference", MemorySettings.from_config(self.config)):
            result = screened_together([m.predictor for m in members], volume, settings, vote, member_masks, asked)
        masks = [None if mask is None else from_ras(mask[None], volume.affine)[0] for mask in result.masks]
        return from_ras(result.total, volume.affine), masks, len(result.skipped)

    def _read_for(self, image_file: str | dict, members: list[InferClass]) -> Volume:
        unlike = [index for index, m in enumerate(members) if m.shared_inputs != self.shared_inputs]
        if unlike:
            raise ValueError(f"members {unlike} read the image or cut it into batches differently from this "
                             "bundle; group members by InferClass.shared_inputs")
        return self.read(image_file)[1]

    def write_mask(self, image_file: str, output_dir: str) -> Path:
        """Write the argmax mask as uint8 NIfTI with the input's file name, affine and header."""
        probabilities = self.infer(image_file)
        source = nib.load(str(image_file))  # the header only: infer() has read and checked the voxels
        return write_mask(probabilities.argmax(0).numpy(), source.affine, source.header,
                          Path(output_dir) / Path(image_file).name)


def run(config_file: str | list[str] | None = None, output_dir: str | None = None, files: str | list | None = None,
        **override) -> list[str]:
    """Write masks for ``--files`` (comma-separated or list) or, by default, the datalist's testing images."""
    infer = InferClass(config_file, **override)
    if files is None:
        entries = testing_files(read_datalist(infer.config["data_list_file_path"]), infer.config["data_file_base_dir"])
        files = [e["image"] for e in entries]
    elif isinstance(files, str):
        files = [f for f in files.split(",") if f]
    output_dir = output_dir or os.path.join(infer.config["bundle_root"], "prediction_testing")
    written = []
    for file in files:
        started = time.time()
        written.append(str(infer.write_mask(file, output_dir)))
        print(f"{Path(file).name}: {time.time() - started:.1f}s -> {written[-1]}", flush=True)
    return written


if __name__ == "__main__":
    fire.Fire({"run": run})
