"""The exported bundle's ensemble: members' mean (or vote), the chosen post-processing, one NIfTI mask per scan.

This file is copied into the bundle's scripts/ next to the template's own scripts and runs there
with sibling imports only: the bundle needs nothing from the repository it was exported from.
configs/inference.json wires it the way the MONAI model zoo's bundles are wired (datalist ->
dataset -> dataloader -> inferer -> evaluator), so tools that drive such bundles run it too.
Scans are read by MONAI's LoadImage (NIfTI, NRRD, a DICOM series folder); each mask keeps its
scan's grid and affine. The members are combined exactly as
autoseg2d.pipeline.predict.EnsemblePredictor combines them, and post-processing is the
product's own code, copied beside this file as postprocess.py at export
(tests/export/test_bundle.py checks that the masks are identical).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the template's modules sit beside this file

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from monai.data import decollate_batch  # noqa: E402

from bundle_contract import write_mask  # noqa: E402
from infer import InferClass  # noqa: E402
from postprocess import apply_multiclass_postprocessing, apply_postprocessing, reads_low_probabilities  # noqa: E402
from volumes import Volume, VolumeError, volume_from_array  # noqa: E402

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SCAN_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")  # what LoadImage reads in the default install
MEMBER_CONFIG = "hyper_parameters.yaml"
MASK_SUFFIX = ".nii.gz"


def list_scans(dataset_dir: str) -> list[str]:
    """The scans in dataset_dir: image files LoadImage reads, and sub-folders (each one DICOM series); hidden
    entries (.DS_Store, .ipynb_checkpoints) are not scans."""
    folder = Path(dataset_dir)
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    scans = sorted(str(p) for p in entries if p.is_dir() or p.name.lower().endswith(SCAN_SUFFIXES))
    if not scans:
        raise FileNotFoundError(f"no scans in dataset_dir {dataset_dir} (NIfTI, NRRD or MetaImage files, or one folder"
                                " per DICOM series); pass the folder of scans as --dataset_dir on the monai.bundle"
                                " command line, or the files as --datalist")
    return scans


def mask_name(source: str) -> str:
    """A mask's file name: a NIfTI scan's own name, else the scan's name (or series folder's) with .nii.gz."""
    name = Path(source).name
    if name.endswith(NIFTI_SUFFIXES) or Path(source).is_dir():
        return name if name.endswith(NIFTI_SUFFIXES) else name + MASK_SUFFIX
    return (name[: -len(Path(name).suffix)] if Path(name).suffix else name) + MASK_SUFFIX


def scan_volume(image, modality: str) -> Volume:
    """A scan read by LoadImage (a MetaTensor in the file's array order with its RAS affine) as the template's Volume,
    read and checked as the template's load_volume reads a NIfTI file."""
    source = str(image.meta.get("filename_or_obj", ""))
    data = np.asarray(image)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{source} has shape {data.shape}; a single-channel 3D scan (X, Y, Z) is expected")
    return volume_from_array(Path(source).name, data, np.asarray(image.affine, dtype=np.float64), modality, None,
                             source)


def spacing_mm(image) -> tuple[float, float, float]:
    """Voxel size along the file's axes: the NIfTI header's (as predict reads it), else the affine's columns."""
    pixdim = image.meta.get("pixdim")
    if pixdim is not None and len(pixdim) >= 4:
        return tuple(float(z) for z in np.asarray(pixdim)[1:4])
    return tuple(float(z) for z in np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0))


class EnsembleInference:
    """The bundle's inferer: a scan (as LoadImage reads it) in, its post-processed uint8 mask out."""

    def __init__(self, members: list[str], mode: str = "mean", postprocessing: dict | None = None,
                 screen: dict | None = None, device=None):
        """members: folders holding a member's hyper_parameters.yaml and model.pt (models/member_<i>); screen:
        {members: indices of the screening members, below: probability} or None (screen.py); device: where the
        members run (None: the GPU where there is one)."""
        if mode not in ("mean", "vote"):
            raise ValueError(f"ensemble mode {mode!r} is not known; use 'mean' or 'vote' (configs/inference.json)")
        self.members = [InferClass(str(Path(m) / MEMBER_CONFIG), device=device, ckpt_path=str(m), bundle_root=str(m))
                        for m in members]
        self.mode, self.postprocessing, self.screen = mode, postprocessing or None, screen or None

    def __call__(self, image) -> tuple[np.ndarray, int]:
        """The mask (X, Y, Z) in the scan's grid and the slices the screen left to its members."""
        return self.predict(scan_volume(image, self.members[0].config["modality"]), spacing_mm(image))

    def probabilities(self, image: str | Volume) -> np.ndarray:
        """Mean class probabilities (or vote fractions), (C, X, Y, Z); members that read and window a scan
        alike (equal InferClass.shared_inputs) read it once and run on the same batches."""
        groups: dict = {}
        for member in self.members:
            groups.setdefault(member.shared_inputs, []).append(member)
        total = None
        for group in groups.values():
            summed, _ = group[0].infer_together(image, group, self.mode == "vote")
            total = summed if total is None else total + summed
        return total / len(self.members)

    def predict(self, image: str | Volume, spacing: tuple) -> tuple[np.ndarray, int]:
        """The post-processed mask and the slices the screen left to its members; with a screen as the driver's
        EnsemblePredictor.predict runs it (screen.py)."""
        members = self.members
        if not self.screen or len({m.shared_inputs for m in members}) != 1 or not hasattr(members[0], "infer_screened"):
            return self.mask(self.probabilities(image), spacing), 0
        total, _, skipped = members[0].infer_screened(
            image, members, self.screen, self.mode == "vote", where="configs/inference.json (ensemble_screen)",
            complete_if=lambda mean: reads_low_probabilities(mean, spacing, self.postprocessing))
        return self.mask(total / len(members), spacing), skipped

    def mask(self, probabilities: np.ndarray, spacing: tuple) -> np.ndarray:
        if self.postprocessing and self.postprocessing.get("kind") == "multiclass":
            return apply_multiclass_postprocessing(probabilities, spacing, self.postprocessing)
        if self.postprocessing and probabilities.shape[0] == 2:
            return apply_postprocessing(probabilities[1], spacing, self.postprocessing)
        return probabilities.argmax(0).astype(np.uint8)


class MaskWriter:
    """The bundle's evaluator: every scan of the dataloader through the inferer, one mask per scan in output_dir
    (uint8 NIfTI, the scan's affine; a NIfTI scan's own header and file name)."""

    def __init__(self, dataloader, inferer: EnsembleInference, output_dir: str):
        self.dataloader, self.inferer, self.output_dir = dataloader, inferer, Path(output_dir)

    def run(self) -> list[str]:
        written = []
        for batch in self.dataloader:
            for item in decollate_batch(batch):
                started = time.time()
                image = item["image"]
                mask, skipped = self.inferer(image)
                written.append(str(self.write(mask, image)))
                volume_ml = float(np.count_nonzero(mask)) * float(np.prod(spacing_mm(image))) / 1000.0
                screened = f" ({skipped} slices left to the screening members)" if skipped else ""
                print(f"{Path(str(image.meta['filename_or_obj'])).name}: hemorrhage {volume_ml:.2f} mL, "
                      f"{time.time() - started:.1f}s{screened} -> {written[-1]}", flush=True)
        return written

    def write(self, mask: np.ndarray, image) -> Path:
        source = str(image.meta["filename_or_obj"])
        header = nib.load(source).header if source.endswith(NIFTI_SUFFIXES) else nib.Nifti1Header()
        return write_mask(mask, np.asarray(image.affine, dtype=np.float64), header,
                          self.output_dir / mask_name(source))
