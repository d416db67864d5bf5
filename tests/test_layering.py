"""The package is layered: core < report < stages < pipeline (and sweep) < cli.

Every import in every file under ``safeneuron/`` (including those inside functions
and ``if TYPE_CHECKING`` blocks) is read with ``ast`` and checked: imports run
downward only, ``safeneuron.data.*`` imports no model code, and there is no import
cycle. The checker is plain functions, tested on small synthetic packages too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE_DIR = Path(__file__).parent.parent / "safeneuron"

# Floors above core (0), by the package's top-level name; everything else is core.
FLOORS = {"report": 1, "stages": 2, "pipeline": 3, "sweep": 3, "api": 3, "cli": 4}
FLOOR_NAMES = ["core", "report", "stages", "pipeline", "cli"]
DATA_MAY_IMPORT = ("errors", "artifacts", "data")
MODEL_LIBRARIES = {"torch", "transformers"}


class Import(NamedTuple):
    """One imported module, where it is imported (line, file relative to the root)."""

    target: str
    line: int
    file: str


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Map each module name (a package is named without ``__init__``) to its file."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, here: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules one import statement imports, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: go up from the module's own package
        base = here.split(".") if is_package else here.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    # `from pkg.a import b` is module pkg.a.b where that exists, otherwise pkg.a.
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
            for a in node.names]


def import_graph(package_dir: Path, package: str = "safeneuron") -> dict[str, list[Import]]:
    """Every module of the package -> all modules it imports (external ones too)."""
    files = module_files(package_dir, package)
    root = package_dir.parent
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        rel = path.relative_to(root).as_posix()
        graph[module] = [
            Import(target, node.lineno, rel)
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in dict.fromkeys(_imported(node, module, is_package, set(files)))
        ]
        graph[module].sort(key=lambda imp: imp.line)
    return graph


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def floor_of(module: str, package: str = "safeneuron") -> int:
    """0 core, 1 report, 2 stages, 3 pipeline, 4 cli (a package and its submodules)."""
    parts = module.split(".")
    return FLOORS.get(parts[1], 0) if parts[0] == package and len(parts) > 1 else 0


def violations(graph: dict[str, list[Import]], package: str = "safeneuron") -> list[str]:
    """``file:line module (floor -> floor)`` for every import of a higher floor."""
    found = []
    for module, imports in graph.items():
        mine = floor_of(module, package)
        for imp in imports:
            theirs = floor_of(imp.target, package)
            if _inside(imp.target, package) and theirs > mine:
                found.append(f"{imp.file}:{imp.line} {imp.target} "
                             f"({FLOOR_NAMES[mine]} imports {FLOOR_NAMES[theirs]})")
    return found


def data_violations(graph: dict[str, list[Import]], package: str = "safeneuron") -> list[str]:
    """Imports of ``package.data.*`` other than errors, artifacts, data and non-model libs."""
    allowed = [f"{package}.{name}" for name in DATA_MAY_IMPORT]
    found = []
    for module, imports in graph.items():
        if not _inside(module, f"{package}.data"):
            continue
        for imp in imports:
            ours = _inside(imp.target, package)
            if (ours and not any(_inside(imp.target, a) for a in allowed)) or (
                    not ours and imp.target.split(".")[0] in MODEL_LIBRARIES):
                found.append(f"{imp.file}:{imp.line} {imp.target}")
    return found


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components (size > 1) of the in-package graph (Tarjan)."""
    edges = {m: sorted({i.target for i in imps if i.target in graph and i.target != m})
             for m, imps in graph.items()}
    index, low, stack, components = {}, {}, [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in edges[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:  # node is the root of a component: pop it
            component = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(components)


def describe_cycles(graph: dict[str, list[Import]]) -> list[str]:
    """Each cycle's members, then the imports that join them (``file:line module``)."""
    lines = []
    for members in cycles(graph):
        lines.append(f"cycle of {len(members)} modules: {', '.join(members)}")
        lines += [f"    {i.file}:{i.line} {i.target}" for m in members
                  for i in graph[m] if i.target in members and i.target != m]
    return lines


def fail_listing(what: str, found: list[str]) -> None:
    """Fail with one line per finding (all of them, not just the first)."""
    if found:
        pytest.fail(f"{len(found)} {what}:\n  " + "\n  ".join(found), pytrace=False)


# --- the real package ---------------------------------------------------------------

def test_package_imports_run_downward():
    fail_listing("upward imports (core < report < stages < pipeline < cli)",
                 violations(import_graph(PACKAGE_DIR)))


def test_package_has_no_import_cycle():
    fail_listing("lines about import cycles", describe_cycles(import_graph(PACKAGE_DIR)))


def test_data_imports_no_model_code():
    fail_listing("imports safeneuron.data may not make",
                 data_violations(import_graph(PACKAGE_DIR)))


# --- the checker itself, on synthetic packages ----------------------------------------

def write_package(root: Path, files: dict[str, str]) -> Path:
    """Write ``{relative path: source}`` under ``root/pkg`` and return that dir."""
    for name, source in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return root / "pkg"


CLEAN = {
    "__init__.py": "",
    "errors.py": "class Oops(Exception):\n    pass\n",
    "models.py": "import torch\nfrom pkg import errors\n",
    "data/__init__.py": "from .prompts import load\n",
    "data/prompts.py": "import json\nfrom ..errors import Oops\nfrom pkg.artifacts import x\n",
    "artifacts.py": "x = 1\n",
    "report/__init__.py": "from pkg.models import thing\n",
    "stages/__init__.py": "",
    "stages/train.py": "from pkg import models, report\nfrom . import __name__ as n\n",
    "pipeline.py": "from pkg.stages import train\nfrom .stages.train import go\n",
    "cli.py": "from pkg.pipeline import run\nimport pkg.stages.train\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    graph = import_graph(write_package(tmp_path, CLEAN), "pkg")
    assert ("pkg.stages.train", 1) in [i[:2] for i in graph["pkg.pipeline"]]
    assert ("pkg.errors", 2) in [i[:2] for i in graph["pkg.data.prompts"]]
    assert violations(graph, "pkg") == []
    assert cycles(graph) == []
    assert data_violations(graph, "pkg") == []


def test_checker_reports_an_upward_import_inside_a_function(tmp_path):
    upward = "import os\n\ndef f():\n    from pkg.stages.x import go\n    return go\n"
    package = write_package(tmp_path, {**CLEAN, "stages/x.py": "", "masks.py": upward})
    found = violations(import_graph(package, "pkg"), "pkg")
    assert found == ["pkg/masks.py:4 pkg.stages.x (core imports stages)"]


def test_checker_reports_a_two_module_cycle(tmp_path):
    package = write_package(tmp_path, {**CLEAN, "a.py": "from pkg import b\n",
                                       "b.py": "from typing import TYPE_CHECKING\n"
                                               "if TYPE_CHECKING:\n    from .a import A\n"})
    graph = import_graph(package, "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert "    pkg/b.py:3 pkg.a" in describe_cycles(graph)


def test_checker_reports_model_code_in_data(tmp_path):
    package = write_package(tmp_path, {**CLEAN, "data/a.py": "import torch.nn\n"
                                       "from transformers import AutoModel\nimport pkg.models\n"})
    found = data_violations(import_graph(package, "pkg"), "pkg")
    assert found == ["pkg/data/a.py:1 torch.nn", "pkg/data/a.py:2 transformers",
                     "pkg/data/a.py:3 pkg.models"]
