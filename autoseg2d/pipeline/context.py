"""The run context: every input of a pipeline run, resolved once, before the stages after check run.

The command line's options win; what they leave out comes from the work dir's run.json (a
rerun needs only --work_dir), then from the defaults (profiles.yaml and the template's
hyper_parameters.yaml). The stages receive the context and never read run.json or the
datalist themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from autoseg2d.atomic_files import write_json_atomic
from autoseg2d.check import check_inputs
from autoseg2d.datalist import DatalistError, ensure_folds, read_datalist, resolve_datalist, validate_folds
from autoseg2d.pipeline.profiles import (default_modality, default_num_folds, default_profile_name, load_profile,
                                         profile_sha256)
from autoseg2d.pipeline.workdir import WorkDir, WorkDirError, file_sha256

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


def resolve_context(work_dir: str, datalist: str | None, dataroot: str | None, profile: str | None,
                    modality: str | None, num_folds: int | None, storage: str | None, skip_bad: bool) -> RunContext:
    """Options, then run.json, then the defaults; then the check stage: folds added where the datalist has
    none, every input checked, run.json written. A work dir made with other settings is refused before
    anything is written into it."""
    work = WorkDir.create(work_dir)
    recorded = work.load_run()
    if (datalist is None or dataroot is None) and not recorded:
        raise WorkDirError("give --datalist and --dataroot (or a --work_dir that has run before)")
    source = resolve_datalist(datalist or str(recorded["datalist"])).resolve()
    root = Path(str(dataroot)).resolve() if dataroot else recorded["dataroot"]
    profile_name = profile or recorded.get("profile") or default_profile_name()
    settings = load_profile(profile_name)
    asked_folds = num_folds or recorded.get("num_folds")
    identity = {"modality": modality or recorded.get("modality") or default_modality(), "profile": profile_name,
                "profile_sha256": profile_sha256(settings)}
    work.check_same_run({**identity, **({"num_folds": asked_folds} if asked_folds else {}),
                         **({"datalist_sha256": file_sha256(source)} if source.is_file() else {})})

    with_folds, folds = add_folds(work, source, root, asked_folds)
    input_check = check_inputs(str(with_folds), str(root), modality=identity["modality"], num_folds=folds,
                               work_dir=str(work.root), skip_bad=skip_bad,
                               config_overrides=settings["train_overrides"])
    checked = Path(input_check["cleaned_datalist"] or with_folds)
    if input_check["cleaned_datalist"]:
        logger.info(f"check: {len(input_check['skipped'])} bad cases left out; using {work.relative(checked)}")
    settled = {"num_folds": input_check.get("num_folds") or folds, "used_datalist_sha256": file_sha256(checked)}
    work.check_same_run(settled)  # only now known: the folds the datalist holds and the cases kept
    work.record_run(source, root, {**identity, "datalist_sha256": file_sha256(source), **settled})
    content = read_datalist(checked)
    return RunContext(work=work, source_datalist=source, datalist=checked, dataroot=root,
                      modality=identity["modality"], profile_name=profile_name, profile=settings,
                      profile_sha256=identity["profile_sha256"], num_folds=settled["num_folds"],
                      class_names=tuple(input_check.get("class_names", [])),
                      training=tuple(content["training"]), testing=tuple(content.get("testing", [])),
                      storage=storage, skip_bad=skip_bad)


def add_folds(work: WorkDir, datalist: Path, dataroot: Path, num_folds: int | None) -> tuple[Path, int | None]:
    """The datalist with folds: the user's own when it has them, else a copy in the work dir with folds added
    (num_folds of them, default: profiles.yaml). Returns it and its number of folds (None: as the check finds)."""
    try:
        content = read_datalist(datalist)
    except DatalistError:
        return datalist, num_folds  # the check stage reports what is wrong with the file
    if all("fold" in e for e in content["training"]):
        return datalist, num_folds
    drawn = num_folds or default_num_folds()
    with_folds = ensure_folds(content, drawn, seed=0, dataroot=str(dataroot))
    target = work.root / f"{datalist.stem}_with_folds.json"
    write_json_atomic(with_folds, target)
    logger.info(f"{datalist.name} has no folds: split into {drawn} in {target}")
    return target, validate_folds(with_folds)
