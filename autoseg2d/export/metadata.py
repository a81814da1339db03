"""The exported bundle's text files: configs/inference.json, configs/metadata.json and docs/README.md.

Key names follow MONAI's model zoo (bundle_root, dataset_dir, output_dir), so the usual
``--dataset_dir ... --output_dir ...`` overrides work on the ``monai.bundle run`` command line.
"""

from __future__ import annotations

import importlib.metadata
import json

import monai
import numpy as np
import torch

from autoseg2d.export.label_codes import metadata_codes
from autoseg2d.pipeline.distill import STUDENT
from autoseg2d.reporting.agreement import LOW_AGREEMENT_DICE

# The model zoo's current schema; `monai.bundle verify_metadata` downloads it unless --filepath names a local copy.
MODEL_ZOO_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                        "meta_schema_20240725.json")
BUNDLE_VERSION = "0.1.0"
LICENSE = "Apache-2.0"
REQUIRED_PACKAGES = ("nibabel", "scipy", "pyyaml", "fire", "pynrrd", "pydicom")  # pynrrd, pydicom: LoadImage


def inference_config(ensemble: dict, num_members: int) -> dict:
    """configs/inference.json in the model zoo's shape (datalist -> dataset -> dataloader -> inferer -> evaluator),
    which `monai.bundle run` and tools that drive bundles themselves (3D Slicer's MONAIAuto3DSeg: a bare
    ConfigParser, bundle_root, dataset_dir, output_dir, datalist, device, inferer#device and
    dataloader#num_workers set, then dataloader and evaluator parsed and evaluator.run() called) both run."""
    scripts = "scripts.ensemble_inference"
    on_path = "@scripts_importable"  # every component from scripts/ requires it: a bare ConfigParser adds no path
    return {
        "imports": ["$import sys", "$import torch"],
        # monai.bundle run puts the bundle folder on sys.path before "run"; other tools set bundle_root themselves
        "bundle_root": f"$__import__('{scripts}', fromlist=['BUNDLE_ROOT']).BUNDLE_ROOT",
        "scripts_importable": "$None if @bundle_root in sys.path else sys.path.insert(0, @bundle_root)",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": {"_target_": f"{scripts}.list_scans", "_requires_": on_path, "dataset_dir": "@dataset_dir"},
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "ensemble_mode": ensemble["mode"],
        "ensemble_postprocessing": replayed_postprocessing(ensemble.get("postprocessing")),
        "ensemble_screen": ensemble.get("screen"),
        "members": [f"$@bundle_root + '/models/member_{index}'" for index in range(num_members)],
        "preprocessing": {"_target_": "Compose", "transforms": [
            # dtype null keeps the file's values (as the template's own reader does); no reorientation: masks keep
            # the scan's grid
            {"_target_": "LoadImaged", "keys": "image", "image_only": True, "dtype": None}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": f"{scripts}.EnsembleInference", "_requires_": on_path, "members": "@members",
                    "mode": "@ensemble_mode", "postprocessing": "@ensemble_postprocessing",
                    "screen": "@ensemble_screen", "device": "@device"},
        "evaluator": {"_target_": f"{scripts}.MaskWriter", "_requires_": on_path, "dataloader": "@dataloader",
                      "inferer": "@inferer", "output_dir": "@output_dir"},
        "initialize": [],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def replayed_postprocessing(choice: dict | None) -> dict | None:
    """What apply_postprocessing / apply_multiclass_postprocessing replay, without the selection's diagnostics
    (whose free text the bundle's config parser would read as expressions where it starts with $, @ or %)."""
    if not choice:
        return None
    if choice.get("kind") == "multiclass":
        return {"kind": "multiclass", "per_class": {label: replayed_postprocessing(part)
                                                    for label, part in choice["per_class"].items()},
                "foreground": replayed_postprocessing(choice["foreground"])}
    return {"threshold": choice["threshold"], "steps": choice["steps"]}


def is_student(ensemble: dict) -> bool:
    """A student (distill.py: one network, validation score = its fold students' mean) rather than an ensemble."""
    return ensemble.get("model") == STUDENT


def kind(ensemble: dict) -> str:
    return "student (one network distilled from an ensemble)" if is_student(ensemble) else "ensemble"


def metadata(ensemble: dict, classes: list[str], work_name: str) -> dict:
    channels = {str(index): name for index, name in enumerate(classes)}
    scores = [float(m["score"]) for m in ensemble["members"]]
    return {
        "schema": MODEL_ZOO_SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported from the work dir {work_name} by run_autoseg.py export"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: importlib.metadata.version(name) for name in REQUIRED_PACKAGES},
        "name": f"ICH segmentation, segresnet2d {kind(ensemble)}",
        "task": "Intracranial hemorrhage segmentation on non-contrast head CT",
        "description": (("One 2D SegResNetDS network distilled from an ensemble of them (the student)"
                         if is_student(ensemble) else f"An ensemble of {len(scores)} 2D SegResNetDS models")
                        + " (Auto3DSeg template segresnet2d) run slice by slice on axial slices at native resolution;"
                        f" probabilities are averaged ({ensemble['mode']}) and post-processed as chosen by"
                        " cross-validation."),
        "authors": "segresnet2d-autoseg contributors",
        "copyright": "Copyright (c) segresnet2d-autoseg contributors",
        "license": LICENSE,
        "data_type": "nifti, nrrd or dicom",
        "image_classes": "one channel: CT in Hounsfield units",
        "label_classes": ", ".join(f"{index} is {name}" for index, name in channels.items()),
        "pred_classes": ", ".join(f"{index} is {name}" for index, name in channels.items()),
        "label_codes": metadata_codes(classes[1:]),  # SNOMED CT, as in models/labels.csv (label_codes.py)
        "eval_metrics": {"mean_member_validation_dice": float(np.mean(scores))},
        "intended_use": "Research only; not a medical device and not for clinical decisions.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": ["*", "*", "*"], "dtype": "int16", "value_range": [-1024, 3071],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1,
                                 "spatial_shape": ["*", "*", "*"], "dtype": "uint8",
                                 "value_range": [0, len(classes) - 1], "is_patch_data": False,
                                 "channel_def": channels}},
        },
    }


def bundle_readme(ensemble: dict, classes: list[str]) -> str:
    members = "\n".join(f"| {index} | {m['variant']} | {m['fold']} | {m['seed']} | {float(m['score']):.4f} |"
                        for index, m in enumerate(ensemble["members"]))
    post = replayed_postprocessing(ensemble.get("postprocessing"))
    return f"""# ICH segmentation: a segresnet2d {kind(ensemble)}

Segments intracranial hemorrhage on non-contrast head CT (in Hounsfield units); classes:
{", ".join(f"{index} {name}" for index, name in enumerate(classes))}. Research only: not a medical device.

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --dataset_dir scans/ --output_dir masks/
```

Every scan in `dataset_dir` (`.nii` / `.nii.gz`, `.nrrd`, MetaImage, or a sub-folder holding one DICOM
series), or every file of `--datalist "['a.nrrd', 'b.nii.gz']"`, is read by MONAI's `LoadImage` and gets a
uint8 NIfTI mask in `output_dir` in the scan's own grid and affine: a NIfTI scan's mask has its file
name and header, any other scan's is `<name>.nii.gz`. Models run on `--device` (default: the GPU when
PyTorch sees one, else the CPU). Needs MONAI {monai.__version__}, PyTorch, nibabel, scipy, pyyaml, fire,
pynrrd (NRRD) and pydicom (DICOM) (versions in `configs/metadata.json`); nothing else.

`configs/inference.json` has the model zoo's shape (`datalist` -> `dataset` -> `dataloader` ->
`inferer` -> `evaluator`, whose `run()` writes the masks), so tools that drive a bundle with their
own `ConfigParser` (3D Slicer's MONAIAuto3DSeg sets `bundle_root`, `dataset_dir`, `output_dir`,
`datalist`, `device`, `inferer#device`, `dataloader#num_workers`) run it as well; the config puts
`bundle_root` on `sys.path` itself.

## What is inside

- `models/member_<i>/model.pt` and `hyper_parameters.yaml`: the members' weights and settings. Each
  checkpoint holds `config["network"]` (MONAI's `ConfigParser` builds the SegResNetDS from it) and
  `state_dict`, `best_metric`, `epoch`, `inputs`.
- `models/model.pt`: a copy of member 0, so that tools that take the folder above the first `model.pt`
  as the bundle root find it, and tools that load one network get a working member;
  `models/labels.csv` beside it: each label's name and SNOMED CT codes (3D Slicer's format; also under
  `label_codes` in `configs/metadata.json`).
- `scripts/`: the template's scripts as trained, `postprocess.py` / `metrics.py` (the
  post-processing) and `ensemble_inference.py` (averaging, post-processing, writing masks).
- `configs/inference.json`: `ensemble_mode` ({ensemble["mode"]}) and `ensemble_postprocessing`, chosen on
  out-of-fold predictions: `{json.dumps(post)}`; `ensemble_screen` (members that screen every slice for the
  others, and the probability they screen below; null: every member on every slice):
  `{json.dumps(ensemble.get("screen"))}`.

| member | input variant | fold | seed | validation Dice |
|---|---|---|---|---|
{members}

## Check the metadata

`python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath docs/metadata_schema.json`
checks the metadata offline against `docs/metadata_schema.json`, a local schema with the fields
this bundle promises (not the model zoo's own schema; with network access, give `--filepath`
a new file name and MONAI downloads the official schema named in the metadata).

## MONAI Label and 3D Slicer

- MONAI Label: copy this folder to `<apps>/monaibundle/model/ich_bundle` and start
  `monailabel start_server --app <apps>/monaibundle --studies <studies> --conf models ich_bundle`.
  MONAI Label's bundle infer task expects a single `network_def` with its own pre-/post-processing
  keys; this bundle is an ensemble run by `ensemble_inference.py`, so run it with `monai.bundle run`
  over the studies and load its masks as labels (MONAI Label reads `<studies>/labels/final/<name>`).
- 3D Slicer: the MONAIAuto3DSeg extension runs this bundle on a loaded volume (its bundle runner); or load
  the scan and its mask (Add Data, tick "Segmentation" for the mask); masks
  written as DICOM SEG by `run_autoseg.py predict --dicom_seg` load through the DICOM browser
  (QuantitativeReporting extension) on top of the original series.

The per-case report (volumes, ABC/2, agreement flags with a low-agreement Dice threshold of
{LOW_AGREEMENT_DICE}) comes from `run_autoseg.py predict`, not from this bundle.
"""
