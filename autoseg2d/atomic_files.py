"""Files are written under a temporary name beside the target and renamed into place.

A crash, a kill or a reader in another process then sees the old file or the new one, never
half of one. The template's bundle_contract owns how (the template cannot import the driver, so
the driver takes the template's functions): one implementation for bundles and driver alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from autoseg2d.templates import template_module

_contract = template_module("bundle_contract")
atomic_path = _contract.atomic_path
write_text_atomic = _contract.write_text_atomic
write_mask = _contract.write_mask


def write_json_atomic(data, path: str | Path, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
