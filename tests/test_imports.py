"""The package's modules form no import cycle, counting imports inside functions too: a deferred
import that closes a cycle still couples two modules both ways (runner <-> distributed and
runner <-> bundle did, until the cell code moved to grid/cells.py)."""

import ast
from pathlib import Path

import medtune

SRC = Path(medtune.__file__).parent


def imports_of(source: str, modules: set[str], package: str = "") -> set[str]:
    """The medtune modules `source` imports anywhere (module level or inside a function), as dotted
    names under medtune (`grid.cells`). A package counts as its `__init__`: `from medtune import
    __version__` runs medtune/__init__.py (the module `__init__`), whose own imports are edges too;
    `from medtune.models import heads` is the module `models.heads`."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "medtune" or node.module.startswith("medtune."):
                base = node.module.removeprefix("medtune").lstrip(".")
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    out.add(sub if sub in modules else (base if base in modules else f"{base}.__init__".lstrip(".")))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "medtune" or a.name.startswith("medtune."):
                    out.add(a.name.removeprefix("medtune").lstrip(".") or "__init__")
    return out


def module_name(path: Path) -> str:
    """src/medtune/grid/cells.py -> grid.cells; a package's __init__ -> grid.__init__ (the root's: __init__)."""
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def import_graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in files} | {module_name(p).removesuffix(".__init__") for p in files
                                                 if p.name == "__init__.py" and p.parent != SRC}
    return {module_name(p): imports_of(p.read_text(), modules) for p in files}


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
    src = ("import numpy\nfrom medtune.grid.cells import run_cell\nfrom medtune.models import adapters\n"
           "def f():\n    from medtune import __version__\n    import medtune.evaluation.store\n")
    modules = {"grid.cells", "models.adapters", "evaluation.store", "models"}
    assert imports_of(src, modules) == {"grid.cells", "models.adapters", "__init__", "evaluation.store"}


def test_no_import_cycle_among_medtune_modules():
    graph = import_graph()
    assert "grid.runner" in graph and "grid.cells" in graph["grid.distributed"] and "grid.runner" in graph["__init__"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


STAGES = ("data", "models", "training", "grid", "evaluation", "report", "deploy")


def stage(module: str) -> str:
    return module.split(".")[0] if module.split(".")[0] in STAGES else "top"


def test_the_package_reads_as_the_pipeline():
    """At most a dozen modules at the top; what is read from a store (evaluation/, report/) never imports the
    training code, and nothing below the entry points (cli, the package) imports the grid (which alone
    knows cells and folds) but the grid itself and deploy (which rebuilds a kept cell's model)."""
    top = [p.name for p in SRC.glob("*.py")]
    assert len(top) <= 12, top
    graph = import_graph()
    into_training = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                           if stage(m) in ("evaluation", "report") and stage(d) == "training")
    assert not into_training, into_training
    allowed = {"grid", "top", "deploy"}
    into_grid = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                       if stage(d) == "grid" and stage(m) not in allowed)
    assert not into_grid, into_grid
