"""The import structure: no cycle among the package's modules, each module and each template script imports
alone, and the datalist module (which builds a datalist from a folder) does not load torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, SCRIPTS, TEMPLATES

PACKAGE = REPO / "autoseg2d"


def package_modules() -> dict[str, Path]:
    """Every module of autoseg2d by dotted name (folders without __init__.py, such as the files an exported
    bundle gets, are not part of the package)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if all((folder / "__init__.py").is_file() for folder in path.relative_to(REPO).parents[:-1]
               if folder != Path(".")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_by_place(path: Path) -> tuple[set[str], set[str]]:
    """(the autoseg2d names `path` imports when it is imported, those it imports only later, inside a function or
    class); imports under `if TYPE_CHECKING:` are for type checkers only and count as neither."""
    tree = ast.parse(path.read_text())

    def imported(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            return {alias.name for alias in node.names}
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            return {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        return set()

    at_import: set[str] = set()
    type_only: set[str] = set()

    def walk(body: list[ast.stmt], into: set[str]) -> None:
        for node in body:
            into.update(imported(node))
            if isinstance(node, ast.If):
                walk(node.body, type_only if _is_type_checking(node) else into)
                walk(node.orelse, into)
            elif isinstance(node, ast.Try):
                for block in (node.body, *(handler.body for handler in node.handlers), node.orelse):
                    walk(block, into)
            elif isinstance(node, ast.With):
                walk(node.body, into)

    walk(tree.body, at_import)
    later = {name for node in ast.walk(tree) for name in imported(node)} - at_import - type_only
    return ({name for name in at_import if name.startswith("autoseg2d")},
            {name for name in later if name.startswith("autoseg2d")})


def test_the_package_has_no_import_cycle_and_no_deferred_import_holding_one_open():
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        imports, deferred = imports_by_place(path)
        assert not deferred, f"{path} imports {sorted(deferred)} inside a function: import at the top (a deferred " \
                             "import hides a cycle), or move what it needs to a module lower down"
        graph[name] = {target for target in imports if target in modules and target != name}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(name):] + [name])}")
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


# Imports one module per child process, each forked from this interpreter before it has loaded any module of
# the project (only the third-party libraries, which every child would load anyway: a fresh interpreter per
# module would spend seconds on torch alone). argv: JSON [[module, folder put first on sys.path or ""], ...].
IMPORT_EACH_ALONE = """
import importlib, json, os, signal, sys, traceback
jobs, third_party = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in third_party:
    try:
        importlib.import_module(name)
    except Exception:
        pass
failed = []
for module, folder in jobs:
    child = os.fork()
    if child == 0:
        signal.alarm(300)
        try:
            if folder:
                sys.path.insert(0, folder)
            importlib.import_module(module)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(child, 0)
    if status:
        failed.append(module)
print(json.dumps(failed))
"""


def third_party_modules(paths: list[Path], own: set[str]) -> list[str]:
    names = set()
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return sorted(names - own - set(sys.stdlib_module_names) - {"autoseg2d", "__future__"})


def test_every_module_and_template_script_imports_alone():
    """The package's modules by their dotted names; the template's scripts as a bundle runs them (plain sibling
    names with the scripts folder first on sys.path) and algo.py as MONAI's BundleGen loads it (a package under
    the templates folder)."""
    modules = package_modules()
    scripts = sorted(p for p in SCRIPTS.glob("*.py") if p.stem != "__init__")
    jobs = [[name, str(REPO)] for name in modules]
    jobs += [[f"{SCRIPTS.parent.name}.scripts.algo", str(TEMPLATES)] if p.stem == "algo" else [p.stem, str(SCRIPTS)]
             for p in scripts]
    third_party = third_party_modules([*modules.values(), *scripts], {p.stem for p in scripts})
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(jobs), json.dumps(third_party)],
                            capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [], result.stderr[-6000:]


def test_the_datalist_module_does_not_load_torch_or_monai():
    """Building a datalist from a folder needs neither; they took seconds to load before any work started."""
    result = subprocess.run([sys.executable, "-c", "import sys, autoseg2d.datalist; "
                             "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
