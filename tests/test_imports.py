"""The package's modules form no import cycle, counting imports inside functions too: a deferred
import that closes a cycle still couples two modules both ways (runner <-> distributed and
runner <-> bundle did, until the cell code moved to cells.py)."""

import ast
from pathlib import Path

import medtune

SRC = Path(medtune.__file__).parent


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medtune."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("medtune.")}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_medtune_modules():
    graph = {p.stem: imports_of(p) for p in SRC.glob("*.py")}
    assert "runner" in graph and "cells" in graph["distributed"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
