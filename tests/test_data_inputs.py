"""Bad data inputs a user hands medtune, as issues 37 and 38 found them: each must end in a clear
message naming the file, line or value (an error, or a warning where the data stays usable), seen
alike by `medtune run` (data.py) and `medtune data check` (quality.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config, write_png
from medtune.cli import app
from medtune.data import load_folder, load_manifest, load_npz
from medtune.errors import ConfigError, DataError
from medtune.quality import check_targets
from medtune.splits import check_foldable


def folder(root: Path, n: int = 3) -> Path:
    """Two classes x n distinct random PNGs (24x24)."""
    for c, cls in enumerate(("benign", "malignant")):
        for i in range(n):
            write_png(root / cls / f"{cls}_{i}.png", seed=100 * c + i)
    return root


def check_cli(*args: str):
    result = CliRunner().invoke(app, ["data", "check", *map(str, args)])
    return result, " ".join(result.output.split())


# --------------------------------------------------------------------------- group_pattern (issue 38)
def test_invalid_group_pattern_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"group_pattern '\(\[' is not a valid regular expression \(unterminated "
                                        r"character set at position 1\)"):
        load_folder(folder(tmp_path / "d"), 16, group_pattern="([")


def test_invalid_group_pattern_through_cli_run_is_one_paragraph(tmp_path):
    data = folder(tmp_path / "d")
    cfg = tiny_config(tmp_path, datasets=[{"name": "d", "path": str(data), "group_pattern": "(["}])
    result = CliRunner().invoke(app, ["run", str(cfg), "--quiet"])
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and text.startswith("error:") and "\n\n" not in text
    flat = " ".join(text.split())
    assert "group_pattern '([' is not a valid regular expression" in flat and "unterminated character set" in flat


def test_invalid_group_pattern_through_data_check(tmp_path):
    result, out = check_cli(folder(tmp_path / "d"), "--group-pattern", "(?P<x")
    assert result.exit_code == 2 and "group_pattern '(?P<x' is not a valid regular expression" in out


def test_group_pattern_matching_an_empty_id_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"benign_0\.png: group_pattern '\(z\*\)' reads an empty patient id"):
        load_folder(folder(tmp_path / "d"), 16, group_pattern="(z*)")
