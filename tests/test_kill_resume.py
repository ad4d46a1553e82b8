"""`medtune run` killed with SIGKILL at known points of the grid (observed by polling the store), then
restarted: the store must stay a valid SQLite file holding every finished cell exactly once, complete,
and the last run must finish."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import PYTHON, cli_env, tiny_config



def store_state(path) -> set[str]:
    """Done cell ids after checking integrity and that each done cell is whole."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT cell_id, status, info_json FROM cells").fetchall()
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids))
        done = {r[0] for r in rows if r[1] == "done"}
        n_test = {r[0]: json.loads(r[2])["n_test"] for r in rows if r[1] == "done"}
        for cid in done:
            n_metrics = conn.execute("SELECT count(*) FROM metrics WHERE cell_id=?", (cid,)).fetchone()[0]
            n_preds = conn.execute("SELECT count(*) FROM predictions WHERE cell_id=?", (cid,)).fetchone()[0]
            assert n_metrics > 0 and n_preds == n_test[cid]
        orphans = conn.execute("SELECT count(*) FROM predictions WHERE cell_id NOT IN "
                               "(SELECT cell_id FROM cells WHERE status='done')").fetchone()[0]
        assert orphans == 0
        return done
    finally:
        conn.close()


def count(store, table: str) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(store, timeout=5) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def wait_until(proc, condition, what: str, log, timeout: float = 300) -> None:
    """Poll until `condition()` holds; fail loudly (with the child's output) if the child exits first
    or the condition never comes. Only the failure path depends on time, never the test's outcome."""
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"medtune run exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


# Where each run is killed: ("run", 0) as soon as its run row is written (data preparation or the first
# cell), ("cells", n) right after the store shows n more finished cells than when it started (inside the
# next cell's training, or its write). Each run adds at most 2 cells, so 8 kills leave the 24-cell grid
# unfinished and the final run has real work left.
KILL_POINTS = [("run", 0), ("cells", 1), ("cells", 2), ("run", 0), ("cells", 1), ("run", 0), ("cells", 2), ("cells", 1)]
TOTAL = 24


def test_sigkill_at_known_points_and_resume(tmp_path):
    cfg = tiny_config(tmp_path, strategies=["linear_probe", "bitfit", "full_ft"], seeds=list(range(4)), folds=2,
                      train={"epochs": 2, "batch_size": 8, "views": 1, "patience": 2})
    store = tmp_path / "store.sqlite"
    cmd = [PYTHON, "-m", "medtune", "run", str(cfg), "--quiet"]
    done: set[str] = set()
    for n, (what, more) in enumerate(KILL_POINTS):
        log = tmp_path / f"run{n}.log"
        runs_before, done_before = count(store, "runs"), count(store, "cells WHERE status='done'")
        with log.open("w") as out:  # a file, not a pipe: the child can never block on a full pipe
            proc = subprocess.Popen(cmd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
            if what == "run":
                wait_until(proc, lambda: count(store, "runs") > runs_before, "run row", log)
            else:
                wait_until(proc, lambda: count(store, "cells WHERE status='done'") >= done_before + more,
                           f"{more} more finished cells", log)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        now = store_state(store)
        assert done <= now, f"kill {n} lost finished cells"  # nothing finished is ever lost
        assert len(now) >= done_before + (more if what == "cells" else 0)
        done = now
    assert len(done) < TOTAL  # the kills really left work for the final run
    final = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert store_state(store) >= done and len(store_state(store)) == TOTAL
    with sqlite3.connect(store) as conn:
        assert conn.execute("SELECT count(*) FROM cells WHERE status != 'done'").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == len(KILL_POINTS) + 1
