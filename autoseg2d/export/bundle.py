"""Export a finished ensemble as a self-contained MONAI bundle (``run_autoseg.py export``).

The bundle runs with ``python -m monai.bundle run --config_file <bundle>/configs/inference.json``
and imports nothing from this repository: the template's scripts travel in its scripts/
folder, with the post-processing code and the ensemble runner (bundle_files/) beside them,
each member's weights and settings in models/member_<i>/. models/model.pt is a copy of member 0's
checkpoint with labels.csv beside it: tools that take the folder above the first model.pt they find
as the bundle root (3D Slicer's MONAIAuto3DSeg) find it there, before any member's, and tools that
load models/model.pt as one network get a working member. It is built in a temporary folder
beside the target and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from autoseg2d.export.metadata import bundle_readme, inference_config, metadata
from autoseg2d.pipeline.distill import ENSEMBLE, load_model
from autoseg2d.export.label_codes import labels_csv
from autoseg2d.run.workdir import DEFAULT_WORK_DIR, WorkDir, WorkDirError
from autoseg2d.reporting.case_report import lesion_class_names
from autoseg2d.templates import BUNDLE_CONFIG, CONTRACT, bundle_config, bundle_contract, bundle_files, template_dir

BUNDLE_FILES = Path(__file__).resolve().parent / "bundle_files"
PACKAGE = Path(__file__).resolve().parents[1]
# Repository modules the bundle needs, copied into scripts/ under their file names with their package imports made
# sibling imports.
COPIED_MODULES = {PACKAGE / "pipeline" / "postprocess.py": ("from autoseg2d.evaluation.metrics import",
                                                            "from metrics import"),
                  PACKAGE / "evaluation" / "metrics.py": None}
MEMBER_CONFIG = BUNDLE_CONFIG.name
# BundleFiles names of kept conversions (runtime.py): an OpenVINO .xml has its .bin beside it
CONVERTED_FILES = ("openvino_model",)
LABELS_CSV = "labels.csv"  # beside models/model.pt, where 3D Slicer's MONAIAuto3DSeg reads it
PATH_KEYS = ("bundle_root", "data_file_base_dir", "data_list_file_path", "distill_targets")  # only in the work dir


class ExportError(WorkDirError):
    pass


def export_bundle(work_dir: str = DEFAULT_WORK_DIR, output: str = "ich_bundle", model: str | None = None) -> str:
    """Write the work dir's finished model to OUTPUT as a MONAI bundle; returns OUTPUT. --model student |
    ensemble: the student distilled from the ensemble (the default where the work dir has one; then
    models/model.pt is the student) or the ensemble.

    Run it with: python -m monai.bundle run --config_file OUTPUT/configs/inference.json
    --dataset_dir scans/ --output_dir masks/ (OUTPUT/docs/README.md says more).
    """
    work, target = WorkDir(Path(str(work_dir)).resolve()), Path(str(output)).resolve()
    ensemble = finished_model(work, model)
    members = [member_files(work, member) for member in ensemble["members"]]
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not empty; choose another --output or delete it")
    staging = target.with_name(f".{target.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_bundle(staging, work, ensemble, members)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {len(members)} members to {target}; run it with\n  python -m monai.bundle run --config_file "
          f"{target / 'configs' / 'inference.json'} --dataset_dir SCANS --output_dir MASKS", flush=True)
    return str(target)


def finished_model(work: WorkDir, model: str | None) -> dict:
    """distill.load_model's choice (it checks `model`), with the export's words where there is no ensemble."""
    wants_ensemble = model == ENSEMBLE or (model is None and not work.student_file.exists())
    if wants_ensemble and not work.ensemble_file.exists():
        raise ExportError(
            f"{work.root} has no finished ensemble ({work.relative(work.ensemble_file)} is missing), so there is"
            f" nothing to export. Finish the pipeline first: python run_autoseg.py ensemble --work_dir {work.root}")
    return load_model(work, model)


def member_files(work: WorkDir, member: dict) -> dict:
    """A member's bundle folder, config and checkpoint, found where the bundle's own config says."""
    bundle = work.absolute(member["bundle"])
    config_file = bundle / BUNDLE_CONFIG
    if not config_file.is_file():
        raise ExportError(f"ensemble member {member['bundle']} has no {config_file}; the work dir {work.root} is"
                          " incomplete: rerun the pipeline there (run_autoseg.py ensemble) before exporting")
    parser = bundle_config(bundle)
    checkpoint = bundle_files(bundle).model
    if not checkpoint.is_file():
        raise ExportError(f"ensemble member {member['bundle']} has no trained model ({checkpoint} is missing);"
                          f" finish training first: python run_autoseg.py ensemble --work_dir {work.root}")
    return {**member, "path": bundle, "config_file": config_file, "checkpoint": checkpoint,
            "config": parser.get()}


def write_bundle(root: Path, work: WorkDir, ensemble: dict, members: list[dict]) -> None:
    copy_scripts(members, root / "scripts")
    for index, member in enumerate(members):
        folder = root / "models" / f"member_{index}"
        folder.mkdir(parents=True)
        files = bundle_contract(member["path"]).BundleFiles
        shutil.copy2(member["checkpoint"], files(folder).model)
        copy_converted(files(member["checkpoint"].parent), files(folder))
        settings = {**member["config"], **{key: "" for key in PATH_KEYS}}
        (folder / MEMBER_CONFIG).write_text(json.dumps(settings, indent=1))  # JSON is YAML; no reformatting
    first = bundle_contract(members[0]["path"]).BundleFiles
    shutil.copy2(first(root / "models" / "member_0").model, first(root / "models").model)
    classes = ["background", *lesion_class_names(members[0]["config"])]
    (root / "models" / LABELS_CSV).write_text(labels_csv(classes[1:]))
    (root / "configs").mkdir()
    write_json(root / "configs" / "inference.json", inference_config(ensemble, len(members)))
    write_json(root / "configs" / "metadata.json", metadata(ensemble, classes, work.root.name))
    (root / "docs").mkdir()
    shutil.copy2(BUNDLE_FILES / "metadata_schema.json", root / "docs" / "metadata_schema.json")
    (root / "docs" / "README.md").write_text(bundle_readme(ensemble, classes))
    shutil.copy2(BUNDLE_FILES / "LICENSE", root / "LICENSE")


def copy_converted(source, target) -> None:
    """The member's kept OpenVINO conversion, where made: the exported bundle then starts without converting (the
    conversion records the sha256 of the checkpoint it was made from, which is copied too)."""
    for name in CONVERTED_FILES:
        if not hasattr(source, name):  # a contract from before that file existed
            continue
        kept, copy = getattr(source, name), getattr(target, name)
        pairs = [(kept, copy)]
        if kept.suffix == ".xml":
            pairs.append((kept.with_suffix(".bin"), copy.with_suffix(".bin")))
        for path, destination in pairs:
            if path.is_file():
                shutil.copy2(path, destination)


def copy_scripts(members: list[dict], scripts: Path) -> None:
    """The template's scripts as trained (from the first member; all members must share them) plus the
    post-processing and the ensemble runner."""
    source = members[0]["path"] / "scripts"
    for member in members[1:]:
        other = member["path"] / "scripts"
        differing = [p.name for p in source.glob("*.py") if (other / p.name).read_bytes() != p.read_bytes()] \
            if all((other / p.name).is_file() for p in source.glob("*.py")) else ["(files missing)"]
        if differing:
            raise ExportError(f"ensemble members {members[0]['bundle']} and {member['bundle']} were made from different"
                              f" template scripts ({', '.join(differing)}); one bundle can hold only one version."
                              " Rebuild the ensemble from bundles of one template version")
    shutil.copytree(source, scripts, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    contract = scripts / f"{CONTRACT}.py"
    if not contract.is_file():  # members made before the template had it write the same files; the runner needs it
        shutil.copy2(template_dir() / "scripts" / contract.name, contract)
    for module, rewrite in COPIED_MODULES.items():
        text = module.read_text()
        if rewrite is not None:
            if rewrite[0] not in text:
                raise ExportError(f"{module} no longer contains '{rewrite[0]}'; update COPIED_MODULES in"
                                  f" {__file__} so the bundle's copy imports its siblings")
            text = text.replace(rewrite[0], rewrite[1])
        (scripts / module.name).write_text(text)
    shutil.copy2(BUNDLE_FILES / "ensemble_inference.py", scripts / "ensemble_inference.py")


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
