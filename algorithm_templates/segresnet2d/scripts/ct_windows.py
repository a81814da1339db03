"""Data statistics -> the three CT windows (HU) that become input channels: lesion, tissue, air to bone.

Part of planning (planning.derive_settings calls WINDOW_RULES by modality); each rule takes the
median 0.5-99.5 % intensity ranges of the labelled voxels and of whole images, and falls back to
the config's standard windows, with the reason, when a window cannot be derived.
"""

from __future__ import annotations

import math

HU_MIN = -1024  # lowest value a 12-bit CT stores (air); scanners pad outside the FOV below it
HU_MAX = 3071  # highest value a 12-bit CT stores
LESION_WINDOW_MARGIN = 0.25  # widen the labelled range by this share of its width on each side
MIN_LESION_WINDOW_WIDTH_HU = 40  # 8 x the ~5 HU noise of head CT, so the window does not amplify noise
MAX_LESION_WINDOW_WIDTH_HU = 500  # wider labelled ranges hold air or bone: labels or units are off
BRAIN_PARENCHYMA_HU = 40  # grey matter; the tissue around an intracranial lesion
TISSUE_WINDOW_SPAN = 2.0  # tissue window half-width = this x the farthest lesion-window edge from 40 HU
MIN_WIDE_WINDOW_WIDTH_HU = 1000  # a "wide" window must at least span soft tissue to bone
WINDOW_STEP_HU = 5  # windows are rounded outwards to this step so they read like clinical ones


def _round_out(low: float, high: float) -> list[int]:
    step = WINDOW_STEP_HU
    return [int(math.floor(low / step) * step), int(math.ceil(high / step) * step)]


def derive_lesion_window_hu(pct_hu: tuple[float, float] | None) -> tuple[list[int] | None, str]:
    """The labelled voxels' 0.5-99.5 % range, widened so lesion edges do not saturate.

    None (use the standard window) when the range is missing or cannot be HU of a lesion.
    """
    if pct_hu is None:
        return None, "no foreground intensity percentiles"
    low, high = pct_hu
    if not (math.isfinite(low) and math.isfinite(high) and HU_MIN <= low < high <= HU_MAX):
        return None, f"foreground 0.5-99.5 % = {low:g}..{high:g} HU is not an increasing range inside CT's HU range"
    if high - low > MAX_LESION_WINDOW_WIDTH_HU:
        return None, (f"foreground 0.5-99.5 % = {low:g}..{high:g} HU spans more than {MAX_LESION_WINDOW_WIDTH_HU} HU "
                      "(labels include air or bone, or images are not in HU)")
    width = high - low
    margin = max(LESION_WINDOW_MARGIN * width, (MIN_LESION_WINDOW_WIDTH_HU - width) / 2)
    window = _round_out(low - margin, high + margin)
    return window, f"foreground 0.5-99.5 % = {low:.1f}..{high:.1f} HU widened by {margin:.1f} HU each side"


def derive_tissue_window_hu(lesion_window_hu: list[int]) -> tuple[list[int], str]:
    """A window centred on brain parenchyma that holds the lesion window in its middle half.

    DataAnalyzer measures only labelled voxels and whole images (mostly air), so the tissue
    level is the anatomical constant; the width follows the lesion so both are visible.
    """
    reach = max(abs(edge - BRAIN_PARENCHYMA_HU) for edge in lesion_window_hu)
    half = TISSUE_WINDOW_SPAN * reach
    window = _round_out(BRAIN_PARENCHYMA_HU - half, BRAIN_PARENCHYMA_HU + half)
    return window, f"centred on brain {BRAIN_PARENCHYMA_HU} HU, half-width {TISSUE_WINDOW_SPAN:g} x {reach:g} HU"


def derive_wide_window_hu(
    pct_hu: tuple[float, float] | None, lesion_window_hu: list[int]
) -> tuple[list[int] | None, str]:
    """The whole image's 0.5-99.5 % range (air to bone), clipped to stored HU: shows skull and air."""
    if pct_hu is None:
        return None, "no image intensity percentiles"
    low, high = max(pct_hu[0], HU_MIN), min(pct_hu[1], HU_MAX)
    if not (high - low >= MIN_WIDE_WINDOW_WIDTH_HU and low <= lesion_window_hu[0] and lesion_window_hu[1] <= high):
        return None, (f"image 0.5-99.5 % = {pct_hu[0]:g}..{pct_hu[1]:g} HU is narrower than {MIN_WIDE_WINDOW_WIDTH_HU} "
                      f"HU or does not contain the lesion window {lesion_window_hu}")
    return _round_out(low, high), f"image 0.5-99.5 % = {pct_hu[0]:.1f}..{pct_hu[1]:.1f} HU"


def derive_ct_windows_hu(lesion_pct_hu: tuple[float, float] | None, image_pct_hu: tuple[float, float] | None,
                         default_windows: list, source: str) -> tuple[list[list[int]], list[str]]:
    """Three windows -> three input channels: the lesion, the tissue around it, air to bone.

    A window that cannot be derived falls back to the standard one from the config, with the reason.
    """
    fallback = [[int(v) for v in w] for w in default_windows]
    lesion, why = derive_lesion_window_hu(lesion_pct_hu)
    if lesion is None:
        notes = [f"ct_windows_hu[0] {fallback[0]}: standard window ({why})",
                 f"ct_windows_hu[1] {fallback[1]}: standard window (follows window 0)"]
        lesion, tissue = fallback[0], fallback[1]
    else:
        tissue, how = derive_tissue_window_hu(lesion)
        notes = [f"ct_windows_hu[0] {lesion}: {why}; from {source}", f"ct_windows_hu[1] {tissue}: {how}"]
    wide, why = derive_wide_window_hu(image_pct_hu, lesion)
    notes.append(f"ct_windows_hu[2] {wide}: {why}" if wide
                 else f"ct_windows_hu[2] {fallback[2]}: standard window ({why})")
    return [lesion, tissue, wide or fallback[2]], notes


def no_windows(lesion_pct_hu: tuple[float, float] | None, image_pct_hu: tuple[float, float] | None,
               default_windows: list, source: str) -> tuple[list, list[str]]:
    return [], ["ct_windows_hu []: not CT, so inputs are z-score normalized per image instead of HU windows"]


# modality -> window rule; modalities without one get no_windows (z-scored input)
WINDOW_RULES = {"ct": derive_ct_windows_hu}
