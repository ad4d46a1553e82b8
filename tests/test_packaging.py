"""Every package under src/medtune ships: pyproject.toml lists its packages by hand (the `medtune.configs`
mapping rules out setuptools' find), and a package missing there installs without its files. The editable
install `make test` uses finds them anyway, so only `pip install .` (CI's install-check, ten minutes later)
failed when training/strategies/ became a package; this test fails at once."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_src_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    src = ROOT / "src"
    on_disk = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    missing = sorted(on_disk - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    stale = sorted(p for p in listed - on_disk if p != "medtune.configs")
    assert not stale, f"pyproject.toml lists packages with no __init__.py under src/: {stale}"
