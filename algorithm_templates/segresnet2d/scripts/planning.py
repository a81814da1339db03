"""Data statistics -> segresnet2d settings: HU windows (rules in ct_windows.py), crop size, levels, batch, epochs.

Every decision is one `derive_*` function of plain numbers that returns (value, note); the
note is one line with the numbers the value came from. `derive_settings` reads MONAI's
DataAnalyzer output (datastats.yaml, datastats_by_case.yaml) and calls them in turn.

The paper's settings (crop 384, batch 32, 5 levels, the standard windows) and our 300 default epochs are
not repeated here: they come from configs/hyper_parameters.yaml through `defaults`; this
module only holds the rules that scale them and the facts those rules rest on.

DataAnalyzer reorients to RAS, so in its shapes axes 0 and 1 are in-plane and axis 2 is
the slice axis of axial CT. Its datastats.yaml averages per-case percentiles (its
"median" of a summary is a mean, too), and cases without a labelled voxel contribute
zeros to the foreground intensities; wherever the per-case file is given we take the
median over cases instead (over cases with a label for intensities).
"""

from __future__ import annotations

import math
from statistics import median
from typing import NamedTuple

if __package__:  # BundleGen imports algo.py (and so this module) as a package
    from .ct_windows import WINDOW_RULES, no_windows
else:  # a bundle's scripts run as plain files with their folder on sys.path, as autoseg2d.templates loads them
    from ct_windows import WINDOW_RULES, no_windows


REFERENCE_SLICE_PX = 512  # INSTANCE22 slice size the default roi_size was chosen for
MIN_BOTTLENECK_PX = 4  # smallest feature map at the deepest level (nnU-Net's rule)
MIN_BATCH_SIZE = 2  # batch norm needs more than one sample
MAX_BATCH_GROWTH = 4  # small crops may raise the batch to at most 4 x the default
CPU_BATCH_SIZE = 4  # CPU runs are for checks and small data: a small fixed batch keeps steps short
# Measured peak memory (torch.cuda.max_memory_allocated, H100, torch 2.11, MONAI 1.6.1) of one
# AdamW step of SegResNetDS 2D, init_filters 32, 5 levels, 3 input channels, at 384 x 384:
# batch 8 -> 3.07 GiB, batch 32 -> 11.01 GiB with AMP; 5.62 / 21.44 GiB without.
GPU_GIB_PER_SAMPLE_AMP = 0.331  # per 384 x 384 sample with AMP, init_filters 32
GPU_GIB_PER_SAMPLE_FP32 = 0.659  # same without AMP
GPU_GIB_FIXED = 0.5  # weights, AdamW state, CUDA context not counted above
GPU_USABLE_FRACTION = 0.85  # allocator fragmentation and cuDNN workspaces take the rest
MEASURED_SIDE_PX = 384
MEASURED_INIT_FILTERS = 32
# The default num_epochs was chosen for INSTANCE22 training folds: about 80 cases x ~30
# slices (20-70 per case), so about 2,400 slices.
REFERENCE_TRAINING_SLICES = 2400
MAX_EPOCH_SCALE = 4  # epochs stay within [default / 4, default x 4]
PAPER_BUDGET = "the paper: 1600 epochs at batch 256 (32 per GPU x 8 GPUs)"

PCT_LOW, PCT_HIGH = "percentile_00_5", "percentile_99_5"
SUMMARY_FILE = "datastats.yaml"
BY_CASE_FILE = "datastats_by_case.yaml"
CONFIG_FILE = "configs/hyper_parameters.yaml"


class PlanningError(ValueError):
    """Statistics or defaults that settings cannot be derived from."""


class DatasetFacts(NamedTuple):
    """The few numbers planning needs, taken from either statistics file."""

    labels: list[int]
    inplane_shapes_px: list[tuple[int, int]]
    slices_per_case: list[int]
    lesion_pct_hu: tuple[float, float] | None
    image_pct_hu: tuple[float, float] | None
    source: str


REGENERATE_STATS = "regenerate it with monai.apps.auto3dseg.DataAnalyzer(datalist, dataroot).get_all_case_stats()"


def _lookup(tree: dict, path: tuple, where: str, fix: str = REGENERATE_STATS) -> object:
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            raise PlanningError(
                f"{where} has no key '{'.'.join(map(str, path[: i + 1]))}' "
                f"(needed: '{'.'.join(map(str, path))}'); {fix}"
            )
        node = node[key]
    return node


def _optional(tree: dict, path: tuple, where: str) -> object | None:
    try:
        return _lookup(tree, path, where)
    except PlanningError:
        return None


def _first_channel(value: object) -> object:
    """Per-case stats hold one entry per image channel; summaries hold the value itself."""
    return value[0] if isinstance(value, list) and value and isinstance(value[0], (list, dict)) else value


def _percentiles(stats: object) -> tuple[float, float] | None:
    stats = _first_channel(stats)
    if not isinstance(stats, dict) or PCT_LOW not in stats or PCT_HIGH not in stats:
        return None
    return float(stats[PCT_LOW]), float(stats[PCT_HIGH])


def _median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float] | None:
    return (median(p[0] for p in pairs), median(p[1] for p in pairs)) if pairs else None


def _summary(data_stats: dict, *path: str) -> object:
    return _lookup(data_stats, ("stats_summary", *path), SUMMARY_FILE)


def facts_from_summary(data_stats: dict) -> DatasetFacts:
    shape = [int(round(float(s))) for s in _summary(data_stats, "image_stats", "shape", "median")]
    n_cases = int(_summary(data_stats, "n_cases"))
    summary = _summary(data_stats)
    return DatasetFacts(
        labels=[int(v) for v in _summary(data_stats, "label_stats", "labels")],
        inplane_shapes_px=[(shape[0], shape[1])] * n_cases,
        slices_per_case=[shape[2]] * n_cases,
        lesion_pct_hu=_percentiles(_optional(summary, ("image_foreground_stats", "intensity"), SUMMARY_FILE)),
        image_pct_hu=_percentiles(_optional(summary, ("image_stats", "intensity"), SUMMARY_FILE)),
        source=f"{SUMMARY_FILE} (mean over cases)",
    )


def facts_from_cases(data_stats: dict, cases: list[dict]) -> DatasetFacts:
    shapes, lesion, image = [], [], []
    for i, case in enumerate(cases):
        where = f"{BY_CASE_FILE} case {i} ({case.get('image_filepath', '?')})"
        shape = _first_channel(_lookup(case, ("image_stats", "shape"), where))
        shapes.append([int(s) for s in shape])
        if any(int(v) > 0 for v in _lookup(case, ("label_stats", "labels"), where)):
            pct = _percentiles(_optional(case, ("image_foreground_stats", "intensity"), where))
            lesion += [pct] if pct else []
        pct = _percentiles(_optional(case, ("image_stats", "intensity"), where))
        image += [pct] if pct else []
    return DatasetFacts(
        labels=[int(v) for v in _summary(data_stats, "label_stats", "labels")],
        inplane_shapes_px=[(s[0], s[1]) for s in shapes],
        slices_per_case=[s[2] for s in shapes],
        lesion_pct_hu=_median_pair(lesion),
        image_pct_hu=_median_pair(image),
        source=f"{BY_CASE_FILE} (median over {len(cases)} cases, {len(lesion)} with a label)",
    )


def derive_output_classes(labels: list[int]) -> tuple[int, str]:
    """One output channel per label id up to the largest, so argmax returns the label id itself."""
    if any(v < 0 for v in labels) or max(labels, default=0) < 1:
        raise PlanningError(
            f"{SUMMARY_FILE} label_stats.labels is {labels}: no foreground label id >= 1 in any training case; "
            "check that the datalist's 'label' entries point at the label files"
        )
    classes = max(labels) + 1
    gaps = sorted(set(range(classes)) - set(labels))
    note = f"output_classes {classes}: label ids {labels} -> background + {classes - 1}"
    return classes, note + (f" (ids {gaps} never occur but keep their channel)" if gaps else "")


def derive_anisotropy(data_stats: dict) -> tuple[float, str]:
    """Slice spacing over the finer in-plane spacing (median case): how much a 2D model loses.

    With slices several times thicker than pixels (head CT at 5 mm), neighbouring slices
    share little detail and 2D at native resolution loses little against 3D; near 1 a 3D
    model sees context that the 2D one does not.
    """
    spacing = [float(s) for s in _summary(data_stats, "image_stats", "spacing", "median")]
    ratio = spacing[2] / max(min(spacing[0], spacing[1]), 1e-6)
    shown = " x ".join(f"{s:.2f}" for s in spacing)
    return ratio, f"median spacing {shown} mm has slice/in-plane ratio {ratio:.1f}"


def derive_num_levels(crop_px: int, max_levels: int) -> tuple[int, str]:
    """As many levels as the config allows while the deepest map keeps >= MIN_BOTTLENECK_PX pixels.

    Each level halves the map; a 1-2 px bottleneck has no spatial context left to learn from.
    """
    fit = 1 + int(math.floor(math.log2(max(crop_px, 1) / MIN_BOTTLENECK_PX))) if crop_px >= MIN_BOTTLENECK_PX else 1
    levels = max(1, min(max_levels, fit))
    return levels, (f"{levels} levels = min({max_levels} in the config, {fit} that keep a >= {MIN_BOTTLENECK_PX} px "
                    f"bottleneck for a {crop_px} px crop)")


def derive_roi_size(
    inplane_shapes_px: list[tuple[int, int]], default_roi_px: list[int], max_levels: int
) -> tuple[list[int], str]:
    """The config's crop scaled by the median slice size against the 512 px it was chosen for.

    Scaling keeps the crop's share of the slice (384/512 = 3/4: context plus variety of
    position). The crop is capped at the median slice (smaller slices are padded by the
    trainer, so one small case does not shrink everyone's context) and floored to a
    multiple of 2^(levels-1) so every level halves it evenly.
    """
    typical = [int(median(s[axis] for s in inplane_shapes_px)) for axis in (0, 1)]
    raw = [min(round(r * t / REFERENCE_SLICE_PX), t) for r, t in zip(default_roi_px, typical)]
    levels, _ = derive_num_levels(min(raw), max_levels)
    divisor = 2 ** (levels - 1)
    roi = [max(divisor, (r // divisor) * divisor) for r in raw]
    smaller = sum(1 for s in inplane_shapes_px if s[0] < roi[0] or s[1] < roi[1])
    return roi, (f"roi_size {roi}: config {default_roi_px} x median slice {typical} / {REFERENCE_SLICE_PX} px = {raw}, "
                 f"capped at the slice, floored to a multiple of {divisor} = 2^({levels}-1); "
                 f"{smaller} of {len(inplane_shapes_px)} cases have smaller slices (padded)")


def derive_blocks_down(roi_px: list[int], default_blocks: list[int]) -> tuple[list[int], str]:
    """The config's blocks per level, cut to the levels the crop supports (the shallow levels stay)."""
    levels, why = derive_num_levels(min(roi_px), len(default_blocks))
    blocks = [int(b) for b in default_blocks[:levels]]
    return blocks, f"network.blocks_down {blocks}: {why}, from the config's {list(default_blocks)}"


def _gpu_batch(roi_px: list[int], gpu_memory_gb: float | None, amp: bool, init_filters: int) -> tuple[int, str]:
    if gpu_memory_gb is None:
        raise PlanningError("device is cuda but gpu_memory_gb is None; pass the GPU's memory in GiB "
                            "(torch.cuda.get_device_properties(0).total_memory / 2**30)")
    per_sample = (GPU_GIB_PER_SAMPLE_AMP if amp else GPU_GIB_PER_SAMPLE_FP32) * (init_filters / MEASURED_INIT_FILTERS)
    per_sample *= roi_px[0] * roi_px[1] / MEASURED_SIDE_PX**2
    fits = int((gpu_memory_gb * GPU_USABLE_FRACTION - GPU_GIB_FIXED) / per_sample)
    return fits, (f"{fits} fit in {GPU_USABLE_FRACTION:g} x {gpu_memory_gb:.1f} GiB - {GPU_GIB_FIXED} GiB at "
                  f"{per_sample:.3f} GiB per crop (measured, amp={amp}, init_filters={init_filters})")


def _cpu_batch(roi_px: list[int], gpu_memory_gb: float | None, amp: bool, init_filters: int) -> tuple[int, str]:
    return CPU_BATCH_SIZE, f"{CPU_BATCH_SIZE} on CPU (fixed, keeps steps short)"


BATCH_RULES = {"cpu": _cpu_batch, "cuda": _gpu_batch}


def derive_batch_size(
    roi_px: list[int],
    default_roi_px: list[int],
    default_batch: int,
    device: str,
    gpu_memory_gb: float | None,
    amp: bool,
    init_filters: int,
    num_training_slices: int,
) -> tuple[int, str]:
    """Keep the config's pixels per step, limited by device memory and by the data.

    Smaller crops get a proportionally larger batch (up to MAX_BATCH_GROWTH x the config's)
    so each step sees as much image as the paper's 32 x 384^2; the device rule (GPU memory,
    or a fixed small CPU batch) and the number of training slices cap it; batch norm needs >= 2.
    """
    kind = device.split(":")[0]
    if kind not in BATCH_RULES:
        raise PlanningError(f"device '{device}' is not supported; valid device types are {sorted(BATCH_RULES)}")
    same_pixels = int(default_batch * default_roi_px[0] * default_roi_px[1] / (roi_px[0] * roi_px[1]))
    by_pixels = min(same_pixels, MAX_BATCH_GROWTH * default_batch)
    by_device, why = BATCH_RULES[kind](roi_px, gpu_memory_gb, amp, init_filters)
    batch = max(MIN_BATCH_SIZE, min(by_pixels, by_device, num_training_slices))
    return batch, (f"batch_size {batch}: min(same pixels as config {default_batch} x {default_roi_px} -> {by_pixels} "
                   f"(at most {MAX_BATCH_GROWTH} x {default_batch}); device: {why}; {num_training_slices} training "
                   f"slices), at least {MIN_BATCH_SIZE}")


def derive_num_epochs(num_training_slices: int, default_epochs: int, epochs_per_validation: int) -> tuple[int, str]:
    """Scale the config's epochs by sqrt(reference slices / training slices), within [1/4, 4] x.

    An epoch is one pass over the sampled slices, so a small dataset needs more passes to
    get enough optimizer steps and a large one fewer; the square root lets total steps still
    grow with the data (steps ~ sqrt(slices)) rather than stay fixed. Rounded up to a
    multiple of num_epochs_per_validation so the last epoch is validated. The steps an epoch
    holds depend on which slices have a lesion, so the trainer, not planning, logs the budget
    in optimizer steps and samples seen.
    """
    scale = math.sqrt(REFERENCE_TRAINING_SLICES / max(num_training_slices, 1))
    clamped = min(max(scale, 1 / MAX_EPOCH_SCALE), MAX_EPOCH_SCALE)
    epochs = int(math.ceil(default_epochs * clamped / epochs_per_validation) * epochs_per_validation)
    return epochs, (f"num_epochs {epochs}: config {default_epochs} x sqrt({REFERENCE_TRAINING_SLICES} reference / "
                    f"{num_training_slices} training slices) = x{scale:.2f}, kept in [1/{MAX_EPOCH_SCALE}, "
                    f"{MAX_EPOCH_SCALE}], rounded up to a multiple of num_epochs_per_validation "
                    f"{epochs_per_validation} (the trainer logs it as optimizer steps; {PAPER_BUDGET})")


class PlanningDefaults(NamedTuple):
    """The template defaults the rules scale, read once from configs/hyper_parameters.yaml."""

    ct_windows_hu: list
    roi_size_px: list[int]
    blocks_down: list[int]
    init_filters: int
    batch_size: int
    amp: bool
    num_epochs: int
    num_epochs_per_validation: int

    @classmethod
    def from_config(cls, config: dict) -> PlanningDefaults:
        def default(*path: str) -> object:
            return _lookup(config, path, CONFIG_FILE, "restore it from the template's configs/hyper_parameters.yaml")

        return cls(default("ct_windows_hu"), [int(v) for v in default("roi_size")],
                   [int(b) for b in default("network", "blocks_down")], int(default("network", "init_filters")),
                   int(default("batch_size")), bool(default("amp")), int(default("num_epochs")),
                   int(default("num_epochs_per_validation")))


def derive_settings(
    data_stats: dict,
    stats_by_case: list[dict] | dict | None,
    defaults: PlanningDefaults,
    modality: str = "ct",
    device: str = "cpu",
    gpu_memory_gb: float | None = None,
) -> tuple[dict, list[str]]:
    """(settings, notes) for the data-derived keys of configs/hyper_parameters.yaml.

    `data_stats` is the parsed datastats.yaml; `stats_by_case` its per-case list (the
    `stats_by_cases` of datastats_by_case.yaml, or that whole file) or None.
    """
    if isinstance(stats_by_case, dict):
        stats_by_case = _lookup(stats_by_case, ("stats_by_cases",), BY_CASE_FILE)
    facts = facts_from_cases(data_stats, stats_by_case) if stats_by_case else facts_from_summary(data_stats)
    notes = [f"statistics from {facts.source}"]

    classes, note = derive_output_classes(facts.labels)
    notes.append(note)
    window_rule = WINDOW_RULES.get(str(modality).lower(), no_windows)
    windows, window_notes = window_rule(facts.lesion_pct_hu, facts.image_pct_hu, defaults.ct_windows_hu,
                                        facts.source)
    notes += window_notes

    roi, note = derive_roi_size(facts.inplane_shapes_px, defaults.roi_size_px, len(defaults.blocks_down))
    notes.append(note)
    blocks, note = derive_blocks_down(roi, defaults.blocks_down)
    notes.append(note)

    slices = sum(facts.slices_per_case)
    batch, note = derive_batch_size(roi, defaults.roi_size_px, defaults.batch_size, device, gpu_memory_gb,
                                    defaults.amp, defaults.init_filters, slices)
    notes.append(note)
    epochs, note = derive_num_epochs(slices, defaults.num_epochs, defaults.num_epochs_per_validation)
    notes.append(note)

    settings = {
        "output_classes": classes,
        "ct_windows_hu": windows,
        "roi_size": roi,
        "network": {"blocks_down": blocks},
        "batch_size": batch,
        "num_epochs": epochs,
    }
    return settings, notes
