"""Whether a scan's voxel spacing is like the training scans': the network runs at each scan's own resolution.

Nothing is resampled (the method segments at native resolution), so a model trained on 5 mm slices
sees other neighbours in a 1.25 mm thin-slice scan, and one trained at 0.45 mm pixels sees a smaller head
at 0.9 mm: its masks can be far off with no error anywhere. The report flags such a case.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

# A scan may be this many times finer or coarser on an axis than the finest / coarsest training scan
# before it is flagged: INSTANCE 2022's scans spread about +-10 % in-plane (0.45 +- 0.04 mm).
SPACING_TOLERANCE = 1.25
AXES = ("x", "y", "z")


@dataclass(frozen=True)
class SpacingRange:
    """The finest and coarsest spacing (mm) of the training scans on each RAS axis (x, y, z)."""

    low: tuple[float, float, float]
    high: tuple[float, float, float]

    @classmethod
    def from_datastats(cls, path: Path) -> SpacingRange | None:
        """The range from DataAnalyzer's datastats.yaml (image_stats spacing min / max, RAS, as it reorients every
        image); None where the file or those entries are missing (a work dir copied without it), with a note."""
        unchecked = ("so scans are not compared with the training scans' spacing; copy the training work dir's "
                     "datastats.yaml there (or run its analyze stage) to have them compared")
        if not path.is_file():
            logger.warning(f"predict: {path} is missing, {unchecked}")
            return None
        try:
            spacing = yaml.safe_load(path.read_text())["stats_summary"]["image_stats"]["spacing"]
            low, high = (tuple(float(v) for v in spacing[key]) for key in ("min", "max"))
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
            logger.warning(f"predict: {path} has no stats_summary.image_stats.spacing min / max "
                           f"({type(error).__name__}: {error}), {unchecked}")
            return None
        if len(low) != 3 or len(high) != 3:
            logger.warning(f"predict: {path} gives stats_summary.image_stats.spacing min / max of {len(low)} / "
                           f"{len(high)} axes, not 3, {unchecked}")
            return None
        return cls(low, high)

    def unlike_axes(self, spacing_mm: Sequence[float]) -> list[str]:
        """The axes on which `spacing_mm` (RAS) lies beyond SPACING_TOLERANCE of the training range."""
        return [axis for axis, value, low, high in zip(AXES, spacing_mm, self.low, self.high)
                if value < low / SPACING_TOLERANCE or value > high * SPACING_TOLERANCE]

    def shown(self) -> str:
        """The range as a reader reads it: 0.42-0.49 x 0.42-0.49 x 5.00 mm."""
        return " x ".join(f"{low:.2f}" if abs(high - low) < 0.005 else f"{low:.2f}-{high:.2f}"
                          for low, high in zip(self.low, self.high)) + " mm"

    def describe(self, spacing_mm: Sequence[float]) -> str:
        """What a reader is told about a case whose spacing is unlike the training scans'."""
        shown = " x ".join(f"{v:.2f}" for v in spacing_mm)
        return (f"voxel spacing {shown} mm is unlike the training scans' ({self.shown()}) on axis "
                f"{', '.join(self.unlike_axes(spacing_mm))}: the models run at each scan's own resolution, so "
                "this mask may be far off; resample the scan to about the training spacing, or train on such scans")
