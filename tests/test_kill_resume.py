"""`medtune run` killed with SIGKILL at random moments, then restarted: the store must stay a valid
SQLite file holding every finished cell exactly once, complete, and the last run must finish."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import time

from conftest import PYTHON, cli_env, tiny_config

KILLS = 10


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


def wait_for(proc, condition, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while proc.poll() is None and not condition() and time.monotonic() - t0 < timeout:
        time.sleep(0.05)


def test_sigkill_and_resume(tmp_path):
    # 48 cells, enough that ten kills land before the grid can finish
    cfg = tiny_config(tmp_path, strategies=["linear_probe", "bitfit", "full_ft"], seeds=list(range(8)), folds=2,
                      train={"epochs": 2, "batch_size": 8, "views": 1, "patience": 2})
    store = tmp_path / "store.sqlite"
    cmd = [PYTHON, "-m", "medtune", "run", str(cfg), "--quiet"]
    rng = random.Random(7)
    done: set[str] = set()
    kills = 0
    for attempt in range(3 * KILLS):
        runs_before, done_before = count(store, "runs"), count(store, "cells WHERE status='done'")
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt % 2:
            # right after a cell is written: lands in the next cell's training or its write
            wait_for(proc, lambda: count(store, "cells WHERE status='done'") > done_before)
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            # anywhere from data preparation (the run row is written first) to a few cells later
            wait_for(proc, lambda: count(store, "runs") > runs_before)
            time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        now = store_state(store)
        assert done <= now  # nothing finished is ever lost
        done = now
        if kills >= KILLS:
            break
    assert kills >= KILLS
    final = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    done = store_state(store)
    assert len(done) == 48
    with sqlite3.connect(store) as conn:
        assert conn.execute("SELECT count(*) FROM cells WHERE status != 'done'").fetchone()[0] == 0
