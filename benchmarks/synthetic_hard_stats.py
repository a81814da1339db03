"""How hard is the hard synthetic CT? Bright-voxel make-up and bleed sizes, next to the easy generator.

    python benchmarks/synthetic_hard_stats.py            # 40 cases at 128 px, about a minute on 2 cores

A threshold at 60 HU finds every bleed of `autoseg2d/synthetic/head_ct.py` and nothing else; on real head CT most voxels
above it are bone edges, calcifications and the falx. This prints, inside the skull, which share of
the voxels of 60-100 HU (the range of acute blood) is bleed, mimic or neither (noise, partial volume),
how much of the bleed lies below 60 HU (small or thin bleeds averaged with brain), and the bleed sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoseg2d.synthetic.head_ct import make_head_ct  # noqa: E402
from autoseg2d.synthetic.hard import make_hard_head_ct  # noqa: E402

NUM_CASES = 40
SIZE_PX = 128
BLOOD_WINDOW_HU = (60, 100)
VOLUME_BINS_ML = (0, 0.5, 1, 5, 20, 60.1)


def bright_shares(image: np.ndarray, label: np.ndarray, mimic: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Counts of intracranial voxels in the blood window that are bleed, mimic, other; and bleed below it."""
    bright = inside & (image >= BLOOD_WINDOW_HU[0]) & (image <= BLOOD_WINDOW_HU[1])
    lesion = label > 0
    return np.array([(bright & lesion).sum(), (bright & mimic).sum(), (bright & ~lesion & ~mimic).sum(),
                     (lesion & (image < BLOOD_WINDOW_HU[0])).sum(), lesion.sum()])


def main() -> None:
    hard, volumes, case_volumes, kinds = np.zeros(5), [], [], {}
    for index in range(NUM_CASES):
        case = make_hard_head_ct([0, index], size_px=SIZE_PX)
        hard += bright_shares(case.ct.image_hu, case.ct.label, case.mimic, case.intracranial)
        volumes += [lesion["volume_ml"] for lesion in case.info["lesions"]]
        case_volumes.append(case.info["lesion_volume_ml"])
        for lesion in case.info["lesions"]:
            kinds[lesion["kind"]] = kinds.get(lesion["kind"], 0) + 1
    easy = np.zeros(5)
    for index in range(NUM_CASES):
        case = make_head_ct(size=SIZE_PX, num_slices=24, seed=index)
        inside = np.abs(case.image_hu.astype(np.float32) - 30) < 200  # the easy head has no bone inside
        easy += bright_shares(case.image_hu, case.label, np.zeros(case.label.shape, bool), inside)
    for name, counts in (("hard", hard), ("easy", easy)):
        total = counts[:3].sum()
        print(f"{name}: intracranial voxels at {BLOOD_WINDOW_HU[0]}-{BLOOD_WINDOW_HU[1]} HU: "
              f"{100 * counts[0] / total:.1f} % bleed, {100 * counts[1] / total:.1f} % mimic, "
              f"{100 * counts[2] / total:.1f} % other; {100 * counts[3] / counts[4]:.1f} % of bleed voxels "
              f"are below {BLOOD_WINDOW_HU[0]} HU")
    histogram, _ = np.histogram(volumes, bins=VOLUME_BINS_ML)
    bins = ", ".join(f"{low}-{high:g} mL: {n}" for low, high, n in zip(VOLUME_BINS_ML, VOLUME_BINS_ML[1:], histogram))
    print(f"hard: {len(volumes)} bleeds in {NUM_CASES} cases ({kinds}); per bleed {bins}")
    print(f"hard: bleed volume per bleed min {min(volumes):.2f}, median {np.median(volumes):.2f}, "
          f"max {max(volumes):.1f} mL; per case median {np.median(case_volumes):.2f} mL, "
          f"{100 * np.mean(np.array(case_volumes) < 5):.0f} % of cases under 5 mL")


if __name__ == "__main__":
    main()
