"""Load a trained bundle's InferClass from its own scripts/infer.py (the template stays self-contained)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np

from autoseg2d.templates import BUNDLE_CONFIG, bundle_module, template_module


def load_inferer(bundle: Path, **override):
    """InferClass of one bundle, configured by the bundle's own config file (and `override`, as its CLI takes them).

    Not MONAI's BundleAlgo.get_inferer: that executes each infer.py as sys.modules["InferClass"] and lets
    its siblings land under their plain names, so in one process every ensemble member after the first
    would run the first bundle's modules; templates.bundle_module loads each bundle's scripts on their own.
    """
    return bundle_module(bundle, "infer").InferClass(str(Path(bundle) / BUNDLE_CONFIG), **override)


def foreground(probabilities: np.ndarray) -> np.ndarray:
    """Any label class (argmax > 0) as a {0,1} mask, the way the challenge merges hemorrhage subtypes."""
    return (np.asarray(probabilities).argmax(0) > 0).astype(np.uint8)


def read_mask(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A label file as a {0,1} foreground mask plus its spacing (mm) from the header."""
    image = nib.load(str(path))
    return (np.asanyarray(image.dataobj) > 0).astype(np.uint8), tuple(float(z) for z in image.header.get_zooms()[:3])


def read_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A label file as class ids (uint8) plus its spacing (mm) from the header."""
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj).astype(np.uint8), tuple(float(z) for z in image.header.get_zooms()[:3])


def check_scan(image: Path, modality: str, source: str | None = None) -> str:
    """Read a scan to predict, refuse it as the check stage would (the template's volumes.check_ct_range: the
    one owner of the HU rule), and return its identity: a hash of the voxels and affine the members will read.

    The identity is of the content, not path, size and time: a DICOM series is predicted from a NIfTI file
    written afresh in a temporary folder each run, and a copied or touched scan is the same input, while a
    scan rewritten in place with the same size and time is not. `source` names the input in messages (a DICOM
    series folder). Raises the template's VolumeError (a ValueError: one line, no traceback, on the CLI).
    """
    volumes = template_module("volumes")
    volume = volumes.load_volume(image, None, modality)
    volume.source = source or str(image)
    volumes.check_ct_range(volume, modality)
    digest = hashlib.sha256(str(volume.image.shape).encode() + volume.image.tobytes())
    digest.update(np.asarray(volume.affine, np.float64).tobytes())
    return digest.hexdigest()[:20]
