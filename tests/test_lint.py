"""The code passes the linter as configured in pyproject.toml ([tool.ruff]): unused imports and
variables, undefined names and pycodestyle errors fail the suite, not a later review."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it is in the `dev` extra: pip install -e '.[dev]')")
    out = subprocess.run([ruff, "check", "src", "tests", "benchmarks", "scripts"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_function_is_over_80_lines():
    """Issue #39: a long function is several steps that want names; the report is a table of contents of
    section functions, the training loop and the grid a few named steps each."""
    import ast

    long = [(str(p.relative_to(ROOT)), n.name, n.end_lineno - n.lineno + 1)
            for p in sorted((ROOT / "src" / "medtune").rglob("*.py"))
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            if n.end_lineno - n.lineno + 1 > 80]
    assert not long, long
