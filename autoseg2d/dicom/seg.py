"""A predicted mask as a DICOM SEG object (highdicom) on top of the CT series it was predicted from.

PACS viewers and 3D Slicer then show the segmentation on the original images: the SEG
references every source slice and shares its frame of reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from autoseg2d.atomic_files import atomic_path

SOFTWARE = "segresnet2d-autoseg"
SOFTWARE_VERSION = "0.1.0"
SEG_SERIES_NUMBER = 9901  # a number outside the scanner's usual range, so the SEG sorts after the CT


RESCUED_LABEL = " (rescued)"  # added to each segment's label, where a viewer shows it


def segment_descriptions(class_names: Sequence[str], rescue_note: str | None = None) -> list[hd.seg.SegmentDescription]:
    """One segment per class; with `rescue_note` (the never-empty rescue made the mask) each segment's label says
    "(rescued)" and its Segment Description (0062,0006) carries the note."""
    algorithm = hd.AlgorithmIdentificationSequence(name=SOFTWARE, version=SOFTWARE_VERSION,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name + (RESCUED_LABEL if rescue_note else ""),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for number, name in enumerate(class_names, 1)]
    for segment in segments if rescue_note else []:
        segment.SegmentDescription = rescue_note
    return segments


def write_dicom_seg(mask: np.ndarray, source_files: Sequence[Path], class_names: Sequence[str], target: Path,
                    rescue_note: str | None = None, model: str = "ensemble") -> Path:
    """mask: uint8 class indices (columns, rows, slices) in the order of source_files (as read_series returns);
    rescue_note: what the segments say where the never-empty rescue made the mask (segment_descriptions); model:
    which made it (ensemble or student), in the Manufacturer's Model Name."""
    sources = [pydicom.dcmread(str(path)) for path in source_files]
    if mask.shape[-1] != len(sources):
        raise ValueError(f"the mask has {mask.shape[-1]} slices but the series {len(sources)} files; predict the"
                         " series again")
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0)).astype(np.uint8))  # (slices, rows, columns)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, rescue_note), series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1, manufacturer=SOFTWARE,
        manufacturer_model_name=f"segresnet2d {model}", software_versions=SOFTWARE_VERSION,
        device_serial_number="none", series_description="ICH segmentation (research only)")
    with atomic_path(target) as temporary:
        seg.save_as(str(temporary))
    return target
