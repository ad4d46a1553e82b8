"""The `medtune` command as a user meets it: failed cells, progress under a pipe, init, demo."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from typer.testing import CliRunner

from medtune.cli import app
from medtune.store import Store
from conftest import PYTHON, cli_env, tiny_config

TRACEBACK = ("RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x1280 and 64x2)\n"
             "Traceback (most recent call last):\n  File \"train.py\", line 1, in fit\n")


def failed_store(tmp_path: Path) -> Path:
    """A store with one done and two failed cells, written through the store's own API."""
    path = tmp_path / "failed.sqlite"
    base = {"run_id": "r", "dataset": "busi", "backbone": "resnet50", "head": "softmax", "n_folds": 5,
            "seed": 0, "config": {}}
    with Store(path) as s:
        s.save_cell({**base, "cell_id": "a", "strategy": "full_ft", "fold": 0}, "done", {"balanced_accuracy": 0.8})
        s.save_cell({**base, "cell_id": "b", "strategy": "partial_ft(blocks=2)", "fold": 3}, "failed",
                    error=TRACEBACK)
        s.save_cell({**base, "cell_id": "c", "strategy": "linear_probe", "fold": 1}, "failed",
                    error="out of memory on cuda:0 (batch_size 64, image size 224). Lower train.batch_size.")
    return path


def test_results_failed_lists_each_failed_cell_with_its_labels_and_first_error_line(tmp_path):
    res = CliRunner().invoke(app, ["results", "--store", str(failed_store(tmp_path)), "--failed"],
                             terminal_width=250)
    assert res.exit_code == 0, res.output
    assert "bound method" not in res.output
    assert "2 failed cells" in res.output
    lines = res.output.splitlines()
    row_b = next(line for line in lines if "partial_ft(blocks=2)" in line)
    assert "busi" in row_b and "resnet50" in row_b and "mat1 and mat2 shapes" in row_b and " 3 " in row_b
    assert any("linear_probe" in line and "out of memory on cuda:0" in line for line in lines)
    assert "Traceback" not in res.output  # only the first line in the table
    assert "full_ft" not in res.output  # the done cell is not listed


def test_results_failed_json_gives_the_whole_error(tmp_path):
    res = CliRunner().invoke(app, ["results", "--store", str(failed_store(tmp_path)), "--failed",
                                   "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["cell_id"]: r for r in json.loads(res.output)}
    assert set(rows) == {"b", "c"}
    assert rows["b"]["error"] == TRACEBACK
    assert (rows["b"]["strategy"], rows["b"]["fold"], rows["b"]["dataset"]) == ("partial_ft(blocks=2)", 3, "busi")


def test_results_failed_on_a_store_without_failures_says_so(tmp_path):
    path = tmp_path / "ok.sqlite"
    with Store(path) as s:
        s.save_cell({"cell_id": "a", "run_id": "r", "dataset": "d", "backbone": "b", "strategy": "s", "head": "softmax",
                     "fold": 0, "n_folds": 2, "seed": 0, "config": {}}, "done", {"balanced_accuracy": 0.5})
    res = CliRunner().invoke(app, ["results", "--store", str(path), "--failed"])
    assert res.exit_code == 0 and "no failed cells" in res.output


def test_run_under_a_file_prints_one_line_per_finished_cell_before_the_grid_ends(tmp_path):
    """stdout to a file (not a terminal): each finished cell's line is flushed as it finishes, so the
    first one is in the file while later cells are still to run."""
    cfg = tiny_config(tmp_path, strategies=["linear_probe", {"name": "partial_ft", "blocks": 1}, "full_ft"])
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([PYTHON, "-m", "medtune", "run", str(cfg)], stdout=out,
                                stderr=subprocess.PIPE, env=cli_env(), text=True)
        first, cells_done_then = None, None
        while proc.poll() is None and first is None:
            lines = [line for line in log.read_text().splitlines() if line.startswith("[")]
            if lines:
                first = lines[0]
                with Store(tmp_path / "store.sqlite") as s:  # how far the grid was when the line was there
                    cells_done_then = len(s.done_ids())
            time.sleep(0.05)
        _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert first is not None, "no per-cell line appeared while the grid ran"
    assert first.startswith("[1/6] syn test_efficientnet linear_probe softmax seed 0 fold 0: balanced_accuracy ")
    assert cells_done_then < 6, "the first cell's line only appeared once the grid had ended"
    final = [line for line in log.read_text().splitlines() if line.startswith("[")]
    assert len(final) == 6
    assert all(" balanced_accuracy 0." in line or " balanced_accuracy 1." in line for line in final), final
    assert final[-1].startswith("[6/6]") and final[-1].endswith("ETA done")
    assert all("ETA" in line and " s;" in line for line in final)
