"""Where the driver finds the segresnet2d template, and the one place that loads template and bundle scripts.

The template is a plain folder that BundleGen copies, not an installed package, so the
driver needs a source checkout (`pip install -e .`). SEGRESNET2D_TEMPLATES points elsewhere,
e.g. at an edited copy of the template.

A template's scripts import their siblings by plain names (``from volumes import ...``), as
MONAI runs them. Loaded naively into one process, every bundle would share the sibling modules
of the first one loaded. Here each scripts folder is imported with its own folder first on
sys.path and the plain sibling names out of sys.modules, and its modules are taken out of
sys.modules again afterwards: every bundle runs its own code. Folders whose .py files are
byte-identical (the usual case: one template version) share one loaded copy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import yaml

ALGO_NAME = "segresnet2d"
ENV_VARIABLE = "SEGRESNET2D_TEMPLATES"
CHECKOUT_TEMPLATES = Path(__file__).resolve().parents[1] / "algorithm_templates"
BUNDLE_CONFIG = Path("configs") / "hyper_parameters.yaml"
CONTRACT = "bundle_contract"  # the template module that owns the bundle's file names and formats

_LOADED: dict[str, dict[str, ModuleType]] = {}  # digest of a scripts folder -> its modules, by plain name
_DIGESTS: dict[tuple, str] = {}  # a scripts folder's file state -> scripts_digest
_LOADING = threading.RLock()


def templates_root() -> Path:
    """The folder holding segresnet2d/ (what BundleGen's templates_path_or_url takes)."""
    root = Path(os.environ.get(ENV_VARIABLE) or CHECKOUT_TEMPLATES)
    if not (root / ALGO_NAME / "scripts" / "algo.py").is_file():
        raise FileNotFoundError(
            f"the {ALGO_NAME} template is not in {root}: run the driver from a source checkout installed with"
            f" `pip install -e .`, or set {ENV_VARIABLE} to a folder that holds {ALGO_NAME}/")
    return root


def template_dir() -> Path:
    return templates_root() / ALGO_NAME


def template_config() -> Path:
    return template_dir() / BUNDLE_CONFIG


def default_modality() -> str:
    """The template's own modality (its hyper_parameters.yaml): what a bundle assumes when the data source
    names none, so the driver's default cannot disagree with the bundle's."""
    config = yaml.safe_load(template_config().read_text())
    if "modality" not in config:
        raise ValueError(f"{template_config()} has no 'modality' key; the driver takes its default modality from"
                         " there: add modality: ct")
    return str(config["modality"])


def scripts_digest(scripts: Path) -> str:
    """What makes two scripts folders the same code: the names and bytes of their .py files.

    Hashed once per folder and file state (names, sizes, modification times): lookups happen per
    bundle and case (greedy selection, the input check), and a folder's scripts rarely change.
    """
    files = sorted(scripts.glob("*.py"))
    state = (str(scripts), *((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files))
    if state not in _DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        _DIGESTS[state] = digest.hexdigest()
    return _DIGESTS[state]


def load_scripts_module(scripts: Path, name: str) -> ModuleType:
    """Module `name` of one scripts folder, with that folder's own copies of its siblings.

    It is imported by its plain name (as MONAI runs the scripts) with the folder first on sys.path
    and every plain sibling name out of sys.modules; afterwards the folder's modules leave
    sys.modules and sys.path is restored, so the next folder, the tests' plain imports and this
    one never see each other's modules.
    """
    scripts = Path(scripts).resolve()
    if not (scripts / f"{name}.py").is_file():
        raise FileNotFoundError(f"{scripts} has no {name}.py; a segresnet2d bundle's scripts/ holds it (was the "
                                "bundle made from an older template? generate it again)")
    with _LOADING:
        modules = _LOADED.setdefault(scripts_digest(scripts), {})
        if name not in modules:
            modules.update(_import_isolated(scripts, name, modules))
        return modules[name]


def _import_isolated(scripts: Path, name: str, loaded: dict[str, ModuleType]) -> dict[str, ModuleType]:
    siblings = {path.stem for path in scripts.glob("*.py")}
    saved = {sibling: sys.modules.pop(sibling) for sibling in siblings if sibling in sys.modules}
    saved_path = list(sys.path)
    sys.modules.update(loaded)  # siblings this folder's copy already loaded are reused, not loaded twice
    sys.path.insert(0, str(scripts))
    try:
        importlib.invalidate_caches()
        importlib.import_module(name)
        return {sibling: sys.modules[sibling] for sibling in siblings if sibling in sys.modules}
    finally:
        for sibling in siblings:
            sys.modules.pop(sibling, None)
        sys.modules.update(saved)
        sys.path[:] = saved_path  # infer.py and train.py put their folder on sys.path themselves


def template_module(name: str) -> ModuleType:
    """A module of the repository's template (the template never imports autoseg2d, so it is loaded by path)."""
    return load_scripts_module(template_dir() / "scripts", name)


def bundle_module(bundle: Path, name: str) -> ModuleType:
    """A module of a generated bundle's own scripts/ (the template version it was made from)."""
    return load_scripts_module(Path(bundle) / "scripts", name)


def bundle_contract(bundle: Path) -> ModuleType:
    """The bundle's own bundle_contract module: the names and formats of the files its trainer writes.

    A bundle generated before the template had that module writes the same files, so the repository's
    template's copy reads it.
    """
    if (Path(bundle) / "scripts" / f"{CONTRACT}.py").is_file():
        return bundle_module(bundle, CONTRACT)
    return template_module(CONTRACT)


def bundle_config(bundle: Path):
    """The bundle's config (monai.bundle.ConfigParser), parsed as MONAI does, with bundle_root set to the folder
    itself (as the trainer's load_config does), so a moved or copied work dir reads its own files."""
    from monai.bundle import ConfigParser  # here: MONAI loads torch, which the datalist module does not need
    bundle = Path(bundle)
    config_file = bundle / BUNDLE_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{bundle} is not a generated bundle: {config_file} is missing; generate the bundles"
                                " again (run_autoseg.py run) or point at a folder made by BundleGen")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle)
    return parser


def bundle_files(bundle: Path):
    """The bundle's files (bundle_contract.BundleFiles), found, as MONAI's BundleAlgo.get_score does, from
    its config's ckpt_path; parsed once per state of the config file (the ensemble stage asks per bundle
    and case, and a parse takes ~5 ms)."""
    config_file = Path(bundle) / BUNDLE_CONFIG
    stat = config_file.stat() if config_file.is_file() else None
    return _bundle_files(Path(bundle), stat and (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=1024)
def _bundle_files(bundle: Path, config_state: tuple | None):
    ckpt_path = bundle_config(bundle).get_parsed_content("ckpt_path", default=str(bundle))
    return bundle_contract(bundle).BundleFiles(Path(ckpt_path))
