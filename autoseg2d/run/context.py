"""The run context: every input of a pipeline run, resolved once, before the stages after check run.

The command line's options win; what they leave out comes from the work dir's run.json (a
rerun needs only --work_dir), then from the defaults (profiles.yaml and the template's
hyper_parameters.yaml). The stages receive the context and never read run.json or the
datalist themselves. This module is the one that resolves those defaults: the datalist and
check modules take num_folds and modality as arguments, and the command line's `check` and
`datalist` commands reach them through check_only and make_datalist here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.check import CLEANED_DATALIST_NAME, check_inputs, finish_check, inspect_inputs, kept_cases
from autoseg2d.datalist import DatalistError, build_datalist, ensure_folds, parse_datalist, resolve_datalist
from autoseg2d.run.profiles import (default_num_folds, default_profile_name, load_profile,
                                    profile_sha256)
from autoseg2d.run.workdir import WorkDir, WorkDirError
from autoseg2d.templates import default_modality

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What the stages know about a run; made by resolve_context, never changed.

    Two datalists: `source_datalist` is the user's file (run.json records it and its sha256);
    `datalist` is what the stages read and the bundles train on: the source itself when it has
    folds, else its copy in the work dir with folds added, and without the cases the input
    check left out (--skip_bad), the check's copy. `training` and `testing` are its entries.
    """

    work: WorkDir
    source_datalist: Path
    datalist: Path
    dataroot: Path
    modality: str
    profile_name: str
    profile: dict  # the loaded profile (load_profile): sweep_trials, train_overrides, search_space, ...
    profile_sha256: str
    num_folds: int
    class_names: tuple[str, ...]
    training: tuple[dict, ...]  # {"image", "label", "fold"}, paths relative to dataroot
    testing: tuple[dict, ...]  # {"image"}
    storage: str | None  # the --storage URL shared by several machines; None: this work dir's own SQLite
    skip_bad: bool

    @property
    def sweep_storage(self) -> str:
        return self.storage or self.work.sweep_storage_url


@dataclass(frozen=True)
class DatalistFile:
    """A datalist the stages will read: the source as it is (text None), or a copy the run writes into its work
    dir, whose exact text is made before anything is written, so its sha256 can be checked first."""

    path: Path
    content: dict
    text: str | None

    @classmethod
    def copy(cls, path: Path, content: dict) -> DatalistFile:
        return cls(path, content, json.dumps(content, indent=2) + "\n")  # as write_json_atomic writes JSON

    def sha256(self, source_bytes: bytes) -> str:
        return hashlib.sha256(source_bytes if self.text is None else self.text.encode()).hexdigest()

    def write(self) -> None:
        if self.text is not None:
            write_text_atomic(self.path, self.text)


def resolve_context(work_dir: str, datalist: str | None, dataroot: str | None, profile: str | None,
                    modality: str | None, num_folds: int | None, storage: str | None, skip_bad: bool) -> RunContext:
    """Options, then run.json, then the defaults; then the check stage: folds added where the datalist has
    none, every input checked, run.json written.

    The datalist is read once, and the run's identity checked once, against everything it depends on (the
    datalist, the folds, the cases the check kept, the modality and the profile), before anything is written:
    a work dir made with other settings is refused as it was.
    """
    work = WorkDir.create(work_dir)
    recorded = work.load_run()
    if (datalist is None or dataroot is None) and not recorded:
        raise WorkDirError("give --datalist and --dataroot (or a --work_dir that has run before)")
    source = resolve_datalist(datalist or str(recorded["datalist"])).resolve()
    root = Path(str(dataroot)).resolve() if dataroot else recorded["dataroot"]
    profile_name = profile or recorded.get("profile") or default_profile_name()
    settings = load_profile(profile_name)
    chosen_modality = modality or recorded.get("modality") or default_modality()
    asked_folds = num_folds or recorded.get("num_folds")

    source_bytes = source.read_bytes()
    with_folds, check_folds = add_folds(work, source, source_bytes, root, asked_folds)
    content, report = inspect_inputs(str(with_folds.path), str(root), chosen_modality, num_folds=check_folds,
                                     work_dir=str(work.root), skip_bad=skip_bad,
                                     config_overrides=settings["train_overrides"],
                                     content=with_folds.content or None)
    used = with_folds
    if report["skipped"] and not report["errors"]:
        used = DatalistFile.copy(work.root / CLEANED_DATALIST_NAME, kept_cases(content, str(root), report))
    folds = report.get("num_folds") or check_folds
    identity = {"modality": chosen_modality, "profile": profile_name, "profile_sha256": profile_sha256(settings),
                "datalist_sha256": hashlib.sha256(source_bytes).hexdigest(), **({"num_folds": folds} if folds else {}),
                **({} if report["errors"] else {"used_datalist_sha256": used.sha256(source_bytes)})}
    if recorded.get("profile") not in (None, profile_name) and recorded.get("profile_sha256") == profile_sha256(
            {**settings, "name": recorded["profile"]}):
        # the run's profile under another name, changed at most in keys applied after the ensemble (a file of
        # `base: cpu` that adds `distill: true` to a finished cpu run): the same run, continued under that name
        logger.info(f"profile {profile_name}: the run's profile {recorded['profile']} with only keys applied after "
                    "the ensemble changed, so its trainings and ensemble are kept")
        work.check_same_run({k: v for k, v in identity.items() if k not in ("profile", "profile_sha256")})
    else:
        work.check_same_run(identity)

    if with_folds.text is not None:
        with_folds.write()
        logger.info(f"{source.name} has no folds: split into {folds} in {with_folds.path}")
    finish_check(report, work.root, skip_bad)
    if used is not with_folds:
        used.write()
        logger.info(f"check: {len(report['skipped'])} bad cases left out; using {work.relative(used.path)}")
    work.record_run(source, root, identity)
    return RunContext(work=work, source_datalist=source, datalist=used.path, dataroot=root,
                      modality=chosen_modality, profile_name=profile_name, profile=settings,
                      profile_sha256=identity["profile_sha256"], num_folds=folds,
                      class_names=tuple(report.get("class_names", [])), training=tuple(used.content["training"]),
                      testing=tuple(used.content.get("testing", [])), storage=storage, skip_bad=skip_bad)


def add_folds(work: WorkDir, source: Path, source_bytes: bytes, dataroot: Path,
              num_folds: int | None) -> tuple[DatalistFile, int | None]:
    """The datalist with folds: the user's own when it has them, else a copy for the work dir with folds added
    (num_folds of them, default: profiles.yaml), not yet written. Returns it and the folds the check is to
    find (None: as many as it holds). A file that is not a datalist comes back with empty content: the check
    reports what is wrong with it."""
    try:
        content = parse_datalist(source_bytes, source)
    except DatalistError:
        return DatalistFile(source, {}, None), num_folds
    if all("fold" in e for e in content["training"]):
        return DatalistFile(source, content, None), num_folds
    drawn = num_folds or default_num_folds()
    copy = DatalistFile.copy(work.root / f"{source.stem}_with_folds.json",
                             ensure_folds(content, drawn, seed=0, dataroot=str(dataroot)))
    return copy, drawn


def check_only(datalist: str, dataroot: str, modality: str | None = None, num_folds: int | None = None,
               work_dir: str | None = None, skip_bad: bool = False, output_classes: int | None = None,
               config_overrides: dict | None = None, cleaned_datalist: str | None = None) -> dict:
    """The inputs alone (`run_autoseg.py check`), as check_inputs with modality defaulting to the template's.
    The pipeline's check stage (resolve_context) also adds folds and records the run."""
    return check_inputs(datalist, dataroot, modality or default_modality(), num_folds=num_folds, work_dir=work_dir,
                        skip_bad=skip_bad, output_classes=output_classes, config_overrides=config_overrides,
                        cleaned_datalist=cleaned_datalist)


def make_datalist(root: str, output: str, layout: str = "auto", num_folds: int | None = None, seed: int = 0,
                  image_glob: str | None = None, label_glob: str | None = None) -> str:
    """A datalist from a data folder (`run_autoseg.py datalist`), as build_datalist with num_folds defaulting to
    profiles.yaml's."""
    return build_datalist(root, output, num_folds or default_num_folds(), layout=layout, seed=seed,
                          image_glob=image_glob, label_glob=label_glob)
