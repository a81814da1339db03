"""Standard codes of the exported classes: the bundle's metadata and its labels.csv (the file 3D Slicer reads).

Each hemorrhage class is coded as DICOM segmentations code a finding: category Morphologically
Altered Structure, property type Hemorrhage, and the subtype as the anatomic region the blood is
in (3D Slicer's own intracranial hemorrhage model names its segments "Hemorrhage in <region>").
Sources of the codes (SNOMED CT, scheme SCT):
- 49755003 Morphologically Altered Structure, 50960005 Hemorrhage, 1101003 Intracranial, 12738006 Brain,
  35764002 Brain ventricle, 35951006 Subarachnoid space: DICOM PS3.16 (CID 7150, 7151, 4), as shipped
  in pydicom.sr.codedict (tests/export/test_bundle.py checks them there).
- 54214006 Subdural space: not in DICOM's lists; the code SlicerMONAIAuto3DSeg's anatomic context
  (Resources/AnatomicRegionAndModifier-MONAIAuto3DSeg.term.json) gives it for its hemorrhage model.
- Epidural hemorrhage: no epidural-space code in either source, so EDH keeps the Intracranial region;
  its name tells it apart.
A class whose name is not recognised carries no code.
"""

from __future__ import annotations

import csv
import io
import re

CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")
HEMORRHAGE = ("SCT", "50960005", "Hemorrhage")
INTRACRANIAL = ("SCT", "1101003", "Intracranial")
# subtype -> (words of class names that mean it, anatomic region)
SUBTYPES = {
    "IPH": (("iph", "intraparenchymal", "intracerebral", "parenchymal"), ("SCT", "12738006", "Brain")),
    "IVH": (("ivh", "intraventricular", "ventricular"), ("SCT", "35764002", "Brain ventricle")),
    "SAH": (("sah", "subarachnoid"), ("SCT", "35951006", "Subarachnoid space")),
    "SDH": (("sdh", "subdural"), ("SCT", "54214006", "Subdural space")),
    "EDH": (("edh", "epidural", "extradural"), INTRACRANIAL),
}
ANY_HEMORRHAGE_WORDS = ("hemorrhage", "haemorrhage", "ich", "bleed", "bleeding", "blood", "hematoma", "haematoma")
# Slicer's labels.csv columns (SlicerMONAIAuto3DSeg's UsingStandardTerminology.md): a code triplet per sequence
CODE_SEQUENCES = ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
                  "SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionSequence",
                  "AnatomicRegionModifierSequence")
CODE_FIELDS = ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")
LABELS_COLUMNS = ("LabelValue", "Name", *(f"{seq}.{field}" for seq in CODE_SEQUENCES for field in CODE_FIELDS))


def class_codes(name: str) -> dict | None:
    """{category, type, region} code triplets for a class name (IPH, "subdural hemorrhage", ...), None if unknown."""
    words = set(re.findall(r"[a-z]+", name.lower()))
    region = next((site for keys, site in SUBTYPES.values() if words & set(keys)), None)
    if region is None and words & set(ANY_HEMORRHAGE_WORDS):
        region = INTRACRANIAL
    if region is None:
        return None
    return {"category": CATEGORY, "type": HEMORRHAGE, "region": region}


def labels_csv(class_names: list[str]) -> str:
    """labels.csv for the lesion classes (label values 1..N); a class without codes has its code fields empty."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(LABELS_COLUMNS)
    for value, name in enumerate(class_names, 1):
        codes = class_codes(name) or {}
        triplets = [codes.get("category"), codes.get("type"), None, codes.get("region"), None]
        writer.writerow([value, name, *(part for code in triplets for part in (code or ("", "", "")))])
    return stream.getvalue()


def metadata_codes(class_names: list[str]) -> dict:
    """{label value: {name, category, type, region}} for configs/metadata.json (codes as scheme, value, meaning)."""
    coded = {}
    for value, name in enumerate(class_names, 1):
        codes = class_codes(name)
        coded[str(value)] = {"name": name, **({key: dict(zip(CODE_FIELDS, code)) for key, code in codes.items()}
                                              if codes else {})}
    return coded
