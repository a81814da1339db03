"""Build a MONAI datalist (training with folds, testing) from a folder of NIfTI cases.

    python run_autoseg.py datalist --root /data/instance22 --output datalist.json

Layouts are a registry: each knows how to recognise its folder and how to pair images
with labels. Folds are stratified by lesion volume so every fold gets small and large
bleeds alike; paths are written relative to `root` (the `--dataroot` of later stages),
so a datalist stays valid when the data folder moves.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from autoseg2d.atomic_files import write_json_atomic

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NNUNET_CHANNEL = "_0000"
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net channel id at the end of a case name
MAX_VOLUME_BINS = 5  # lesion-volume strata; fewer when there are too few cases per fold
SHIPPED_DATALISTS = Path(__file__).resolve().parents[1] / "datalists"  # datalists that come with the project


class DatalistError(ValueError):
    """A datalist or data folder that cannot be used as it is."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def case_name(path: str | Path) -> str:
    """A NIfTI file's name without .nii.gz or .nii: the case's name in reports, predictions and caches.

    The template names cases with its own `volumes.case_name` (it must not import the driver);
    tests/test_datalist.py keeps the two equal.
    """
    name = Path(path).name
    suffix = next((s for s in NIFTI_SUFFIXES if name.endswith(s)), "")
    return name[: len(name) - len(suffix)]


def _case_id(path: Path, channel_suffix: str = "") -> str:
    """The case name without an nnU-Net channel suffix, to pair an image with its label."""
    name = case_name(path)
    return name[: -len(channel_suffix)] if channel_suffix and name.endswith(channel_suffix) else name


def _nifti_files(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for ext in NIFTI_SUFFIXES for p in folder.glob(pattern + ext) if p.is_file())


def _pair(images: list[Path], label_dir: Path | list[Path], image_suffix: str = "") -> list[Case]:
    """Match every image with the label of the same case id; a label without an image is an error."""
    labels = _nifti_files(label_dir) if isinstance(label_dir, Path) else label_dir
    by_id = {_case_id(p): p for p in labels}
    cases = [Case(_case_id(p, image_suffix), p, by_id.get(_case_id(p, image_suffix))) for p in images]
    orphans = sorted(set(by_id) - {c.case_id for c in cases})
    if orphans:
        raise DatalistError(f"labels without an image: {orphans[:5]}{' ...' if len(orphans) > 5 else ''}; "
                            "add the images or remove those labels")
    return cases


def _instance22(root: Path, image_glob: str | None, label_glob: str | None) -> tuple[list[Case], list[Path]]:
    cases = _pair(_nifti_files(root / "train" / "data"), root / "train" / "label")
    return cases, _nifti_files(root / "evaluation")


def _nnunet(root: Path, image_glob: str | None, label_glob: str | None) -> tuple[list[Case], list[Path]]:
    """nnU-Net raw (<case>_0000.nii.gz) or Decathlon style (<case>.nii.gz) images; one channel only."""
    images = _nifti_files(root / "imagesTr")
    other_channels = [p.name for p in images if CHANNEL_SUFFIX.search(_case_id(p)) and
                      not _case_id(p).endswith(NNUNET_CHANNEL)]
    if other_channels:
        raise DatalistError(f"imagesTr holds channels other than {NNUNET_CHANNEL} (e.g. {other_channels[0]}); "
                            "segresnet2d takes one CT channel: move the other channels out of imagesTr")
    cases = _pair(images, root / "labelsTr", NNUNET_CHANNEL)
    test_images = [p for p in _nifti_files(root / "imagesTs") if not CHANNEL_SUFFIX.search(_case_id(p)) or
                   _case_id(p).endswith(NNUNET_CHANNEL)]
    return cases, test_images


def _globs(root: Path, image_glob: str | None, label_glob: str | None) -> tuple[list[Case], list[Path]]:
    """Images with a label of the same case id train; images without one are testing."""
    if not image_glob:
        raise DatalistError("layout 'globs' needs --image_glob (e.g. 'images/*.nii.gz') and usually --label_glob")
    absolute = [g for g in (image_glob, label_glob) if g and os.path.isabs(g)]
    if absolute:
        raise DatalistError(f"glob '{absolute[0]}' is absolute; give it relative to --root {root}")
    images = sorted(p for p in root.glob(image_glob) if p.is_file())
    labels = sorted(p for p in root.glob(label_glob) if p.is_file()) if label_glob else []
    if not images:
        raise DatalistError(f"--image_glob '{image_glob}' matches no file under {root}")
    cases = _pair([p for p in images if p not in set(labels)], labels)
    return [c for c in cases if c.label], [c.image for c in cases if c.label is None]


@dataclass(frozen=True)
class Layout:
    find: Callable[[Path, str | None, str | None], tuple[list[Case], list[Path]]]
    marker: str  # a folder whose presence identifies the layout
    description: str


LAYOUTS = {
    "instance22": Layout(
        _instance22, "train/data", "train/data/NNN.nii.gz, train/label/NNN.nii.gz, evaluation/*.nii.gz"
    ),
    "nnunet": Layout(
        _nnunet, "imagesTr", "imagesTr/<case>_0000.nii.gz (or <case>.nii.gz), labelsTr/<case>.nii.gz, imagesTs/"
    ),
    "globs": Layout(_globs, "", "--image_glob and --label_glob relative to root; unlabelled images are testing"),
}


def detect_layout(root: Path, image_glob: str | None = None) -> str:
    """The one layout whose marker folder exists (globs when --image_glob is given)."""
    if image_glob:
        return "globs"
    found = [name for name, layout in LAYOUTS.items() if layout.marker and (root / layout.marker).is_dir()]
    if len(found) != 1:
        known = "; ".join(f"{name}: {layout.description}" for name, layout in LAYOUTS.items())
        what = f"several layouts {found}" if found else "no known layout"
        raise DatalistError(f"{root} matches {what}; pass --layout (known: {known})")
    return found[0]


def resolve_datalist(datalist: str | Path) -> Path:
    """The datalist file: as given when it exists, else the shipped datalists/<name> (said in the log).

    The project ships the published fold files (datalists/instance22.json), and its README runs
    them by bare name from any folder.
    """
    path = Path(str(datalist))
    if path.is_file():
        return path
    shipped = SHIPPED_DATALISTS / path.name
    if not path.is_absolute() and len(path.parts) == 1 and shipped.is_file():
        logger.info(f"datalist {path} is not in {Path.cwd()}; using the shipped {shipped}")
        return shipped
    known = sorted(p.name for p in SHIPPED_DATALISTS.glob("*.json")) if SHIPPED_DATALISTS.is_dir() else []
    raise DatalistError(f"datalist {path} not found (looked in {Path.cwd()}"
                        + (f" and {SHIPPED_DATALISTS}, which holds {', '.join(known)}" if known else "")
                        + "); give its path, or build one with `python run_autoseg.py datalist --root DATA --output "
                        "datalist.json`")


def read_datalist(datalist: str | Path) -> dict:
    """The datalist JSON, found as `resolve_datalist` finds it: an object with a "training" list.

    The one reader of datalists in the driver, so every stage fails the same way on a missing
    file, invalid JSON or a file that is not a datalist. Entries are checked by `validate_folds`.
    """
    path = resolve_datalist(datalist)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatalistError(f"datalist {path} cannot be read ({err}); check its permissions or "
                            f"{_rebuild(path)}") from err
    return parse_datalist(data, path)


def _rebuild(path: Path) -> str:
    return f"rebuild it with `python run_autoseg.py datalist --root DATA --output {path}`"


def parse_datalist(data: bytes, path: Path) -> dict:
    """A datalist file's bytes (read once by a caller that also hashes them) as read_datalist checks them."""
    rebuild = _rebuild(path)
    try:
        content = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DatalistError(f"datalist {path} is not UTF-8 text ({err}); {rebuild}") from err
    except json.JSONDecodeError as err:
        raise DatalistError(f"datalist {path} is not valid JSON ({err}); fix the line named or {rebuild}") from err
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        found = f"an object with keys {sorted(content)}" if isinstance(content, dict) else type(content).__name__
        raise DatalistError(f"datalist {path} holds {found}, not a JSON object with a 'training' list of "
                            "{'image', 'label', 'fold'} entries (and optionally 'testing'); give the MONAI "
                            f"datalist or {rebuild}")
    return content


def read_class_names(datalist: dict, source: str) -> list[str]:
    """The optional top-level "class_names" of a datalist: one name per label id 1..N (e.g. IPH, IVH, SAH)."""
    names = datalist.get("class_names", []) if isinstance(datalist, dict) else []
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names) \
            or len(set(names)) != len(names):
        raise DatalistError(f"{source}: class_names {names!r} must be a list of distinct names, one per label id "
                            "1..N in order (e.g. [IPH, IVH, SAH]); background (0) has no name")
    return list(names)


def lesion_volume_ml(label_path: Path) -> float:
    label = nib.load(str(label_path))
    voxel_ml = float(np.prod(label.header.get_zooms()[:3])) / 1000.0
    return float(np.count_nonzero(np.asanyarray(label.dataobj))) * voxel_ml


def derive_volume_strata(volumes_ml: list[float], num_folds: int) -> list[int]:
    """Equal-count bins of lesion volume, as many as keep >= num_folds cases in each.

    Rank-based (not value-based) bins stay equal-sized when many cases share a volume
    (e.g. empty labels), which StratifiedKFold needs: every bin must fill every fold.
    """
    num_bins = min(MAX_VOLUME_BINS, len(volumes_ml) // num_folds)
    ranks = np.argsort(np.argsort(volumes_ml, kind="stable"), kind="stable")
    return [int(r * num_bins // len(volumes_ml)) for r in ranks] if num_bins >= 2 else [0] * len(volumes_ml)


def assign_folds(num_cases: int, num_folds: int, seed: int, strata: list[int] | None = None) -> list[int]:
    """Seeded k-fold: stratified when strata with two or more levels are given, plain otherwise."""
    _check_num_folds(num_folds, num_cases)
    folds = [0] * num_cases
    if strata is not None and len(set(strata)) >= 2:
        splits = StratifiedKFold(num_folds, shuffle=True, random_state=seed).split(np.zeros(num_cases), strata)
    else:
        splits = KFold(num_folds, shuffle=True, random_state=seed).split(np.zeros(num_cases))
    for fold, (_, held_out) in enumerate(splits):
        for i in held_out:
            folds[i] = fold
    return folds


def _check_num_folds(num_folds: int, num_cases: int) -> None:
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise DatalistError(f"num_folds={num_folds!r} must be an integer >= 2")
    if num_cases < num_folds:
        raise DatalistError(f"{num_cases} training cases cannot fill {num_folds} folds; "
                            f"pass --num_folds {max(2, num_cases)} or fewer, or add cases")


def _strata_from_labels(labels: list[Path], num_folds: int) -> list[int] | None:
    try:
        volumes = [lesion_volume_ml(p) for p in labels]
    except Exception as err:  # any unreadable label means plain k-fold, not a failed datalist
        logger.warning(f"labels not readable ({err}); folds are plain k-fold, not stratified by lesion volume")
        return None
    return derive_volume_strata(volumes, num_folds)


def validate_folds(datalist: dict, num_folds: int | None = None) -> int:
    """Check folds and duplicates; return the number of folds.

    Every training entry needs image, label and an int fold in 0..k-1, every fold holds a
    case, and no image appears twice or in both training and testing (that would leak
    test cases into training). k is num_folds or, when None, the largest fold + 1.
    """
    training = datalist.get("training") if isinstance(datalist, dict) else None
    if not isinstance(training, list) or not training:
        raise DatalistError("datalist needs a non-empty 'training' list of {'image', 'label', 'fold'} entries")
    for i, entry in enumerate(training):
        missing = [k for k in ("image", "label", "fold") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DatalistError(f"training entry {i} ({_name(entry)}) has no {', '.join(missing)}; "
                                "give every entry image, label and fold; a datalist with no folds at all gets them "
                                "drawn by `python run_autoseg.py --datalist ...` (or `run_autoseg.py datalist`)")
        fold = entry["fold"]
        if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
            raise DatalistError(f"training entry {i} ({entry['image']}) has fold {fold!r}; folds are integers >= 0")
    k = num_folds if num_folds is not None else max(e["fold"] for e in training) + 1
    _check_num_folds(k, len(training))
    bad = [(e["image"], e["fold"]) for e in training if e["fold"] >= k]
    if bad:
        raise DatalistError(f"{bad[0][0]} has fold {bad[0][1]}, outside 0..{k - 1} for {k} folds; "
                            f"renumber folds or pass num_folds={max(e['fold'] for e in training) + 1}")
    empty = sorted(set(range(k)) - {e["fold"] for e in training})
    if empty:
        raise DatalistError(f"folds {empty} hold no training case (of {k} folds); renumber the folds 0..k-1 "
                            "or use fewer folds")
    _check_duplicates(training, datalist.get("testing", []))
    return k


def _name(entry: object) -> str:
    return str(entry.get("image", "?")) if isinstance(entry, dict) else repr(entry)


def _check_duplicates(training: list[dict], testing: list[dict]) -> None:
    for section, entries in (("training", training), ("testing", testing)):
        counts = Counter(os.path.normpath(_name(e)) for e in entries)
        twice = [image for image, n in counts.items() if n > 1]
        if twice:
            raise DatalistError(f"{section} lists {twice[0]} {counts[twice[0]]} times; keep one entry per case")
    both = {os.path.normpath(_name(e)) for e in training} & {os.path.normpath(_name(e)) for e in testing}
    if both:
        raise DatalistError(f"{sorted(both)[0]} is in both training and testing; remove it from one of them")


def ensure_folds(datalist: dict, num_folds: int, seed: int = 0, dataroot: str | None = None) -> dict:
    """A copy of the datalist with folds: kept and validated when present, added when absent.

    An existing split is never redrawn, since results and checkpoints refer to it. Added
    folds are stratified by lesion volume when `dataroot` is given and labels are readable.
    """
    training = datalist.get("training") if isinstance(datalist, dict) else None
    if not isinstance(training, list) or not training:
        raise DatalistError("datalist needs a non-empty 'training' list of {'image', 'label'} entries")
    with_fold = sum(1 for e in training if isinstance(e, dict) and "fold" in e)
    if with_fold == len(training):
        existing = validate_folds(datalist)
        if existing != num_folds:
            raise DatalistError(f"the datalist already has {existing} folds but num_folds={num_folds}; an existing "
                                f"split is not redrawn: pass num_folds={existing} or remove every 'fold' to re-split")
        return json.loads(json.dumps(datalist))
    if with_fold:
        first = next(e for e in training if "fold" not in e)
        raise DatalistError(f"{with_fold} of {len(training)} training entries have a fold but {_name(first)} has "
                            "none; give every entry a fold or remove all folds to draw a new split")
    for i, entry in enumerate(training):
        missing = [k for k in ("image", "label") if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if missing:
            raise DatalistError(f"training entry {i} ({_name(entry)}) has no {' or '.join(missing)} path; "
                                "give every training entry an image and a label")
    strata = None
    if dataroot is not None:
        strata = _strata_from_labels([Path(dataroot, e["label"]) for e in training], num_folds)
    folds = assign_folds(len(training), num_folds, seed, strata)
    result = json.loads(json.dumps(datalist))
    for entry, fold in zip(result["training"], folds):
        entry["fold"] = fold
    validate_folds(result, num_folds)
    return result


def build_datalist(
    root: str,
    output: str,
    num_folds: int,
    layout: str = "auto",
    seed: int = 0,
    image_glob: str | None = None,
    label_glob: str | None = None,
) -> str:
    """Find the cases under root, split them into num_folds folds and write the datalist JSON; return its path.

    The command line's `datalist` (context.make_datalist) gives num_folds its default from profiles.yaml.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatalistError(f"--root {root} is not a folder")
    name = detect_layout(root_path, image_glob) if layout == "auto" else layout
    if name not in LAYOUTS:
        raise DatalistError(f"--layout '{layout}' is unknown; known layouts: {['auto', *LAYOUTS]}")
    if name != "globs" and (image_glob or label_glob):
        raise DatalistError(f"--image_glob/--label_glob are used only by --layout globs, not '{name}'")
    cases, test_images = LAYOUTS[name].find(root_path, image_glob, label_glob)
    unlabelled = [c.image.name for c in cases if c.label is None]
    if unlabelled:
        raise DatalistError(f"{len(unlabelled)} training images have no label (e.g. {unlabelled[0]}); "
                            f"add the labels or move the images to the test folder")
    _check_num_folds(num_folds, len(cases))
    strata = _strata_from_labels([c.label for c in cases], num_folds)
    folds = assign_folds(len(cases), num_folds, seed, strata)

    def rel(p: Path) -> str:
        return p.relative_to(root_path).as_posix()

    datalist = {
        "training": [{"image": rel(c.image), "label": rel(c.label), "fold": f} for c, f in zip(cases, folds)],
        "testing": [{"image": rel(p)} for p in test_images],
    }
    validate_folds(datalist, num_folds)
    write_json_atomic(datalist, output)
    how = "stratified by lesion volume" if strata and len(set(strata)) >= 2 else "plain k-fold"
    logger.info(f"{output}: layout {name}, {len(cases)} training cases in {num_folds} folds ({how}, seed {seed}), "
                f"{len(test_images)} testing")
    return str(output)
