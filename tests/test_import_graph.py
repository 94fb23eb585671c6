"""Imports between autocontrast's modules form no circle: function-level imports and imports for type
checkers only (under `if TYPE_CHECKING:`) included, since a circle hidden from the interpreter is still
two modules that each need the other."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "autocontrast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def test_no_import_circles_between_modules():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # packages' __init__ files only re-export; an edge into one is an edge to what it re-exports
    modules = {name for name, path in files.items() if path.name != "__init__.py"}
    graph = {name: _imports(files[name], modules) - {name} for name in modules}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import circle: {' -> '.join(err.args[1])}") from None
