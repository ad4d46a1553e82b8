"""Faults around the grid, through the real CLI: read-only, full and damaged stores, truncated model
files, Ctrl-C, grids whose every cell fails, ambiguous configs. Each must end in one paragraph that
names the file or value and what to do, with no traceback, the right exit status and nothing lost."""

from __future__ import annotations

import os
import signal
from contextlib import closing
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import PYTHON, cli_env, tiny_config
from medtune.cli import app
from medtune.config import load_config
from medtune.errors import ConfigError, MedtuneError
from test_kill_resume import count, store_state, wait_until


def one_paragraph(text: str) -> str:
    """The error paragraph of a failed command: present, whole, no traceback."""
    assert "Traceback" not in text, text
    err = text[text.index("error:"):].strip()
    assert "\n\n" not in err and len(err) < 3000, err
    return " ".join(err.split())


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def done_cells(store: Path) -> set[str]:
    with closing(sqlite3.connect(store)) as conn:  # closed: SQLite then removes its -wal and -shm files
        return {r[0] for r in conn.execute("SELECT cell_id FROM cells WHERE status='done'")}


# --------------------------------------------------------------------------- exit codes
def test_run_exits_1_when_cells_fail_and_report_says_every_cell_failed(tmp_path):
    # full_ft: the linear probe is a convex fit that takes no learning rate
    cfg = tiny_config(tmp_path, strategies=["full_ft"],
                      train={"epochs": 1, "batch_size": 8, "views": 1, "patience": 1, "lr": 1e38, "warmup_epochs": 0})
    result = invoke("run", cfg, "--quiet")
    assert result.exit_code == 1, result.output
    text = one_paragraph(result.output)
    assert "2 of 2 cells failed" in text and "--failed" in text and str(tmp_path / "store.sqlite") in text
    report = invoke("report", "--store", tmp_path / "store.sqlite")
    assert report.exit_code == 2
    text = one_paragraph(report.output)
    assert "every cell" in text and "failed" in text and "results --store" in text and "--failed" in text
    assert "no finished cells yet" not in report.output


def test_ctrl_c_says_what_is_kept_and_how_to_resume(tmp_path):
    cfg = tiny_config(tmp_path, strategies=["linear_probe", "full_ft"], seeds=[0, 1])
    store = tmp_path / "store.sqlite"
    log = tmp_path / "run.log"
    with log.open("w") as out:
        # SIGINT back to its default in the child: a suite started as a background job (`make test &`)
        # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt (the run finished, exit 0)
        proc = subprocess.Popen([PYTHON, "-m", "medtune", "run", str(cfg), "--quiet"], env=cli_env(), stdout=out,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_until(proc, lambda: count(store, "cells WHERE status='done'") >= 1, "a finished cell", log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=900) == 130
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "interrupted:" in text and f"kept in {store}" in text and f"medtune run {cfg}" in text, text
    kept = store_state(store)
    assert f" {len(kept)} of 8 in all" in " ".join(text.split()), text
    with sqlite3.connect(store) as conn:  # the cell in flight was given back: the next run takes it at once
        assert conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0


# --------------------------------------------------------------------------- stores
def read_only(*paths: Path) -> list[list[str]]:
    """Make files/folders read-only for this user, root included: `chattr +i` (immutable: not even root
    writes) where the file system allows it, else plain permissions (enough for any other user).
    Returns the commands that undo it."""
    undo = []
    for p in paths:
        if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode == 0:
            undo.append(["chattr", "-i", str(p)])
        elif os.geteuid() != 0:
            p.chmod(0o555 if p.is_dir() else 0o444)
            undo.append(["chmod", "u+w", str(p)])
        else:
            pytest.skip("root without chattr: no way to make a file read-only for this user here")
    return undo


def test_a_read_only_store_is_one_paragraph_and_still_readable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    cfg = tiny_config(folder)
    assert invoke("run", cfg, "--quiet").exit_code == 0
    store = folder / "store.sqlite"
    before = done_cells(store)
    more = tiny_config(tmp_path, strategies=["linear_probe", "bitfit"], store=str(store))
    assert not list(folder.glob("store.sqlite-*"))  # at rest: the reader must cope without a -shm file
    undo = read_only(store, folder)
    try:
        run = subprocess.run([PYTHON, "-m", "medtune", "run", str(more), "--quiet"], env=cli_env(),
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 2, run.stderr
        text = one_paragraph(run.stderr)
        assert "read-only" in text and str(store) in text and "--store" in text
        shown = subprocess.run([PYTHON, "-m", "medtune", "results", "--store", str(store)], env=cli_env(),
                               capture_output=True, text=True, timeout=900)
        assert shown.returncode == 0 and "linear_probe" in shown.stdout, shown.stderr  # reading needs no write
    finally:
        for cmd in undo:
            subprocess.run(cmd, check=True)
    assert done_cells(store) == before


def test_a_full_disk_keeps_finished_cells_names_the_cell_in_flight_and_leaves_no_orphan(tmp_path, monkeypatch):
    """SQLite's max_page_count makes SQLite answer exactly as on a full disk (SQLITE_FULL, "database or
    disk is full"), at a chosen point: 3 pages more than the store holds fit one cell, not two."""
    cfg = tiny_config(tmp_path, keep_best=True)
    assert invoke("run", cfg, "--quiet").exit_code == 0
    store = tmp_path / "store.sqlite"
    before = done_cells(store)
    more = tiny_config(tmp_path, strategies=["linear_probe", "full_ft"], keep_best=True)
    monkeypatch.setenv("MEDTUNE_TEST_MAX_PAGES", "3")
    result = invoke("run", more, "--quiet")
    assert result.exit_code == 2, result.output
    text = one_paragraph(result.output)
    assert "is full" in text and str(store) in text and "full_ft" in text and "runs again next time" in text
    after = store_state(store)
    assert before <= after and len(after) < 4
    kept = Path(f"{store}.models/kept")
    flight = set(p.name for p in kept.iterdir()) if kept.exists() else set()
    assert flight <= after  # a kept model belongs to a recorded cell: none of the cell in flight
    assert not list(Path(f"{store}.models").rglob("*.tmp"))
    monkeypatch.delenv("MEDTUNE_TEST_MAX_PAGES")
    assert invoke("run", more, "--quiet").exit_code == 0
    assert len(store_state(store)) == 4 and after <= store_state(store)


def damage(store: Path, where: str) -> None:
    """Overwrite pages with noise, as a bad disk or a hand edit would: every page after the schema
    ("all": opening fails), or the last third ("tail": opening works, reading the predictions fails)."""
    data = bytearray(store.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    start = page if where == "all" else (len(data) * 2 // 3) // page * page
    rng = np.random.default_rng(0)
    data[start:] = rng.integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    store.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["all", "tail"])
def test_a_damaged_store_is_named_by_report_results_run_and_track(tiny_run_copy, tmp_path, where):
    store, _ = tiny_run_copy
    damage(store, where)
    report = invoke("report", "--store", store, "--out", tmp_path / "r")
    assert report.exit_code == 2, report.output
    assert str(store) in one_paragraph(report.output)
    assert "damaged" in one_paragraph(report.output) or "not a medtune results store" in one_paragraph(report.output)
    commands = [["results", "--store", store], ["run", tiny_config(tmp_path, store=str(store)), "--quiet"],
                ["track", "--store", store, "--mlflow", f"sqlite:///{tmp_path / 'm.db'}", "--no-report"]]
    for args in commands:
        result = invoke(*args)
        assert isinstance(result.exception, SystemExit) or result.exception is None, (args, result.output)
        assert "Traceback" not in result.output
        if where == "all":  # every read fails: each command says so
            assert result.exit_code == 2 and str(store) in one_paragraph(result.output), (args, result.output)
        elif result.exit_code:
            assert str(store) in one_paragraph(result.output), (args, result.output)


def test_the_model_card_of_a_group_the_store_no_longer_holds_is_an_error_not_an_index_error(tiny_run_copy):
    import json

    from medtune.report.card import model_card

    store, _ = tiny_run_copy
    meta = json.loads(Path(f"{store}.models/best/model.json").read_text())
    ids = [e["cell_id"] for e in meta["folds"]]
    with sqlite3.connect(store) as conn:  # the deployed group's rows deleted by hand, the others kept
        conn.execute(f"DELETE FROM metrics WHERE cell_id IN ({','.join('?' * len(ids))})", ids)
    with pytest.raises(MedtuneError, match="holds no finished cells of the deployed group"):
        model_card(store, meta)


# --------------------------------------------------------------------------- model files
@pytest.mark.parametrize("command", ["export", "predict"])
def test_a_truncated_weights_file_is_named(tiny_run_copy, tmp_path, command):
    store, data = tiny_run_copy
    best = Path(f"{store}.models/best")
    weights = best / "fold1" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["export", best, "--format", "onnx"] if command == "export" else \
        ["predict", best, next(data.rglob("*.png")), "--out", tmp_path / "p"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    text = one_paragraph(result.output)
    assert str(weights) in text and "truncated or damaged" in text


# --------------------------------------------------------------------------- configs
def test_a_duplicated_yaml_key_is_refused_naming_key_and_line(tmp_path):
    cfg = tmp_path / "dup.yaml"
    text = tiny_config(tmp_path).read_text().replace("  epochs: 1\n", "  epochs: 1\n  epochs: 50\n")
    cfg.write_text(text)
    line = text.splitlines().index("  epochs: 50") + 1
    result = invoke("run", cfg, "--quiet")
    assert result.exit_code == 2
    msg = one_paragraph(result.output)
    assert "'epochs' appears twice" in msg and f"line {line}" in msg
    assert not (tmp_path / "store.sqlite").exists()
    cfg.write_text("name: a\nfolds: 2\nname: b\n")  # at the top level too
    with pytest.raises(ConfigError, match=r"'name' appears twice in one mapping \(first on line 1\)"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="'epochs' appears twice"):  # and in a --set value
        load_config(tiny_config(tmp_path), ["train={epochs: 1, epochs: 2}"])


@pytest.mark.parametrize("axis,entries,named", [
    ("strategies", ["linear_probe", {"name": "linear_probe"}], "linear_probe"),
    ("strategies", [{"name": "partial_ft", "blocks": 1}, {"name": "partial_ft", "params": {"blocks": 1}}],
     "partial_ft"),
    ("backbones", [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}] * 2, "test_efficientnet"),
])
def test_an_entry_listed_twice_is_refused_naming_it(tmp_path, axis, entries, named):
    cfg = tiny_config(tmp_path, **{axis: entries})
    result = invoke("run", cfg, "--quiet")
    assert result.exit_code == 2, result.output
    msg = one_paragraph(result.output)
    assert f"{axis} entries 0 and 1 are the same" in msg and named in msg
    assert not (tmp_path / "store.sqlite").exists()  # nothing created by a run that fails before its first cell


def test_a_sweep_that_repeats_another_entry_is_refused(tmp_path):
    cfg = tiny_config(tmp_path,
                      strategies=[{"name": "partial_ft", "blocks": [1, 2]}, {"name": "partial_ft", "blocks": 1}])
    result = invoke("run", cfg, "--quiet")
    assert result.exit_code == 2, result.output
    assert "twice" in one_paragraph(result.output) and "partial_ft" in one_paragraph(result.output)
    assert not (tmp_path / "store.sqlite").exists()


def test_bad_data_creates_no_store(tmp_path):
    cfg = tiny_config(tmp_path, datasets=[{"name": "d", "path": str(tmp_path / "missing")}])
    result = invoke("run", cfg, "--quiet")
    assert result.exit_code == 2 and "missing" in one_paragraph(result.output)
    assert not (tmp_path / "store.sqlite").exists() and not list(tmp_path.glob("store.sqlite*"))


# --------------------------------------------------------------------------- signs of life
def test_version():
    from medtune import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_report_export_and_predict_say_what_they_are_doing(tiny_run_copy, tmp_path):
    store, data = tiny_run_copy
    best = Path(f"{store}.models/best")
    for args, stage in ((["report", "--store", store, "--out", tmp_path / "r"], "report: reading"),
                        (["export", best, "--format", "torchscript"], "export: loading"),
                        (["predict", best, next(data.rglob("*.png")), "--out", tmp_path / "p"], "predict: loading")):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert stage in result.output, result.output
