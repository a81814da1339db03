"""Post-processing of a hemorrhage probability map, chosen on out-of-fold cases by the challenge's own ranking.

Two steps, applied in this order:

- ``remove_small_components``: drop connected components smaller than a volume in mL
  (specks of noise cost Dice and, far from the lesion, blow up HD).
- ``keep_nonempty``: if nothing passes the threshold, keep the most probable connected
  component of ``prob > floor``, or, where nothing reaches the floor either, the region around
  the most probable voxel (:func:`peak_component`). An empty prediction makes HD inf, and one
  inf case makes the challenge's mean HD inf: that is how the reproduced INSTANCE 2022 method
  came 2nd overall while 1st on Dice. So with the step on, a binary mask is never empty.

Cleaning comes first so the rescue also catches a mask that cleaning emptied. The choice
is a plain dict (JSON-serializable) stored with the ensemble and replayed by
:func:`apply_postprocessing`; :func:`postprocess` also says whether the rescue made the mask.

A truly normal scan (no hemorrhage) therefore gets a false positive wherever the rescue is
on. The out-of-fold cases count it (``effects`` in the choice; INSTANCE 2022 has no normal
scans, so there it is never seen), prediction flags every rescued case in its report, and a
prediction run on screening data can switch the rescue off (it then names the cases it would
have rescued).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from autoseg2d.evaluation.metrics import (
    MM3_PER_ML, case_metrics, summarize_metrics, validate_mask, validate_spacing,
)

PROBABILITY_THRESHOLD = 0.5
MIN_VOLUME_ML_CANDIDATES = (0.01, 0.05, 0.1, 0.5)
FLOOR_CANDIDATES = (0.05, 0.1, 0.2, 0.3)
HALF_HEIGHT = 0.5  # peak_component keeps voxels above this fraction of the peak's height over the median
RANK_DECIMALS = 4  # metric means are rounded to this before ranking: differences below it are ties
SELECTION_RULE = (
    "Candidates: every combination of remove_small_components (off, or each min_volume_ml of the grid) and, for "
    "binary output, keep_nonempty (off, or each floor of the grid), scored on all out-of-fold cases with the "
    "challenge metrics. Hard constraint: no case that has a finite HD without post-processing may become inf. "
    "The remaining candidates are ranked on each of mean Dice (higher is better), mean RVD (lower), mean NSD "
    "(higher) and HD (fewer inf cases, then lower mean over finite cases), means rounded to 4 decimals and ties "
    "sharing their mean rank, as the challenge ranks teams; the lowest mean rank wins. Ties go to keep_nonempty "
    "on (the never-empty guarantee stays unless the out-of-fold cases show that it hurts), then the lowest floor, "
    "then the smallest min_volume_ml."
)


def binarize(prob: np.ndarray, threshold: float = PROBABILITY_THRESHOLD) -> np.ndarray:
    """``prob > threshold``: the same voxels as argmax over (background, lesion) probabilities."""
    return np.asarray(prob) > threshold


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components with face, edge and corner neighbours."""
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))


def remove_small_components(mask: np.ndarray, spacing_mm: Sequence[float], min_volume_ml: float) -> np.ndarray:
    """Keep only connected components (face, edge or corner neighbours) of at least `min_volume_ml`."""
    labels, count = _components(mask)
    if count == 0:
        return mask.astype(bool)
    voxel_ml = float(np.prod(spacing_mm)) / MM3_PER_ML
    volumes_ml = np.bincount(labels.ravel()) * voxel_ml
    keep = volumes_ml >= min_volume_ml
    keep[0] = False
    return keep[labels]


def keep_nonempty(mask: np.ndarray, prob: np.ndarray, floor: float) -> np.ndarray:
    """An empty `mask` becomes the connected component of ``prob > floor`` with the highest probability, or,
    where no voxel passes the floor, :func:`peak_component`: never empty. A non-empty mask is returned as is.
    """
    if mask.any():
        return mask.astype(bool)
    above = np.asarray(prob) > floor
    labels, count = _components(above)
    if count == 0:
        return peak_component(prob)
    peaks = ndimage.maximum(prob, labels, index=np.arange(1, count + 1))
    return labels == int(np.argmax(peaks)) + 1


def peak_component(prob: np.ndarray) -> np.ndarray:
    """The connected region around the map's most probable voxel (the first, if several share the maximum) of
    voxels above half its height over the map's background (its median); at least that voxel.

    Why half the height: it is the map's own scale (the edge of a blurred spot at half maximum, measured from
    the background as a full width at half maximum is), so the kept region follows where the model leaned
    towards a lesion, small where its spot is small, without a second fixed floor that a fainter map would
    again fall below. A flat map (all equal, all zero) has no height: it gives the single peak voxel, the
    smallest mask that keeps HD finite.
    """
    prob = np.asarray(prob, dtype=np.float32)
    peak = np.unravel_index(int(np.argmax(prob)), prob.shape)
    background = float(np.median(prob))
    region = prob > background + (float(prob[peak]) - background) * HALF_HEIGHT
    region[peak] = True
    labels, _ = _components(region)
    return labels == labels[peak]


def _remove_small_step(mask, prob, spacing_mm, min_volume_ml):
    return remove_small_components(mask, spacing_mm, min_volume_ml)


def _keep_nonempty_step(mask, prob, spacing_mm, floor):
    return keep_nonempty(mask, prob, floor)


POSTPROCESSING_STEPS = {
    "remove_small_components": _remove_small_step,
    "keep_nonempty": _keep_nonempty_step,
}


def apply_postprocessing(prob: np.ndarray, spacing_mm: Sequence[float], choice: dict) -> np.ndarray:
    """Threshold `prob` and apply the steps in `choice` (from :func:`choose_postprocessing`); returns uint8 {0,1}."""
    return postprocess(prob, spacing_mm, choice)[0]


def postprocess(prob: np.ndarray, spacing_mm: Sequence[float], choice: dict,
                never_empty: bool = True) -> tuple[np.ndarray, float | None]:
    """:func:`apply_postprocessing`, and the peak probability of the component the never-empty rescue kept
    (None where it did not act: the mask was not empty before it, or the choice has no rescue).

    With never_empty False the rescue step is skipped but still reported: the peak is that of the component it
    would have kept, so a run that allows empty masks can name the cases it left empty.
    """
    if "threshold" not in choice or "steps" not in choice:
        raise ValueError(
            f"post-processing choice needs keys 'threshold' and 'steps', got {sorted(choice)}; "
            "pass the dict returned by choose_postprocessing."
        )
    mask, rescue_peak = binarize(prob, choice["threshold"]), None
    for step in choice["steps"]:
        if step.get("name") == "keep_nonempty" and not mask.any():
            rescue_peak = float(np.max(prob))  # both of keep_nonempty's choices hold the map's maximum
            if not never_empty:
                continue
        mask = _run_step(step, mask, prob, spacing_mm)
    return mask.astype(np.uint8), rescue_peak


def candidate_steps(min_volume_ml_candidates: Sequence[float] = MIN_VOLUME_ML_CANDIDATES,
                    floor_candidates: Sequence[float] = FLOOR_CANDIDATES,
                    allow_nonempty: bool = True) -> list[list[dict]]:
    """Every step list the rule compares, in tie-break order (guarantee on, lowest floor, smallest volume first)."""
    removals = [[{"name": "remove_small_components", "min_volume_ml": float(v)}]
                for v in sorted(min_volume_ml_candidates)]
    rescues = [[{"name": "keep_nonempty", "floor": float(v)}] for v in sorted(floor_candidates)]
    rescues = rescues if allow_nonempty else []
    candidates = [removal + rescue for rescue in rescues for removal in [[], *removals]]
    return candidates + [removal for removal in [[], *removals]]


def choose_postprocessing(
    cases: Sequence[dict],
    min_volume_ml_candidates: Sequence[float] = MIN_VOLUME_ML_CANDIDATES,
    floor_candidates: Sequence[float] = FLOOR_CANDIDATES,
    allow_nonempty: bool = True,
) -> dict:
    """Pick post-processing steps on out-of-fold cases by the rule in :data:`SELECTION_RULE`.

    Each case is a dict with ``prob`` (lesion probability map, float16 is fine), ``truth``
    ({0,1} mask) and ``spacing_mm``, in the truth's voxel grid. Metrics are computed once per
    distinct mask of a case (most candidates change few cases). Returns ``threshold``,
    ``steps`` (what :func:`apply_postprocessing` replays), ``rule``, ``baseline``,
    ``selected``, ``effects`` (what the chosen steps did to empty predictions) and every
    ``evaluated`` candidate with its mean rank, all JSON-serializable.
    """
    probs, truths, spacings, case_ids = _unpack_cases(cases)
    scorer = _CaseScorer(truths, spacings, case_ids)
    base_masks = [binarize(prob) for prob in probs]
    baseline_cases = [scorer.metrics(i, mask) for i, mask in enumerate(base_masks)]
    evaluated = []
    for steps in candidate_steps(min_volume_ml_candidates, floor_candidates, allow_nonempty):
        masks = [_apply_steps(steps, mask, prob, spacing) for mask, prob, spacing in zip(base_masks, probs, spacings)]
        per_case = [scorer.metrics(i, mask) for i, mask in enumerate(masks)]
        new_inf = [case_ids[i] for i, (before, after) in enumerate(zip(baseline_cases, per_case))
                   if math.isfinite(before["hd_mm"]) and not math.isfinite(after["hd_mm"])]
        evaluated.append({"steps": steps, **_summary(per_case), "new_inf_cases": new_inf, "_cases": per_case})
    allowed = [entry for entry in evaluated if not entry["new_inf_cases"]]
    for entry, rank in zip(allowed, _mean_ranks(allowed)):
        entry["mean_rank"] = rank
    best = min(allowed, key=lambda entry: entry["mean_rank"])  # first of equals: the tie-break order
    effects = _effects(baseline_cases, best["_cases"], case_ids)
    for entry in evaluated:
        del entry["_cases"]
    return {
        "threshold": PROBABILITY_THRESHOLD,
        "steps": best["steps"],
        "rule": SELECTION_RULE,
        "baseline": _summary(baseline_cases),
        "selected": {key: value for key, value in best.items() if key != "steps"},
        "effects": effects,
        "evaluated": evaluated,
    }


def _apply_steps(steps: list[dict], mask: np.ndarray, prob: np.ndarray, spacing_mm) -> np.ndarray:
    for step in steps:
        mask = _run_step(step, mask, prob, spacing_mm)
    return mask


class _CaseScorer:
    """Challenge metrics of (case, mask), computed once per distinct mask (keyed by a hash of its bits)."""

    def __init__(self, truths: list[np.ndarray], spacings: list[tuple], case_ids: list[str]):
        self.truths, self.spacings, self.case_ids = truths, spacings, case_ids
        self.cache: dict[tuple[int, str], dict] = {}

    def metrics(self, index: int, mask: np.ndarray) -> dict:
        key = (index, hashlib.sha1(np.packbits(mask.astype(bool))).hexdigest())
        if key not in self.cache:
            self.cache[key] = case_metrics(mask, self.truths[index], self.spacings[index],
                                           case_id=self.case_ids[index])
        return self.cache[key]


def _summary(per_case: list[dict]) -> dict:
    summary = summarize_metrics(per_case)
    keys = ("dice_mean", "rvd_mean", "nsd_mean", "hd_mm_mean", "hd_mm_mean_finite", "num_hd_inf", "num_cases")
    return {key: summary[key] for key in keys}


def _mean_ranks(entries: list[dict]) -> list[float]:
    """Mean over the four metrics of each candidate's rank (1 = best), ties sharing their mean rank."""
    def rounded(value: float) -> float:
        return round(value, RANK_DECIMALS) if math.isfinite(value) else value

    def nan_last(value: float, worst: float) -> float:
        return worst if math.isnan(value) else value

    dice = [-rounded(e["dice_mean"]) for e in entries]
    rvd = [nan_last(rounded(e["rvd_mean"]), math.inf) for e in entries]
    nsd = [-nan_last(rounded(e["nsd_mean"]), -math.inf) for e in entries]
    hd = [(e["num_hd_inf"], nan_last(rounded(e["hd_mm_mean_finite"]), math.inf)) for e in entries]
    hd_order = {value: position for position, value in enumerate(sorted(set(hd)))}
    ranks = [rankdata(values, method="average") for values in (dice, rvd, nsd, [hd_order[v] for v in hd])]
    return [float(np.mean(per_candidate)) for per_candidate in zip(*ranks)]


def _effects(before: list[dict], after: list[dict], case_ids: list[str]) -> dict:
    """What the chosen steps did to empty predictions: lesions rescued, normal scans given a false positive."""
    rescued = [(case_ids[i], b["dice"], a["dice"]) for i, (b, a) in enumerate(zip(before, after))
               if b["true_volume_ml"] > 0 and b["pred_volume_ml"] == 0 and a["pred_volume_ml"] > 0]
    normal = [i for i, b in enumerate(before) if b["true_volume_ml"] == 0]
    false_positive = [case_ids[i] for i in normal if after[i]["pred_volume_ml"] > 0]
    return {
        "empty_before": int(sum(b["pred_volume_ml"] == 0 for b in before)),
        "empty_after": int(sum(a["pred_volume_ml"] == 0 for a in after)),
        "rescued_cases": [case for case, _, _ in rescued],
        "rescued_dice_before": float(np.mean([d for _, d, _ in rescued])) if rescued else math.nan,
        "rescued_dice_after": float(np.mean([d for _, _, d in rescued])) if rescued else math.nan,
        "normal_cases": len(normal),
        "normal_false_positive_cases": false_positive,
    }


def describe_effects(choice: dict) -> str:
    """One line for a person: the steps kept and what they did on the out-of-fold cases."""
    effects, base, chosen = choice["effects"], choice["baseline"], choice["selected"]
    steps = ", ".join(f"{s['name']}({', '.join(f'{k}={v}' for k, v in s.items() if k != 'name')})"
                      for s in choice["steps"]) or "none"
    return (f"post-processing {steps}: out-of-fold Dice {base['dice_mean']:.4f} -> {chosen['dice_mean']:.4f}, "
            f"HD inf cases {base['num_hd_inf']} -> {chosen['num_hd_inf']}; empty predictions "
            f"{effects['empty_before']} -> {effects['empty_after']} ({len(effects['rescued_cases'])} lesions rescued); "
            f"normal scans given a false positive: {len(effects['normal_false_positive_cases'])} of "
            f"{effects['normal_cases']}")


def _run_step(step: dict, mask: np.ndarray, prob: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    name = step.get("name")
    if name not in POSTPROCESSING_STEPS:
        raise ValueError(f"unknown post-processing step {name!r}; known steps: {sorted(POSTPROCESSING_STEPS)}.")
    params = {key: value for key, value in step.items() if key != "name"}
    try:
        return POSTPROCESSING_STEPS[name](mask, prob, spacing_mm, **params)
    except TypeError as error:
        raise ValueError(f"post-processing step {name!r} got parameters {params}: {error}") from error


def _unpack_cases(cases: Sequence[dict]) -> tuple[list, list, list, list]:
    if not cases:
        raise ValueError("choose_postprocessing got no cases; pass the cross-validation cases.")
    probs, truths, spacings, case_ids = [], [], [], []
    for index, case in enumerate(cases):
        case_id = str(case.get("case_id", index))
        missing = {"prob", "truth", "spacing_mm"} - case.keys()
        if missing:
            raise ValueError(f"case {case_id!r} lacks keys {sorted(missing)}; each case needs prob, truth, spacing_mm.")
        prob = np.asarray(case["prob"])
        if prob.shape != np.shape(case["truth"]):
            raise ValueError(
                f"case {case_id!r}: probability shape {prob.shape} differs from truth shape {np.shape(case['truth'])}."
            )
        probs.append(prob)
        truths.append(validate_mask(case["truth"], case_id, "truth"))
        spacings.append(validate_spacing(case["spacing_mm"], prob.ndim, case_id))
        case_ids.append(case_id)
    return probs, truths, spacings, case_ids


def foreground_probability(probs: np.ndarray) -> np.ndarray:
    """1 - P(background), with voxels whose argmax is background kept at or below 0.5 (and the others above).

    Thresholded at 0.5 this is exactly the argmax's "any class" mask, so the never-empty rule
    replays what the multi-class output shows, while its floors (below 0.5) still see where
    the model put foreground probability.
    """
    probs = np.asarray(probs, dtype=np.float32)
    foreground = (1.0 - probs[0]).astype(np.float16)  # rounded first: float16 rounds 1 - P a hair above 0.5 to 0.5
    argmax_foreground = probs.argmax(0) > 0
    half = np.float16(0.5)
    return np.where(argmax_foreground, np.maximum(foreground, np.nextafter(half, np.float16(1))),
                    np.minimum(foreground, half))


def choose_multiclass_postprocessing(cases: Sequence[dict], **grids) -> dict:
    """Per-class cleaning and a never-empty rule on the union of classes, each chosen by :data:`SELECTION_RULE`.

    Each case has ``prob`` (C, ...) class probabilities, ``truth`` (class indices) and
    ``spacing_mm``. Small components are removed per class (a class may rightly be absent
    from a case, so no per-class rescue); the rescue acts on "any hemorrhage", as the binary one.
    """
    labels = [np.asarray(c["prob"]).argmax(0) for c in cases]
    num_classes = int(np.asarray(cases[0]["prob"]).shape[0])
    per_class = {}
    for index in range(1, num_classes):
        class_cases = [{"case_id": c.get("case_id", i), "prob": (label == index).astype(np.float16),
                        "truth": (np.asarray(c["truth"]) == index), "spacing_mm": c["spacing_mm"]}
                       for i, (c, label) in enumerate(zip(cases, labels))]
        per_class[str(index)] = choose_postprocessing(class_cases, allow_nonempty=False, **grids)
    union_cases = [{"case_id": c.get("case_id", i), "prob": foreground_probability(c["prob"]),
                    "truth": np.asarray(c["truth"]) > 0, "spacing_mm": c["spacing_mm"]} for i, c in enumerate(cases)]
    union = choose_postprocessing(union_cases, min_volume_ml_candidates=(),
                                  floor_candidates=grids.get("floor_candidates", FLOOR_CANDIDATES))
    return {"kind": "multiclass", "per_class": per_class, "foreground": union}


def apply_multiclass_postprocessing(probs: np.ndarray, spacing_mm: Sequence[float], choice: dict) -> np.ndarray:
    """Class indices (uint8) after the per-class steps and the never-empty rule of `choice`."""
    return postprocess_multiclass(probs, spacing_mm, choice)[0]


def postprocess_multiclass(probs: np.ndarray, spacing_mm: Sequence[float], choice: dict,
                           never_empty: bool = True) -> tuple[np.ndarray, float | None]:
    """:func:`apply_multiclass_postprocessing` and the rescue's peak "any class" probability, as
    :func:`postprocess` reports it."""
    probs = np.asarray(probs)
    labels = probs.argmax(0).astype(np.uint8)
    for index, class_choice in choice["per_class"].items():
        in_class = labels == int(index)
        kept = apply_postprocessing(in_class.astype(np.float16), spacing_mm, class_choice).astype(bool)
        labels[in_class & ~kept] = 0
    floors = [step["floor"] for step in choice["foreground"]["steps"] if step["name"] == "keep_nonempty"]
    if not floors or labels.any():
        return labels, None
    foreground = foreground_probability(probs)  # empty, also when cleaning emptied it: the most probable component
    if never_empty:
        rescued = keep_nonempty(np.zeros(labels.shape, bool), foreground, floors[0])
        labels[rescued] = probs[1:, rescued].argmax(0).astype(np.uint8) + 1
    return labels, float(np.max(foreground))


def reads_low_probabilities(probs: np.ndarray, spacing_mm: Sequence[float], choice: dict | None) -> bool:
    """True where the mask `choice` makes of class probabilities (C, ...) depends on values below 0.5: its
    never-empty rescue would act (the mask before it is empty), or its threshold is below 0.5. An ensemble that
    only estimated those values (screening) computes them before post-processing."""
    if not choice:
        return False
    multiclass = choice.get("kind") == "multiclass"
    if not multiclass and probs.shape[0] != 2:
        return False  # argmax only: no threshold, no rescue
    steps = choice["foreground"]["steps"] if multiclass else choice["steps"]
    if not multiclass and choice["threshold"] < PROBABILITY_THRESHOLD:
        return True
    if not any(step["name"] == "keep_nonempty" for step in steps):
        return False
    kept = [step for step in steps if step["name"] != "keep_nonempty"]
    if multiclass:
        return not apply_multiclass_postprocessing(probs, spacing_mm, {**choice, "foreground": {"steps": kept}}).any()
    return not apply_postprocessing(probs[1], spacing_mm, {**choice, "steps": kept}).any()
