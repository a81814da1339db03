"""Stage 5/7: the ensemble's members, chosen from the cross-validated bundles, and the post-processing
chosen for them on out-of-fold predictions; both stored in ensemble/ensemble.json for the stages after it
(distill.py, predict.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from autoseg2d.atomic_files import write_text_atomic
from autoseg2d.datalist import case_name
from autoseg2d.evaluation.tables import json_safe
from autoseg2d.pipeline.crossval import validation_cases
from autoseg2d.run.fold_probabilities import check_grid, has_foreground, mean_foreground
from autoseg2d.pipeline.greedy_members import (curve_markdown, curve_rows, ensure_stored, greedy_order, load_fold,
                                               members_per_fold)
from autoseg2d.run.profiles import SELECTION_NAMES
from autoseg2d.pipeline.postprocess import choose_multiclass_postprocessing, choose_postprocessing, describe_effects
from autoseg2d.pipeline.predict import EnsemblePredictor
from autoseg2d.run.work_queue import run_queue
from autoseg2d.run.workdir import WorkDir

logger = logging.getLogger(__name__)


MEMBER_KEYS = ("bundle", "score", "fold", "seed", "variant")
GREEDY = "greedy"  # chosen on the out-of-fold predictions (select_greedy), not on the records alone
GREEDY_REPORT = "member_selection.md"


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


SELECTION_STRATEGIES = {"fold_balanced": select_fold_balanced}  # chosen on the records alone; GREEDY apart


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
