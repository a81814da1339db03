"""The work dir: where each stage keeps its outputs, with every stored path relative to it.

A work dir can be moved or copied: ``run.json`` records the datalist and dataroot relative
to the work dir when they lie inside it, and bundles are re-pointed at the data on every run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from autoseg2d.atomic_files import write_text_atomic


DEFAULT_WORK_DIR = "work"  # what the commands use without --work_dir


class WorkDirError(ValueError):
    pass


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class WorkDir:
    root: Path

    @classmethod
    def create(cls, root: str | Path) -> WorkDir:
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def datastats(self) -> Path:
        return self.root / "datastats.yaml"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def sweep_storage_url(self) -> str:
        (self.root / "sweep").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.root / 'sweep' / 'optuna.db'}"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def ensemble_file(self) -> Path:
        return self.root / "ensemble" / "ensemble.json"

    @property
    def student_file(self) -> Path:
        """The student distilled from the ensemble (distill.py), in ensemble.json's form."""
        return self.root / "student" / "student.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def relative(self, path: str | Path) -> str:
        """Path relative to the work dir when it lies inside it, else absolute."""
        path = Path(path).resolve()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def absolute(self, stored: str) -> Path:
        return (self.root / stored).resolve()

    def load_run(self) -> dict:
        """run.json with its datalist and dataroot as absolute paths; {} before the first run."""
        if not self.run_file.exists():
            return {}
        run = json.loads(self.run_file.read_text())
        run["datalist"], run["dataroot"] = self.absolute(run["datalist"]), self.absolute(run["dataroot"])
        return run

    def check_same_run(self, identity: dict) -> None:
        """Raise if run.json records other values for any of these keys (what the run's results depend on:
        the datalist's content, the modality, the profile's name and content, the folds, ...)."""
        previous = self.load_run()
        changed = [key for key in identity if key in previous and previous[key] != identity[key]]
        if changed:
            was = ", ".join(f"{key} {previous[key]!r} -> {identity[key]!r}" for key in changed)
            raise WorkDirError(
                f"{self.root} holds a run made with other settings ({was}); its sweep, models and ensemble"
                " would not match. Rerun with the earlier settings, use a new --work_dir, or delete this one"
                " to start over.")

    def record_run(self, datalist: Path, dataroot: Path, identity: dict) -> None:
        """Write run.json: the datalist and dataroot (relative when inside the work dir, so it can move) and
        the identity, which the caller has checked against the earlier run with check_same_run."""
        run = {"datalist": self.relative(datalist), "dataroot": self.relative(dataroot), **identity}
        write_text_atomic(self.run_file, json.dumps(run, indent=2))
