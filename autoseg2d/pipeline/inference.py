"""Load a trained bundle's InferClass from its own scripts/infer.py (the template stays self-contained)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np


def load_inferer(bundle: Path):
    """InferClass of one bundle, configured by the bundle's own config file."""
    script = bundle / "scripts" / "infer.py"
    name = "segresnet2d_infer_" + hashlib.sha1(str(script.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.InferClass(str(bundle / "configs" / "hyper_parameters.yaml"))


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
