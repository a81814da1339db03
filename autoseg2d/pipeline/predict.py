"""Stage 7/7: the ensemble (or the student distilled from it) predicts case by case, and its per-case report.

Members are loaded once, when a case is first predicted; each case's probabilities are summed
member by member, so memory holds one case at a time whatever the number of cases. A finished
mask is kept when the report records that this ensemble wrote it from the same scan, so an
interrupted prediction run continues where it stopped, and an old folder is predicted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from autoseg2d.atomic_files import write_mask
from autoseg2d.datalist import case_name
from autoseg2d.evaluation.tables import json_safe
from autoseg2d.run.inference import check_scan, load_inferer
from autoseg2d.pipeline.postprocess import (PROBABILITY_THRESHOLD, postprocess, postprocess_multiclass,
                                            reads_low_probabilities)
from autoseg2d.run.workdir import WorkDir
from autoseg2d.reporting.case_report import REPORT_CSV, REPORT_JSON, CaseReport, Rescue, lesion_class_names
from autoseg2d.reporting.geometry import SpacingRange
from autoseg2d.templates import bundle_config, default_modality

logger = logging.getLogger(__name__)

SCREEN_SOURCE = "ensemble/ensemble.json (its \"screen\")"


def ensemble_identity(ensemble: dict) -> str:
    """A hash of ensemble.json's content (keys sorted, as written: json_safe), the same whether the ensemble was
    just built or read back from the file."""
    return hashlib.sha256(json.dumps(json_safe(ensemble), sort_keys=True).encode()).hexdigest()[:20]


class EnsemblePredictor:
    identity: str | None = None  # ensemble_identity of its ensemble.json, recorded with each mask it writes
    never_empty: bool = True  # False: the never-empty rescue is skipped (screening data), but still reported
    model: str = "ensemble"  # or "student": one network distilled from the ensemble (distill.py)

    def __init__(self, work: WorkDir, ensemble: dict, never_empty: bool = True):
        self.bundles = [work.absolute(m["bundle"]) for m in ensemble["members"]]
        self.mode = ensemble["mode"]
        self.postprocessing = ensemble.get("postprocessing")
        self.screen = ensemble.get("screen")  # absent in ensembles built before screening: every member everywhere
        self.identity, self.never_empty = ensemble_identity(ensemble), never_empty
        self.model = ensemble.get("model", self.model)

    @cached_property
    def members(self) -> list:
        """Each member's InferClass, loaded on first use: building one (its model, an OpenVINO compile, INT8
        quantization where configured) takes seconds, and choosing post-processing from the stored
        cross-validation maps (out_of_fold_cases) may never run a member."""
        return [load_inferer(bundle) for bundle in self.bundles]

    def class_names(self) -> list[str]:
        """The lesion classes' names (the members share their classes): from the first member's config where the
        members are loaded (the inputs its checkpoint was trained on applied), else from its bundle's config
        file, without loading a model."""
        return lesion_class_names(self._config())

    def modality(self) -> str:
        """The modality the members were trained for (their config's, else the template's default)."""
        return self._config().get("modality") or default_modality()

    def _config(self) -> dict:
        if "members" in vars(self):
            return getattr(self.members[0], "config", {})
        return bundle_config(self.bundles[0]).get()

    def record(self, input_identity: str) -> dict:
        """What a mask's report rows keep to say who wrote it: this ensemble, from this input, with this rescue
        setting; a later run keeps the mask only where its own record is equal."""
        record = {"ensemble": self.identity, "input": input_identity, "never_empty": self.never_empty}
        return record if self.model == "ensemble" else {**record, "model": self.model}

    def probabilities(self, image: Path, members: list | None = None,
                      return_members: bool = False) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """Mean class probabilities (mode mean) or vote fractions (mode vote), (C, X, Y, Z) in the file grid.

        Members that read and window the image alike (one input variant) are predicted together:
        the image is read once per variant and every member runs on the same batches. With
        return_members also each member's argmax mask (uint8 class indices, X, Y, Z), in the order of
        members, for the report's agreement columns: (probabilities, member_masks).
        """
        members = list(members or self.members)
        vote, total, masks = self.mode == "vote", None, [None] * len(members)
        for indices in input_groups(members):
            group = [members[i] for i in indices]
            summed, group_masks = predict_group(group, image, vote, return_members)
            total = summed if total is None else total + summed
            for index, mask in zip(indices, group_masks):
                masks[index] = mask
        mean = total / len(members)
        return (mean, masks) if return_members else mean

    def predict(self, image: Path, spacing_mm: tuple) -> tuple[np.ndarray, list[np.ndarray], int, float | None]:
        """One image's post-processed mask, the argmax masks of the members that ran on every slice (for the
        report's agreement, in the members' order), the number of slices the screen left to its members, and the
        peak probability of the never-empty rescue's component (None: no rescue; see :meth:`postprocess`).

        With a screen (ensemble.json "screen") its members run first on every slice, the others only on
        slices where those see foreground; where the never-empty rescue would act, every member runs
        everywhere first (the rescue reads probabilities below 0.5, which screening only estimates).
        """
        members = self.members
        if not self._can_screen(members):
            probabilities, masks = self.probabilities(image, members, return_members=True)
            mask, rescue_peak = self.postprocess(probabilities, spacing_mm)
            return mask, masks, 0, rescue_peak
        total, masks, skipped = members[0].infer_screened(
            str(image), members, self.screen, self.mode == "vote", member_masks=True, where=SCREEN_SOURCE,
            complete_if=lambda mean: reads_low_probabilities(mean, spacing_mm, self.postprocessing))
        whole = [mask for mask in masks if mask is not None]
        mask, rescue_peak = self.postprocess(total / len(members), spacing_mm)
        return mask, whole, skipped, rescue_peak

    def _can_screen(self, members: list) -> bool:
        """A screen is set and the members can run it: all one template's, cutting a scan into the same batches
        (screen.py needs one pass of them all); otherwise every member runs everywhere, said once."""
        if not self.screen:
            return False
        able = len(input_groups(members)) == 1 and hasattr(members[0], "infer_screened")
        if not able and not getattr(self, "_said_unscreened", False):
            logger.info("predict: the members do not all cut a scan into the same batches (inference batch size, "
                        "divisor, head crop or skipping of air-only slices differ: bundles made before and after "
                        "a template change?), so every member runs on every slice (no screen)")
            self._said_unscreened = True
        return able

    def mask(self, probabilities: np.ndarray, spacing_mm: tuple) -> np.ndarray:
        return self.postprocess(probabilities, spacing_mm)[0]

    def postprocess(self, probabilities: np.ndarray, spacing_mm: tuple) -> tuple[np.ndarray, float | None]:
        """The mask the ensemble's post-processing makes of class probabilities, and the peak probability of the
        component its never-empty rescue kept (or, with never_empty False, would have kept); None: no rescue."""
        if self.postprocessing and self.postprocessing.get("kind") == "multiclass":
            return postprocess_multiclass(probabilities, spacing_mm, self.postprocessing, self.never_empty)
        if self.postprocessing and probabilities.shape[0] == 2:
            return postprocess(probabilities[1], spacing_mm, self.postprocessing, self.never_empty)
        return probabilities.argmax(0).astype(np.uint8), None


def input_groups(members: list) -> list[list[int]]:
    """Indices of members that can share their inputs (equal `shared_inputs`); members without it are alone."""
    groups: dict = {}
    for index, member in enumerate(members):
        key = getattr(member, "shared_inputs", None)
        groups.setdefault(("alone", index) if key is None else key, []).append(index)
    return list(groups.values())


def predict_group(group: list, image: Path, vote: bool, keep_masks: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Summed probabilities (or votes) of a group of members, and each one's mask if asked."""
    if hasattr(group[0], "infer_together"):
        return group[0].infer_together(str(image), group, vote, keep_masks)
    probabilities = group[0].infer(str(image)).numpy()
    labels = probabilities.argmax(0)
    if vote:
        probabilities = np.moveaxis(np.eye(probabilities.shape[0], dtype=np.float32)[labels], -1, 0)
    return probabilities, [labels.astype(np.uint8)] if keep_masks else []


def predict_images(predictor: EnsemblePredictor, images: list[Path], output_dir: Path,
                   sources: dict[str, str] | None = None, training_spacing: SpacingRange | None = None) -> list[dict]:
    """Predict each image into output_dir under its own file name; a mask there is kept only where the report
    records that this ensemble wrote it from this input with this rescue setting, else predicted again.

    Every image is read and checked first (the check stage's HU rule), so a scan that is not in HU stops the run
    before any network runs or mask is written. The per-case report (report.csv, report.json, qa/) is written
    beside the masks; `sources` names the input a case came from when that is not the image file itself (a DICOM
    series folder); a case whose spacing is unlike `training_spacing` (the training scans', where known) is
    flagged there, and so is a case the never-empty rescue made (or, with it off, would have made) non-empty."""
    clashes = sorted(name for name, count in Counter(image.name for image in images).items() if count > 1)
    if clashes:
        raise ValueError(f"file names occur more than once among the images to predict ({', '.join(clashes[:5])}):"
                         " each prediction is saved under its image's file name, so rename them")
    if any(image.resolve().parent == output_dir.resolve() for image in images):
        raise ValueError(f"the output folder {output_dir} holds the input images; choose another output folder")
    sources = sources or {}
    modality = predictor.modality()
    inputs = {image: check_scan(image, modality, sources.get(case_name(image))) for image in images}
    logger.info(f"predict: {len(images)} scans read and checked ({modality})")
    results = []
    report = CaseReport(output_dir, predictor.class_names(), training_spacing)
    if training_spacing is not None:
        logger.info(f"predict: each scan's spacing is compared with the training scans' ({training_spacing.shown()})")
    names = report.class_names  # of the label ids 1..N in the written masks
    bar = tqdm(images, desc="predict", unit="case", leave=False, dynamic_ncols=True, disable=None)  # on a terminal

    def say(index: int, image: Path, text: str) -> None:
        tqdm.write(f"predict {index}/{len(images)} {image.name}: {text}")

    def warn_of_spacing(index: int, image: Path, rows: list[dict]) -> None:
        warning = report.spacing_warning(rows) if rows else None
        if warning:
            say(index, image, f"warning: {warning}")

    for index, image in enumerate(bar, 1):
        target, case, record = output_dir / image.name, case_name(image), predictor.record(inputs[image])
        if target.exists() and report.written_by(case) == record:
            say(index, image, f"done before by this {predictor.model} from this scan, kept")
            warn_of_spacing(index, image, report.keep_case(case, image, target, sources.get(case)))
            continue
        if target.exists():
            say(index, image, f"the mask there was not written by this {predictor.model} from this scan (with this "
                "rescue setting), or has no record of it: predicted again")
        report.forget(case)  # its old record must not vouch for the new mask should the run stop before its row
        _ = predictor.members  # loaded for the first case to predict, before its clock starts
        started = time.time()
        source = nib.load(str(image))
        spacing = tuple(float(z) for z in source.header.get_zooms()[:3])
        mask, member_masks, skipped, rescue_peak = predictor.predict(image, spacing)
        write_mask(mask, source.affine, source.header, target)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        volume_ml = float((mask > 0).sum()) * voxel_ml
        class_ml = {name: float((mask == i).sum()) * voxel_ml for i, name in enumerate(names, 1)}
        class_ml = class_ml if len(names) > 1 else {}
        seconds = time.time() - started
        rescue = Rescue(rescue_peak, predictor.never_empty) if rescue_peak is not None else None
        rows = report.add_case(case, image, target, mask, member_masks, seconds, sources.get(case), rescue=rescue,
                               written_by=record)
        results.append({"case": case, "volume_ml": volume_ml, "seconds": seconds, "output": str(target),
                        "screened_slices": skipped, **({"class_volume_ml": class_ml} if class_ml else {}),
                        "rescue": rescue.flag if rescue else None, "rescue_peak_probability": rescue_peak})
        per_class = f" ({', '.join(f'{name} {ml:.2f}' for name, ml in class_ml.items())})" if class_ml else ""
        screened = f", {skipped} slices left to the {len(predictor.screen['members'])} screening members" \
            if skipped else ""
        say(index, image, f"hemorrhage {volume_ml:.2f} mL{per_class}, {seconds:.1f}s{screened}")
        if rescue:
            say(index, image, rescue.describe(PROBABILITY_THRESHOLD))
        warn_of_spacing(index, image, rows)
    report.write()  # kept cases' rows as this run flags them, under this run's settings
    if report.write_contact_sheet():
        logger.info(f"predict: report and QA pictures in {output_dir} ({REPORT_CSV}, {REPORT_JSON}, qa/)")
    return results
