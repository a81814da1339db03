"""Held-out accuracy of one ensemble in each CPU precision and runtime, against PyTorch fp32 on every slice.

    python benchmarks/precision_accuracy.py --work_dir accuracy_work/work --datalist accuracy_work/data/datalist.json
    python benchmarks/precision_accuracy.py ... --datalist fresh/datalist.json   # more held-out cases

Needs a work dir whose ensemble stage ran and a datalist with labelled "testing" cases (benchmarks/accuracy.py
writes such a pair from the hard synthetic generator; benchmarks/fresh_cases.py writes more held-out cases from
it). The members are copied to a scratch folder and brought up to this repository's template (its scripts; the
config keeps the bundle's values for every key the template still has but infer_skip_air_slices, then each row
sets its own), so the work dir stays untouched and bundles made by older templates can be measured. Each row
predicts every held-out case with the ensemble's members and post-processing: every slice in PyTorch fp32 (the
reference), then without the air-only slices (infer_skip_air_slices, the default) in fp32, bf16 (where the CPU
has it natively) and OpenVINO, and PyTorch fp32 with --air_pad_px of air added around each slice (a wider field
of view: how far an equally valid input moves the answer). Printed as JSON and Markdown: the four challenge
metrics, each row's per-case Dice against the first row's (mean, 95 % bootstrap interval, cases worse / better),
the share of voxels whose final mask differs from the first row's, and seconds per case. OpenVINO rows need
`pip install openvino`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from bench_common import (HELD_OUT_METRICS, TEMPLATE, add_held_out_arguments, difference_cell, held_out_inputs,
                          metric_cells, paired_difference, publish)
from autoseg2d.evaluation.metrics import case_metrics, summarize_metrics  # noqa: E402
from autoseg2d.pipeline.predict import EnsemblePredictor  # noqa: E402
from autoseg2d.run.inference import load_inferer, read_mask  # noqa: E402
from autoseg2d.run.workdir import WorkDir  # noqa: E402
from autoseg2d.templates import BUNDLE_CONFIG  # noqa: E402
from predictor import cpu_bf16_units, cpu_has_native_bf16  # noqa: E402
from runtime import openvino_installed  # noqa: E402
from slice_dataset import AIR_HU  # noqa: E402


REFERENCE = {"infer_skip_air_slices": False, "infer_cpu_runtime": "torch", "amp": False}  # every slice, fp32


def inference_rows() -> dict[str, dict]:
    """Row name -> the config values that select it, the reference first; only those this machine can run. Rows
    skip air-only slices as the template does (upgraded_copy) unless they say otherwise."""
    native = cpu_has_native_bf16()
    found = {"torch fp32, every slice (air-only ones too)": REFERENCE,
             "torch fp32": {"infer_cpu_runtime": "torch", "amp": False}}
    if native:
        found["torch bf16"] = {"infer_cpu_runtime": "torch", "amp": True}
    if openvino_installed():
        found[f"openvino {'bf16' if native else 'f32'}"] = {"infer_cpu_runtime": "openvino", "amp": True}
    return found


def with_air(image: Path, pad_px: int, target: Path) -> Path:
    """The scan with pad_px of air on each side of every axial slice, same header, written to target."""
    source = nib.load(str(image))
    if nib.aff2axcodes(source.affine)[2] not in ("S", "I"):
        raise SystemExit(f"{image}: --air_pad_px pads the first two array axes, but this file stores its axial "
                         f"slices along another axis ({''.join(nib.aff2axcodes(source.affine))}); reorient it "
                         "to axial-last (RAS) or leave --air_pad_px out")
    voxels = np.pad(np.asanyarray(source.dataobj), ((pad_px, pad_px), (pad_px, pad_px), (0, 0)),
                    constant_values=AIR_HU)
    nib.save(nib.Nifti1Image(voxels, source.affine, source.header), str(target))
    return target


def unpadded(mask: np.ndarray, pad_px: int) -> np.ndarray:
    return mask[pad_px:mask.shape[0] - pad_px, pad_px:mask.shape[1] - pad_px]


# which slices run is this template's, not the bundle's (each row sets it)
TEMPLATE_CUT_KEYS = ("bundle_root", "infer_skip_air_slices")


def upgraded_copy(bundle: Path, target: Path, values: dict) -> Path:
    """bundle copied to target with this repository's template scripts, its config values kept where the
    template still has the key (but bundle_root and which slices run), and values applied on top."""
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("scripts", "cv_probabilities", "*openvino*"))
    shutil.copytree(TEMPLATE / "scripts", target / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((TEMPLATE / BUNDLE_CONFIG).read_text())
    old = yaml.safe_load((bundle / BUNDLE_CONFIG).read_text())
    config.update({key: value for key, value in old.items() if key in config and key not in TEMPLATE_CUT_KEYS},
                  **values)
    (target / BUNDLE_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def ensemble_in(work: WorkDir, ensemble: dict, scratch: Path, values: dict) -> EnsemblePredictor:
    predictor = EnsemblePredictor.__new__(EnsemblePredictor)
    predictor.members = [load_inferer(upgraded_copy(work.absolute(m["bundle"]), scratch / f"member_{i}", values))
                         for i, m in enumerate(ensemble["members"])]
    predictor.mode, predictor.postprocessing = ensemble["mode"], ensemble.get("postprocessing")
    return predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_arguments(parser)
    parser.add_argument("--air_pad_px", type=int, nargs="*", default=[],
                        help="rows of PyTorch fp32 whole slices with this much air added on every side")
    args = parser.parse_args()
    work, dataroot, testing, ensemble = held_out_inputs(args)
    results = {"cpu_bf16_units": cpu_bf16_units(), "members": len(ensemble["members"]),
               "held_out_cases": len(testing), "rows": {}}
    rows = [(name, values, 0) for name, values in inference_rows().items()]
    rows += [(f"torch fp32, {pad} px more air around each slice", REFERENCE, pad) for pad in args.air_pad_px]
    reference_masks, reference_dice = {}, None
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, values, pad) in enumerate(rows):
            started = time.perf_counter()
            predictor = ensemble_in(work, ensemble, Path(scratch) / str(index), values)
            load_s = time.perf_counter() - started
            scores, seconds, changed = [], [], []
            for entry in testing:
                truth, spacing = read_mask(dataroot / entry["label"])
                image = dataroot / entry["image"]
                if pad:
                    image = with_air(image, pad, Path(scratch) / f"air_{pad}.nii.gz")
                    truth = np.pad(truth, ((pad, pad), (pad, pad), (0, 0)))
                started = time.perf_counter()
                mask = (predictor.mask(predictor.probabilities(image), spacing) > 0)
                seconds.append(time.perf_counter() - started)
                reference = reference_masks.setdefault(entry["image"], mask)
                changed.append(float(np.mean(unpadded(mask, pad) != reference)))
                scores.append(case_metrics(mask.astype("uint8"), truth, spacing, case_id=entry["image"]))
            reference_dice = reference_dice or [s["dice"] for s in scores]
            results["rows"][name] = {
                "summary": summarize_metrics(scores), "cases": scores, "s_per_case": round(float(np.mean(seconds)), 2),
                "load_s": round(load_s, 1), "voxels_changed_vs_first_row": max(changed),
                "dice_vs_first_row": paired_difference([s["dice"] for s in scores], reference_dice)}
            print(name, results["rows"][name]["summary"], flush=True)
    publish(results, markdown(results), args.out)


def markdown(results: dict) -> str:
    header = ["inference", *(name for name, _ in HELD_OUT_METRICS),
              "Dice vs the first row: mean [95 % interval], cases worse / better",
              "voxels changed vs the first row (max per case)",
              "s per case", "load s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["rows"].items():
        cells = [name, *metric_cells(entry["summary"]), difference_cell(entry["dice_vs_first_row"]),
                 f"{entry['voxels_changed_vs_first_row']:.2e}", f"{entry['s_per_case']:.2f}",
                 f"{entry['load_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
