"""Stage 5: the best-N checkpoint ensemble, its post-processing, and case-by-case prediction.

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
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from autoseg2d.datalist import case_name
from autoseg2d.evaluation.postprocess import (PROBABILITY_THRESHOLD, choose_multiclass_postprocessing,
                                              choose_postprocessing, describe_effects, postprocess,
                                              postprocess_multiclass, reads_low_probabilities)
from autoseg2d.evaluation.report import json_safe
from autoseg2d.pipeline.crossval import validation_cases
from autoseg2d.pipeline.fold_probabilities import check_grid, has_foreground, mean_foreground
from autoseg2d.pipeline.greedy_members import (curve_markdown, curve_rows, ensure_stored, greedy_order, load_fold,
                                               members_per_fold)
from autoseg2d.pipeline.inference import check_scan, load_inferer
from autoseg2d.pipeline.work_queue import run_queue
from autoseg2d.atomic_files import write_mask, write_text_atomic
from autoseg2d.pipeline.workdir import WorkDir
from autoseg2d.reporting.case_report import REPORT_CSV, REPORT_JSON, CaseReport, Rescue, lesion_class_names
from autoseg2d.reporting.geometry import SpacingRange
from autoseg2d.templates import bundle_config, default_modality

logger = logging.getLogger(__name__)


MEMBER_KEYS = ("bundle", "score", "fold", "seed", "variant")
GREEDY = "greedy"  # chosen on the out-of-fold predictions (select_greedy), not on the records alone
GREEDY_REPORT = "member_selection.md"
SCREEN_SOURCE = "ensemble/ensemble.json (its \"screen\")"


def select_members(records: list[dict], size: int, strategy: str = "fold_balanced") -> list[dict]:
    """Ensemble members from the cross-validated bundles, by a strategy of :data:`SELECTION_STRATEGIES`."""
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"unknown member selection strategy {strategy!r}; known: {', '.join(SELECTION_NAMES)}"
                         f" ({GREEDY} through build_ensemble: it needs the out-of-fold predictions)")
    return SELECTION_STRATEGIES[strategy](records, size)


def select_fold_balanced(records: list[dict], size: int) -> list[dict]:
    """`size` members spread evenly over the folds, each fold's best bundles first.

    Validation Dice is comparable only within a fold (same cases): a global top-N fills the
    ensemble from easy folds and leaves hard folds without a member, so their cases could
    not be predicted out of fold and the post-processing would be chosen on easy cases only.
    Each fold gets size // k members (k folds, at least one: size is raised to k). The size % k
    remaining places go at most one per fold, so no fold's models weigh more than one member's
    share above another's in the mean; they go to the folds whose next bundle's Dice is closest
    to their own fold's best (relative, not raw Dice: raw Dice would hand them to the easiest
    folds, whatever their next bundle is worth to that fold). A fold with too few bundles gives
    its places to the others, again one per fold per round.
    """
    by_fold: dict = {}
    for record in sorted(records, key=lambda r: r["score"], reverse=True):
        by_fold.setdefault(record["fold"], []).append(record)
    folds = sorted(by_fold, key=str)
    size = min(max(size, len(folds)), len(records))
    share = size // len(folds) if folds else 0
    chosen = [_member(r, rank, f"best {share} of fold {fold}")
              for fold in folds for rank, r in enumerate(by_fold[fold][:share], 1)]
    taken = {fold: min(share, len(by_fold[fold])) for fold in folds}
    while len(chosen) < size:  # one round: at most one more member per fold
        nexts = [(by_fold[fold][taken[fold]]["score"] / max(by_fold[fold][0]["score"], 1e-8), fold)
                 for fold in folds if taken[fold] < len(by_fold[fold])]
        for ratio, fold in sorted(nexts, key=lambda item: -item[0])[: size - len(chosen)]:
            taken[fold] += 1
            chosen.append(_member(by_fold[fold][taken[fold] - 1], taken[fold],
                                  f"extra place: Dice {ratio:.3f} x its fold's best"))
    return sorted(chosen, key=lambda m: (str(m["fold"]), m["rank_in_fold"]))


SELECTION_STRATEGIES = {"fold_balanced": select_fold_balanced}
SELECTION_NAMES = (*SELECTION_STRATEGIES, GREEDY)


def select_greedy(work: WorkDir, records: list[dict], size: int, tolerance: float | None, mode: str = "mean", *,
                  training: Sequence[dict], dataroot: Path) -> tuple[list[dict], dict]:
    """Members by greedy forward selection on each fold's out-of-fold cases (greedy_members), and its record.

    Fold k's candidates are the bundles validated on fold k, scored on fold k's cases only, from the
    maps cross-validation stored (bundles without them predict their fold once more). Returns the
    members and {per_fold, tolerance, curve}: out-of-fold metrics against members per fold.
    """
    by_fold: dict = {}
    for record in sorted(records, key=lambda r: r["score"], reverse=True):
        by_fold.setdefault(record["fold"], []).append(record)
    folds, orders, paths = {}, {}, {}
    for fold in sorted(by_fold, key=str):
        cases = validation_cases(int(fold), training=training, dataroot=dataroot)
        bundles = [work.absolute(r["bundle"]) for r in by_fold[fold]]
        for bundle in bundles:
            ensure_stored(bundle, cases)
        folds[fold] = load_fold(bundles, cases, vote=mode == "vote")
        orders[fold], paths[fold] = greedy_order(folds[fold], len(bundles))
    per_fold = members_per_fold(paths, {f: len(c) for f, c in folds.items()}, size, tolerance)
    members = [_member(by_fold[fold][index], index + 1,
                       f"greedy step {step} of fold {fold}: its out-of-fold Dice {paths[fold][step - 1]:.4f}")
               for fold in folds for step, index in enumerate(orders[fold][:per_fold[fold]], 1)]
    curve = curve_rows(folds, orders, {fold: list(range(len(by_fold[fold]))) for fold in folds})
    return members, {"per_fold": per_fold, "tolerance": tolerance, "curve": curve}


def _member(record: dict, rank: int | None, reason: str) -> dict:
    return {**{key: record[key] for key in MEMBER_KEYS}, "rank_in_fold": rank, "reason": reason}


def screening_members(members: Sequence[dict]) -> list[int]:
    """Indices of each fold's first member in the ensemble's order (its best): the members that screen every
    slice (the template's screen.py), so every fold's view of a slice is in the screen."""
    first: dict = {}
    for index, member in enumerate(members):
        first.setdefault(str(member["fold"]), index)
    return sorted(first.values())


def screen_settings(members: Sequence[dict], below: float | None) -> dict | None:
    """ensemble.json's "screen": {members, below}, or None where it is off or would screen with every member."""
    screening = screening_members(members)
    return {"members": screening, "below": float(below)} if below and len(screening) < len(members) else None


def ensemble_identity(ensemble: dict) -> str:
    """A hash of ensemble.json's content (keys sorted, as written: json_safe), the same whether the ensemble was
    just built or read back from the file."""
    return hashlib.sha256(json.dumps(json_safe(ensemble), sort_keys=True).encode()).hexdigest()[:20]


class EnsemblePredictor:
    identity: str | None = None  # ensemble_identity of its ensemble.json, recorded with each mask it writes
    never_empty: bool = True  # False: the never-empty rescue is skipped (screening data), but still reported

    def __init__(self, work: WorkDir, ensemble: dict, never_empty: bool = True):
        self.bundles = [work.absolute(m["bundle"]) for m in ensemble["members"]]
        self.mode = ensemble["mode"]
        self.postprocessing = ensemble.get("postprocessing")
        self.screen = ensemble.get("screen")  # absent in ensembles built before screening: every member everywhere
        self.identity, self.never_empty = ensemble_identity(ensemble), never_empty

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
        return {"ensemble": self.identity, "input": input_identity, "never_empty": self.never_empty}

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


def out_of_fold_cases(predictor: EnsemblePredictor, ensemble: dict, *, training: Sequence[dict],
                      dataroot: Path) -> list[dict]:
    """Each training case predicted by the members that did not train on it (those validated on its fold).

    Cross-validation stored each member's map of its own fold's cases (fold_probabilities), so a binary
    ensemble reads a case's probabilities from its members' maps instead of running them; the maps are
    rounded to 1/255, so the floors and scores chosen on them can differ from a rerun only for voxels
    within 1/510 of a threshold. The members run for a case one of them lacks a map of (bundles
    cross-validated before maps were kept), and for every case of a multi-class ensemble (the maps hold
    "any class" only). Cases of a fold without members cannot be predicted out of fold; they are named
    in a warning.
    """
    cases, sources = [], Counter()
    binary = len(predictor.class_names()) == 1  # the lesion map alone; multi-class keeps every class
    member_folds = {m["fold"] for m in ensemble["members"]}
    for fold in sorted({int(e["fold"]) for e in training}):
        if fold not in member_folds:
            logger.warning(f"ensemble: fold {fold} has no member, so its cases are left out of the "
                           "post-processing choice")
            continue
        indices = [i for i, m in enumerate(ensemble["members"]) if m["fold"] == fold]
        bundles = [predictor.bundles[i] for i in indices]
        for case in validation_cases(fold, training=training, dataroot=dataroot):
            labels = nib.load(str(case["label"]))
            truth = np.asanyarray(labels.dataobj).astype(np.uint8)
            case_id = case_name(case["image"])
            if binary and all(has_foreground(bundle, case_id) for bundle in bundles):
                prob = mean_foreground(bundles, case_id, vote=predictor.mode == "vote")
                check_grid(prob.shape, case_id, case["label"], truth.shape)
                sources["stored"] += 1
            else:
                probs = predictor.probabilities(case["image"], [predictor.members[i] for i in indices])
                prob = probs[1] if binary else probs
                sources["run"] += 1
            cases.append({"case_id": case_id, "fold": fold, "prob": prob.astype(np.float16),
                          "truth": (truth > 0).astype(np.uint8) if binary else truth,
                          "spacing_mm": tuple(float(z) for z in labels.header.get_zooms()[:3])})
    logger.info(f"ensemble: out-of-fold probabilities of {sources['stored']} cases from the members' stored "
                f"cross-validation maps, {sources['run']} predicted by running the members")
    return cases


def build_ensemble(work: WorkDir, records: list[dict], size: int, mode: str, selection: str = "fold_balanced",
                   tolerance: float | None = None, storage: str | None = None, screen_below: float | None = None, *,
                   training: Sequence[dict], dataroot: Path) -> dict:
    """Pick members and post-processing (on out-of-fold predictions of the training cases), store them in
    ensemble/ensemble.json.

    Greedy selection also writes and prints its members-vs-accuracy table (ensemble/member_selection.md).
    With a shared storage (--storage) the ensemble is one job of the work queue: one machine builds it,
    the others wait for it to finish and read its ensemble.json.
    """
    if storage and not work.ensemble_file.exists():
        settings = json.dumps([sorted(str(r["bundle"]) for r in records), size, mode, selection, tolerance,
                               screen_below])
        job = f"{work.relative(work.ensemble_file)} of {hashlib.sha256(settings.encode()).hexdigest()[:10]}"
        run_queue(storage, "ensemble", [job], lambda index: float(len(build_ensemble(
            work, records, size, mode, selection, tolerance, screen_below=screen_below, training=training,
            dataroot=dataroot)["members"])))
    if work.ensemble_file.exists():
        logger.info(f"ensemble: reusing {work.relative(work.ensemble_file)}")
        return json.loads(work.ensemble_file.read_text())
    ensemble = make_ensemble(work, records, size, mode, selection, tolerance, screen_below=screen_below,
                             training=training, dataroot=dataroot)
    if "greedy" in ensemble:
        table = curve_markdown(ensemble["greedy"]["curve"], ensemble["greedy"]["per_fold"])
        report = work.ensemble_file.parent / GREEDY_REPORT
        write_text_atomic(report, "# Greedy member selection (out-of-fold, before post-processing)\n\n"
                          + table + "\n")
        print(f"\nensemble members vs out-of-fold accuracy ({work.relative(report)}):\n{table}\n", flush=True)
    write_text_atomic(work.ensemble_file, json.dumps(json_safe(ensemble), indent=1))
    return ensemble


def make_ensemble(work: WorkDir, records: list[dict], size: int, mode: str, selection: str = "fold_balanced",
                  tolerance: float | None = None, screen_below: float | None = None, *, training: Sequence[dict],
                  dataroot: Path) -> dict:
    """Members by `selection` (one of :data:`SELECTION_NAMES`), the post-processing chosen for them, and the
    screen prediction runs them with (screen_settings; screen_below None or 0: off)."""
    greedy = None
    if selection == GREEDY:
        members, greedy = select_greedy(work, records, size, tolerance, mode, training=training, dataroot=dataroot)
    else:
        members = select_members(records, size, selection)
    ensemble = {"mode": mode, "selection": selection, "members": members, "postprocessing": None,
                "screen": screen_settings(members, screen_below), **({"greedy": greedy} if greedy else {})}
    folds = Counter(m["fold"] for m in members)
    logger.info(f"ensemble: {len(members)} members ({mode}, {selection}), per fold "
                + ", ".join(f"{fold}: {count}" for fold, count in sorted(folds.items(), key=lambda i: str(i[0]))))
    predictor = EnsemblePredictor(work, ensemble)
    logger.info("ensemble: choosing post-processing on out-of-fold predictions")
    cases = out_of_fold_cases(predictor, ensemble, training=training, dataroot=dataroot)
    choice = None
    if cases and cases[0]["prob"].ndim == cases[0]["truth"].ndim:  # binary: the lesion map alone
        choice = choose_postprocessing(cases)  # float16 probabilities: no second, float32 copy of every case
        logger.info(f"ensemble: {describe_effects(choice)}")
    elif cases:
        choice = choose_multiclass_postprocessing(cases)
        for index, class_choice in choice["per_class"].items():
            logger.info(f"ensemble: class {index}: {describe_effects(class_choice)}")
        logger.info(f"ensemble: any class: {describe_effects(choice['foreground'])}")
    ensemble["postprocessing"] = choice
    return ensemble


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
            say(index, image, "done before by this ensemble from this scan, kept")
            warn_of_spacing(index, image, report.keep_case(case, image, target, sources.get(case)))
            continue
        if target.exists():
            say(index, image, "the mask there was not written by this ensemble from this scan (with this rescue "
                "setting), or has no record of it: predicted again")
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
