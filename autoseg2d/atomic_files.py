"""Files are written under a temporary name beside the target and renamed into place.

A crash, a kill or a reader in another process then sees the old file or the new one, never
half of one. The template's bundle_contract owns how (the template cannot import the driver, so
the driver calls the template's functions): one implementation for bundles and driver alike.
Looked up at the first write, not at import, so importing the driver loads no template script.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from autoseg2d.templates import CONTRACT, template_module


def atomic_path(path: str | Path) -> AbstractContextManager[Path]:
    """A temporary path beside `path` (same extension, so writers pick the format), renamed onto it on success."""
    return template_module(CONTRACT).atomic_path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return template_module(CONTRACT).write_text_atomic(path, text)


def write_mask(mask: np.ndarray, affine: np.ndarray, header, target: str | Path) -> Path:
    """A label mask as uint8 NIfTI with the source image's affine and header."""
    return template_module(CONTRACT).write_mask(mask, affine, header, target)


def write_json_atomic(data, path: str | Path, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
