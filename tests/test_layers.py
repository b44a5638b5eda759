"""The packages are layers that only look down, and no modules import each other (lazy imports
included): store ← extract ← classifiers ← endtoend ← service ← cli."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("store", "extract", "classifiers", "endtoend", "service", "cli")


def module_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its body}."""
    files = {f"{p}.{f.stem}": f for p in LAYERS[:-1] for f in (ROOT / p).glob("*.py")}
    files["cli"] = ROOT / "cli.py"
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.update([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
        graph[module] = {name for name in found if name in files and name != module}
    return graph


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_import_runs_back_up() -> None:
    upward = sorted((m, n) for m, names in module_imports().items() for n in names
                    if layer(n) > layer(m))
    assert upward == []


def test_no_modules_import_each_other() -> None:
    graph = module_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False

    cycles = sorted((m, n) for m, names in graph.items() for n in names if reaches(n, m))
    assert cycles == []
