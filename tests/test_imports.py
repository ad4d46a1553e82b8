"""The package's modules form no import cycle, counting imports inside functions too: a deferred
import that closes a cycle still couples two modules both ways (runner <-> distributed and
runner <-> bundle did, until the cell code moved to cells.py)."""

import ast
from pathlib import Path

import medtune

SRC = Path(medtune.__file__).parent


def imports_of(source: str, modules: set[str]) -> set[str]:
    """The medtune modules `source` imports anywhere (module level or inside a function). The package
    itself counts as the module `__init__`: `from medtune import __version__` runs medtune/__init__.py,
    whose own imports (`run` imports the runner) are edges too; `from medtune import adapters` is adapters."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("medtune."):
                out.add(node.module.split(".")[1])
            elif node.module == "medtune":
                out |= {a.name if a.name in modules else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("medtune."):
                    out.add(a.name.split(".")[1])
                elif a.name == "medtune":
                    out.add("__init__")
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in SRC.glob("*.py")}
    return {p.stem: imports_of(p.read_text(), modules) for p in SRC.glob("*.py")}


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


def test_imports_of_counts_function_local_and_package_imports():
    src = ("import numpy\nfrom medtune.cells import run_cell\nfrom medtune import adapters\n"
           "def f():\n    from medtune import __version__\n    import medtune.store\n")
    assert imports_of(src, {"cells", "adapters", "store"}) == {"cells", "adapters", "__init__", "store"}


def test_no_import_cycle_among_medtune_modules():
    graph = import_graph()
    assert "runner" in graph and "cells" in graph["distributed"] and "runner" in graph["__init__"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
