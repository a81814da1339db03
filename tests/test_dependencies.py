"""Every third-party module imported at module level is installed by setup.cfg (install_requires or the test extra).

A module a file imports at its top is needed to import that file at all; a fresh `pip install -e ".[test]"` must
bring it, or the suite stops at collection on a new machine while passing on one that happened to have it. Imports
inside functions or try blocks are optional features (OpenVINO, NNCF, TensorBoard) and are not checked here.
"""

from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the package, the template, the benchmarks the tests import, and the tests themselves import.
SOURCES = [REPO / "autoseg2d", REPO / "algorithm_templates", REPO / "benchmarks", REPO / "tests",
           REPO / "run_autoseg.py"]


def python_files() -> list[Path]:
    files = []
    for source in SOURCES:
        files += [source] if source.is_file() else sorted(source.rglob("*.py"))
    return files


def first_party_names() -> set[str]:
    """Names this repository provides itself: its modules (the template's scripts import siblings by plain name)
    and the folders holding them."""
    names = set()
    for path in python_files():
        names.add(path.stem)
        names.update(folder.name for folder in path.relative_to(REPO).parents if folder.name)
    return names


def module_level_imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in the module's own body (not in functions, classes or try)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def declared_distributions(setup_cfg: Path, extras: tuple[str, ...] = ("test",)) -> set[str]:
    """Distribution names in install_requires and the given extras of a setup.cfg."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    return {normalized(re.match(r"[A-Za-z0-9._-]+", line.strip()).group()) for line in lines if line.strip()}


def undeclared(modules: set[str], declared: set[str], providers: dict[str, list[str]]) -> dict[str, list[str]]:
    """Third-party modules no declared distribution provides, each with the distributions that do (if installed)."""
    third_party = modules - set(sys.stdlib_module_names) - first_party_names() - {"__future__"}
    return {module: providers.get(module, []) for module in sorted(third_party)
            if not declared & {normalized(d) for d in providers.get(module, [])}}


def test_every_module_level_import_is_installed_by_setup_cfg():
    imported: dict[str, list[str]] = {}
    for path in python_files():
        for module in module_level_imports(path.read_text()):
            imported.setdefault(module, []).append(str(path.relative_to(REPO)))
    missing = undeclared(set(imported), declared_distributions(REPO / "setup.cfg"), packages_distributions())
    assert not missing, "\n".join(
        f"{module} (imported at module level by {', '.join(imported[module][:3])}) is installed by no distribution "
        f"in setup.cfg's install_requires or test extra; add {' or '.join(providers) or 'its distribution'} there"
        for module, providers in missing.items())


def test_an_undeclared_module_level_import_is_found_and_optional_ones_are_not():
    source = "import numpy as np\nimport requests.adapters\nfrom yaml import safe_load\nfrom . import sibling\n" \
             "try:\n    import openvino\nexcept ImportError:\n    openvino = None\n" \
             "def run():\n    import tensorboard\n"
    modules = module_level_imports(source)
    assert modules == {"numpy", "requests", "yaml"}
    providers = {"numpy": ["numpy"], "yaml": ["PyYAML"], "requests": ["requests"]}
    assert undeclared(modules, {"numpy", "pyyaml"}, providers) == {"requests": ["requests"]}
    assert undeclared({"volumes", "json", "jsonschema"}, {"numpy"}, {}) == {"jsonschema": []}


def test_setup_cfg_names_are_read_with_their_extras(tmp_path):
    setup_cfg = tmp_path / "setup.cfg"
    setup_cfg.write_text("[options]\ninstall_requires =\n    PyYAML>=6\n    scikit_learn>=1.3\n"
                         "[options.extras_require]\ncpu =\n    openvino>=2025.0\ntest =\n    pytest>=7\n")
    assert declared_distributions(setup_cfg) == {"pyyaml", "scikit-learn", "pytest"}
