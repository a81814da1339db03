"""The exported bundle's ensemble: members' mean (or vote), the chosen post-processing, one NIfTI mask per scan.

This file is copied into the bundle's scripts/ next to the template's own scripts and runs
there, through ``python -m monai.bundle run``, with sibling imports only: the bundle needs
nothing from the repository it was exported from. It combines the members exactly as
autoseg2d.pipeline.ensemble.EnsemblePredictor does (tests/pipeline/test_export.py checks the
masks are identical).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the template's modules sit beside this file

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from bundle_contract import write_mask  # noqa: E402
from infer import InferClass  # noqa: E402
from postprocess import apply_multiclass_postprocessing, apply_postprocessing, reads_low_probabilities  # noqa: E402

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MEMBER_CONFIG = "hyper_parameters.yaml"


class EnsembleInference:
    def __init__(self, members: list[str], mode: str = "mean", postprocessing: dict | None = None,
                 screen: dict | None = None):
        """members: folders holding a member's hyper_parameters.yaml and model.pt (models/member_<i>); screen:
        {members: indices of the screening members, below: probability} or None (screen.py)."""
        if mode not in ("mean", "vote"):
            raise ValueError(f"ensemble mode {mode!r} is not known; use 'mean' or 'vote' (configs/inference.json)")
        self.members = [InferClass(str(Path(m) / MEMBER_CONFIG), ckpt_path=str(m), bundle_root=str(m))
                        for m in members]
        self.mode, self.postprocessing, self.screen = mode, postprocessing or None, screen or None

    def probabilities(self, image: str) -> np.ndarray:
        """Mean class probabilities (or vote fractions), (C, X, Y, Z); members that read and window a scan
        alike (equal InferClass.shared_inputs) read it once and run on the same batches."""
        groups: dict = {}
        for member in self.members:
            groups.setdefault(member.shared_inputs, []).append(member)
        total = None
        for group in groups.values():
            summed, _ = group[0].infer_together(str(image), group, self.mode == "vote")
            total = summed if total is None else total + summed
        return total / len(self.members)

    def predict(self, image: str, spacing_mm: tuple) -> tuple[np.ndarray, int]:
        """The post-processed mask and the slices the screen left to its members; with a screen as the driver's
        EnsemblePredictor.predict runs it (screen.py)."""
        members = self.members
        if not self.screen or len({m.shared_inputs for m in members}) != 1 or not hasattr(members[0], "infer_screened"):
            return self.mask(self.probabilities(image), spacing_mm), 0
        total, _, skipped = members[0].infer_screened(
            str(image), members, self.screen, self.mode == "vote", where="configs/inference.json (ensemble_screen)",
            complete_if=lambda mean: reads_low_probabilities(mean, spacing_mm, self.postprocessing))
        return self.mask(total / len(members), spacing_mm), skipped

    def mask(self, probabilities: np.ndarray, spacing_mm: tuple) -> np.ndarray:
        if self.postprocessing and self.postprocessing.get("kind") == "multiclass":
            return apply_multiclass_postprocessing(probabilities, spacing_mm, self.postprocessing)
        if self.postprocessing and probabilities.shape[0] == 2:
            return apply_postprocessing(probabilities[1], spacing_mm, self.postprocessing)
        return probabilities.argmax(0).astype(np.uint8)

    def predict_folder(self, dataset_dir: str, output_dir: str) -> list[str]:
        """A uint8 mask for every NIfTI scan in dataset_dir, under the scan's file name, header and affine."""
        images = sorted(p for p in Path(dataset_dir).iterdir() if p.name.endswith(NIFTI_SUFFIXES)) \
            if Path(dataset_dir).is_dir() else []
        if not images:
            raise FileNotFoundError(f"no .nii or .nii.gz scans in dataset_dir {dataset_dir}; pass the folder of scans"
                                    " as --dataset_dir on the monai.bundle command line")
        written = []
        for image in images:
            started = time.time()
            source = nib.load(str(image))
            spacing = tuple(float(z) for z in source.header.get_zooms()[:3])
            mask, skipped = self.predict(str(image), spacing)
            written.append(str(write_mask(mask, source.affine, source.header, Path(output_dir) / image.name)))
            volume_ml = float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0
            screened = f" ({skipped} slices left to the screening members)" if skipped else ""
            print(f"{image.name}: hemorrhage {volume_ml:.2f} mL, {time.time() - started:.1f}s{screened} -> "
                  f"{written[-1]}", flush=True)
        return written
