"""Check the datalist, its NIfTI files, the config overrides and the work dir before anything trains.

    python run_autoseg.py check --datalist datalist.json --dataroot /data/instance22 --work_dir work

Every problem is collected and reported at once (case, file, what is wrong, how to fix it),
so one run lists everything to fix. The per-file checks are the template's own
(`scripts/volumes.py`, loaded by path), so `check` and training can never disagree about a case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from autoseg2d.atomic_files import write_json_atomic
from autoseg2d.datalist import DatalistError, read_class_names, read_datalist, validate_folds
from autoseg2d.templates import template_config, template_module

logger = logging.getLogger(__name__)

# The default network has ~30 M parameters (120 MB of float32). A trained fold keeps model.pt (weights)
# and model_last.pt (weights + two AdamW moments, 360 MB), and replacing model_last.pt briefly needs a
# second copy: about 1 GB per fold at peak.
CHECKPOINT_GB_PER_FOLD = 1.0
# Data statistics, masks, probabilities of one case at a time, reports and logs.
OTHER_OUTPUTS_GB = 1.0
# Label ids above this are not classes: no hemorrhage data set has more subtypes (BHSD 5, MBH-Seg 6),
# and 255 is what a 0/255 mask holds.
MAX_LABEL_ID = 20
UINT8_LABEL_LIMIT = 256  # check_training_case bound that never fires: the data's own ids are checked here
REPORT_NAME = "input_check.json"
CLEANED_DATALIST_NAME = "datalist_checked.json"


class InputCheckError(ValueError):
    """Every problem found by check_inputs, one per line; the full report is in `.report`."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def derive_required_disk_gb(num_folds: int) -> float:
    """Peak disk use of a run: checkpoints of every fold plus data statistics, predictions and reports."""
    return num_folds * CHECKPOINT_GB_PER_FOLD + OTHER_OUTPUTS_GB


def check_work_dir(work_dir: str | Path, num_folds: int | None) -> list[str]:
    """Problems with the folder every stage writes into: not a folder, not writable, too little free space
    (checked when the number of folds is known: a datalist that does not tell it is reported on its own)."""
    work_dir = Path(work_dir).absolute()
    existing = next(p for p in (work_dir, *work_dir.parents) if p.exists())
    if not existing.is_dir():
        return [f"work dir {work_dir}: {existing} is a file, not a folder; choose another --work_dir"]
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".write_check_")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return [f"work dir {work_dir}: cannot write to {existing} ({err.strerror or err}); "
                "choose a folder you can write to, or fix its permissions"]
    if num_folds is None:
        return []
    free_gb = shutil.disk_usage(existing).free / 2**30
    needed_gb = derive_required_disk_gb(num_folds)
    if free_gb < needed_gb:
        return [f"work dir {work_dir}: {free_gb:.1f} GB free, about {needed_gb:.0f} GB needed "
                f"({CHECKPOINT_GB_PER_FOLD:.0f} GB of checkpoints per fold x {num_folds} folds + "
                f"{OTHER_OUTPUTS_GB:.0f} GB for statistics, predictions and reports); "
                "free space or choose another disk"]
    return []


def check_config(overrides: dict, config_file: str | Path | None = None, modality: str | None = None) -> list[str]:
    """Unknown keys, wrong types and unknown choices among config overrides (the template's own checks), for the
    run's modality (the bundles get it; CT windows matter only for CT)."""
    bundle_config, inputs = template_module("bundle_config"), template_module("inputs")
    config_file = config_file or template_config()
    overrides = {**overrides, **({"modality": modality} if modality else {})}
    problems = []
    for key, value in overrides.items():
        try:
            bundle_config.load_config(str(config_file), **{key: value})
        except bundle_config.ConfigError as err:
            problems.append(f"config: {err}")
    if problems:
        return problems
    config = bundle_config.load_config(str(config_file), **overrides)
    try:
        windows = inputs.windows_for(config["modality"], config["ct_windows_hu"])
        inputs.channel_plan(config["input_variant"], len(windows), config["num_adjacent_slices"])
    except ValueError as err:
        problems.append(f"config: {err}")
    return problems


def _resolve(path: str, dataroot: str) -> str:
    return path if os.path.isabs(path) else os.path.join(dataroot, path)


def _check_case(entry: dict, role: str, dataroot: str, modality: str, output_classes: int | None) -> dict:
    """One case through the template's loader and checks; its voxel hash finds copies under other names."""
    volumes = template_module("volumes")
    image = _resolve(entry["image"], dataroot)
    label = _resolve(entry["label"], dataroot) if role == "training" else None
    finding = {"case": volumes.case_name(image), "role": role, "image": image, "label": label,
               "fold": entry.get("fold"), "status": "ok", "problems": [], "notes": [], "sha1": None, "label_ids": []}
    try:
        volume = volumes.load_volume(image, label, modality)
        if role == "training":
            finding["notes"] = volumes.check_training_case(volume, output_classes or UINT8_LABEL_LIMIT, modality)
            finding["label_ids"] = np.flatnonzero(np.bincount(volume.label.ravel())).tolist()
        else:
            volumes.check_ct_range(volume, modality)
            if volume.num_slices < volumes.MIN_TRAINING_SLICES:
                finding["notes"] = [f"case {finding['case']}: the image has one axial slice; it is predicted "
                                    "with that slice standing in for its missing neighbours"]
    except volumes.VolumeError as err:
        finding["status"], finding["problems"] = "error", [str(err)]
        return finding
    finding["sha1"] = hashlib.sha1(volume.image.tobytes() + str(volume.image.shape).encode()).hexdigest()
    return finding


def _mark_copies(findings: list[dict]) -> None:
    """The same scan under two names leaks between folds (or into testing): the later entry is the problem."""
    first_seen: dict[str, dict] = {}
    for finding in findings:
        if finding["sha1"] is None:
            continue
        original = first_seen.setdefault(finding["sha1"], finding)
        if original is not finding and os.path.normpath(original["image"]) != os.path.normpath(finding["image"]):
            finding["status"] = "error"
            finding["problems"].append(
                f"case {finding['case']}: {finding['image']} ({finding['role']}) has the same voxels as case "
                f"{original['case']} ({original['role']}, {original['image']}); a duplicate scan leaks between "
                "folds or into testing: keep one of them")


def _cleaned(datalist: dict, dataroot: str, skipped: list[dict]) -> dict:
    """The datalist without the skipped entries; everything else (paths, folds, extra keys) as it was."""
    bad = {(f["role"], os.path.normpath(f["image"])) for f in skipped}
    result = json.loads(json.dumps(datalist))
    for role in ("training", "testing"):
        if isinstance(result.get(role), list):
            result[role] = [e for e in result[role] if not isinstance(e, dict) or not isinstance(e.get("image"), str)
                            or (role, os.path.normpath(_resolve(e["image"], dataroot))) not in bad]
    return result


def check_inputs(
    datalist: str,
    dataroot: str,
    modality: str,
    num_folds: int | None = None,
    work_dir: str | None = None,
    skip_bad: bool = False,
    output_classes: int | None = None,
    config_overrides: dict | None = None,
    cleaned_datalist: str | None = None,
) -> dict:
    """Check everything a run needs before it starts; return the report or raise InputCheckError listing every problem.

    datalist/dataroot: the MONAI datalist and the folder its relative paths start from.
    modality: ct (HU checks) or another (z-scored, any range); the command line's default is the template's.
    num_folds: the folds the datalist must hold (default: as many as it has).
    work_dir: where the run writes; checked for write permission and free space (and gets input_check.json).
    skip_bad: leave out cases that fail their checks instead of stopping, and write the remaining cases to
        cleaned_datalist (default <work_dir>/datalist_checked.json). Datalist, config and work-dir problems
        still stop the run.
    output_classes: background + label classes; by default the datalist's class_names (one per label id) or,
        without them, the label ids the data holds (up to MAX_LABEL_ID); 0/255 masks fail.
    config_overrides: {key: value} settings for the template, checked for unknown keys, types and choices.
    """
    content, report = inspect_inputs(datalist, dataroot, modality, num_folds=num_folds, work_dir=work_dir,
                                     skip_bad=skip_bad, output_classes=output_classes,
                                     config_overrides=config_overrides)
    target = cleaned_datalist or (Path(work_dir) / CLEANED_DATALIST_NAME if work_dir else None)
    if content is not None and report["skipped"] and not report["errors"] and target is not None:
        report["cleaned_datalist"] = str(write_json_atomic(kept_cases(content, dataroot, report), target))
    finish_check(report, work_dir, skip_bad)
    return report


def inspect_inputs(datalist: str, dataroot: str, modality: str, *, num_folds: int | None = None,
                   work_dir: str | None = None, skip_bad: bool = False, output_classes: int | None = None,
                   config_overrides: dict | None = None, content: dict | None = None) -> tuple[dict | None, dict]:
    """What check_inputs finds, without writing or raising: (the datalist's content, the report).

    content: the datalist as its caller already read it (the run context reads it once); None: read here
    (a file that cannot be read is then one of the report's errors). The options are check_inputs'.
    """
    report: dict = {"datalist": str(datalist), "dataroot": str(dataroot), "modality": modality,
                    "errors": [], "warnings": [], "cases": [], "skipped": [], "cleaned_datalist": None}
    errors = report["errors"]
    if content is None:
        try:
            content = read_datalist(datalist)
        except DatalistError as err:
            errors.append(str(err))
    if content is not None:
        _check_datalist(content, dataroot, modality, num_folds, output_classes, skip_bad, report)
    if config_overrides:
        errors.extend(check_config(config_overrides, modality=modality))
    if work_dir is not None:
        errors.extend(check_work_dir(work_dir, report.get("num_folds") or num_folds))
    return content, report


def kept_cases(content: dict, dataroot: str, report: dict) -> dict:
    """The datalist without the cases the report skipped; everything else (paths, folds, extra keys) as it was."""
    skipped = [f for f in report["cases"] if f["status"] == "skipped"]
    return _cleaned(content, dataroot, skipped) if skipped else content


def finish_check(report: dict, work_dir: str | Path | None, skip_bad: bool) -> None:
    """Log the report's warnings, write it as input_check.json into the work dir, and raise InputCheckError
    listing every problem it holds."""
    errors = report["errors"]
    for warning in report["warnings"]:
        logger.warning(warning)
    if work_dir is not None and not any(e.startswith("work dir") for e in errors):
        write_json_atomic(report, Path(work_dir) / REPORT_NAME)
    if errors:
        fix = "" if skip_bad else "; or pass --skip_bad to leave the bad cases out"
        lines = "\n".join(f"  {i}. {e}" for i, e in enumerate(errors, 1))
        raise InputCheckError(f"input check found {len(errors)} problem(s) in {report['datalist']} (dataroot "
                              f"{report['dataroot']}):\n{lines}\nFix them and run again{fix}", report)
    logger.info(f"input check: {len(report['cases'])} cases checked, {len(report['skipped'])} skipped, "
                f"{len(report['warnings'])} warnings; {_describe_classes(report)}")


def _check_dataroot(entries: list[tuple[str, dict]], dataroot: str) -> str | None:
    """One message, instead of one per file, when the data root is missing or holds none of the listed files."""
    keys = {"training": ("image", "label"), "testing": ("image",)}
    paths = [_resolve(entry[key], dataroot) for role, entry in entries for key in keys[role]]
    if not paths or any(os.path.exists(p) for p in paths):
        return None
    examples: dict[tuple[str, str], str] = {}  # the first entry of each kind shows the layout
    for role, entry in entries:
        for key in keys[role]:
            examples.setdefault((role, key), entry[key])
    where = (f"--dataroot {dataroot} does not exist" if not os.path.isdir(dataroot)
             else f"none of the {len(paths)} files the datalist lists exists under --dataroot {dataroot}")
    return (f"{where}; the datalist expects files like {', '.join(examples.values())} under it (its paths are "
            "relative to the data root): pass --dataroot the folder that holds them")


def _describe_classes(report: dict) -> str:
    ids, names = report.get("label_ids", []), report.get("class_names", [])
    foreground = [i for i in ids if i > 0]
    named = f" ({', '.join(names)})" if names else ""
    count = len(names) or max(foreground, default=0)
    return f"label ids {ids}: {count} label class{'' if count == 1 else 'es'}{named}"


def _check_classes(findings: list[dict], output_classes: int | None, class_names: list[str], source: str) -> None:
    """Label ids against the classes: output_classes when given (the template checked those), else the
    datalist's class_names, else only that the ids are plausible class ids (no 0/255 masks)."""
    if output_classes is not None:
        return
    if class_names:
        limit, what = len(class_names), f"the {len(class_names)} classes in class_names {class_names} of {source}"
        fix = "add the missing class names, or correct the label file"
    else:
        limit, what = MAX_LABEL_ID, f"{MAX_LABEL_ID}, more classes than any hemorrhage data set has"
        fix = "0/255 masks must be converted to 0/1 (or 0..N for N classes)"
    for finding in findings:
        if finding["label_ids"] and max(finding["label_ids"]) > limit:
            finding["status"] = "error"
            finding["problems"].append(f"case {finding['case']} ({finding['label']}): label values "
                                       f"{finding['label_ids']} exceed {what}; {fix}")


def _check_datalist(content: dict, dataroot: str, modality: str, num_folds: int | None, output_classes: int | None,
                    skip_bad: bool, report: dict) -> None:
    errors = report["errors"]
    try:
        report["class_names"] = read_class_names(content, report["datalist"])
    except DatalistError as err:
        report["class_names"] = []
        errors.append(f"datalist: {err}")
    try:
        report["num_folds"] = validate_folds(content, num_folds)
    except DatalistError as err:
        errors.append(f"datalist: {err}")
    entries = []
    for role in ("training", "testing"):
        needed = ("image", "label") if role == "training" else ("image",)
        for entry in content.get(role, []) if isinstance(content.get(role), list) else []:
            if isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in needed):
                entries.append((role, entry))
            elif role == "testing":
                errors.append(f"datalist: testing entry {entry!r} needs an 'image' path")
    missing_root = _check_dataroot(entries, dataroot)
    if missing_root:
        errors.append(missing_root)
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # gzip and numpy release the GIL
        findings = list(pool.map(lambda item: _check_case(item[1], item[0], dataroot, modality, output_classes),
                                 entries))
    _check_classes(findings, output_classes, report["class_names"], report["datalist"])
    report["label_ids"] = sorted({i for f in findings for i in f["label_ids"]})
    _mark_copies(findings)
    for finding in findings:
        report["warnings"].extend(finding["notes"])
        if finding["status"] == "error" and skip_bad:
            finding["status"] = "skipped"
            report["skipped"].append(finding["case"])
            report["warnings"].extend(f"skipped: {p}" for p in finding["problems"])
        elif finding["status"] == "error":
            errors.extend(finding["problems"])
        finding.pop("sha1")
    report["cases"] = findings
    skipped = [f for f in findings if f["status"] == "skipped"]
    if skipped and "num_folds" in report:
        try:
            validate_folds(_cleaned(content, dataroot, skipped), report["num_folds"])
        except DatalistError as err:
            errors.append(f"datalist without the {len(skipped)} skipped cases: {err}")
