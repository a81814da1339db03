"""Files are written under a temporary name beside the target and renamed into place.

A crash, a kill or a reader in another process then sees the old file or the new one,
never half of one. Temporary names carry the host name and process id, so concurrent writers
(several machines on one sweep, DDP ranks) do not collide; the rename is atomic on one file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same extension, e.g. .png or .nii.gz, so writers pick the format),
    renamed onto it on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, dot, extension = path.name.partition(".")
    temporary = path.with_name(f".{stem}.{socket.gethostname()}-{os.getpid()}.tmp{dot}{extension}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(data, path: str | Path, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
