"""Several `medtune run` processes sharing one store (evaluation/store.py's leases): one is SIGKILLed while it
holds a cell, and the grid still ends with every cell computed exactly once, each finished cell's
"[n/N]" line printed once across the logs, the survivors exiting 0, no traceback anywhere."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path


from conftest import PYTHON, cli_env, tiny_config
from medtune.evaluation.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from test_kill_resume import store_state, wait_until  # noqa: E402

LINE = re.compile(r"^\[(\d+)/(\d+)\] (.+?): (balanced_accuracy|FAILED)", re.M)


def holds_a_lease(store: Path, pid: int) -> bool:
    """The process `pid` holds a cell's lease now: it is inside that cell."""
    if not store.exists():
        return False
    try:
        with sqlite3.connect(store, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM leases WHERE pid=? AND cell_id NOT LIKE '\\_\\_%' ESCAPE '\\'",
                                (pid,)).fetchone()[0] > 0
    except sqlite3.OperationalError:  # not created yet
        return False


def run_three_and_kill_one(tmp_path: Path, cfg: Path) -> tuple[list[str], str, list[int]]:
    """Start three runs on one store, SIGKILL the second while it holds a cell; returns the logs, the
    victim's log and the survivors' exit codes."""
    env = {**cli_env(), "MEDTUNE_HEARTBEAT_SECONDS": "1"}
    logs = [tmp_path / f"run{i}.log" for i in range(3)]
    procs = []
    for log in logs:
        with log.open("w") as out:  # a file, not a pipe: a child never blocks on a full pipe
            procs.append(subprocess.Popen([PYTHON, "-m", "medtune", "run", str(cfg)], env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
    store = tmp_path / "store.sqlite"
    # the victim is the first run seen holding a cell: a run that starts late may find every cell taken
    holder: list[int] = []

    def someone_holds() -> bool:
        holder[:] = [i for i, p in enumerate(procs) if holds_a_lease(store, p.pid)][:1]
        return bool(holder)

    wait_until(procs[0], someone_holds, "a claimed cell", logs[0])
    v = holder[0]
    victim = procs[v]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rest = [i for i in range(3) if i != v]
    codes = [procs[i].wait(timeout=600) for i in rest]
    texts = [log.read_text() for log in logs]
    return [texts[i] for i in rest], texts[v], codes


def check_once(tmp_path: Path, survivors: list[str], victim: str, codes: list[int]) -> dict[str, str]:
    store = tmp_path / "store.sqlite"
    for text in survivors + [victim]:
        assert "Traceback" not in text, text[-3000:]
    assert codes == [0, 0], survivors
    with sqlite3.connect(store) as conn:
        rows = dict(conn.execute("SELECT cell_id, status FROM cells").fetchall())
        labels = {cid: f"{d} {b} {s} {h} seed {seed} fold {f}" for cid, d, b, s, h, seed, f in conn.execute(
            "SELECT cell_id, dataset, backbone, strategy, head, seed, fold FROM cells")}
        assert conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0  # nobody holds anything at the end
    store_state(store)  # whole cells, integrity ok
    printed = Counter(m.group(3) for text in survivors + [victim] for m in LINE.finditer(text))
    done = {labels[c] for c, s in rows.items() if s == "done"}
    assert set(printed) == done, (set(printed) ^ done)
    assert all(n == 1 for n in printed.values()), [k for k, n in printed.items() if n > 1]
    return rows


def test_three_runs_share_a_store_and_one_is_killed_mid_cell(tmp_path):
    cfg = tiny_config(tmp_path, strategies=["linear_probe", "bitfit", "full_ft"], folds=2, seeds=[0, 1],
                      keep_best=True, train={"epochs": 1, "batch_size": 8, "views": 1, "patience": 1})
    survivors, victim, codes = run_three_and_kill_one(tmp_path, cfg)
    rows = check_once(tmp_path, survivors, victim, codes)
    assert len(rows) == 12 and set(rows.values()) == {"done"}
    best = Path(f"{tmp_path / 'store.sqlite'}.models/best")
    assert (best / "model.json").is_file()
    assert not list(best.parent.rglob("*.tmp"))  # no half-written model file left behind
    # the survivors each ran cells: the grid really was shared
    assert all(LINE.search(text) for text in survivors)


def test_three_runs_share_a_race(tmp_path):
    """Racing decides each round from the store: every process waits for the round's cells, whoever
    runs them, and takes the same decisions; pruned cells are never run."""
    cfg = tiny_config(tmp_path, strategies=["linear_probe", "full_ft"], folds=2, seeds=[0, 1], racing="on",
                      train={"epochs": 1, "batch_size": 8, "views": 1, "patience": 1})
    survivors, victim, codes = run_three_and_kill_one(tmp_path, cfg)
    rows = check_once(tmp_path, survivors, victim, codes)
    assert len(rows) == 8 and set(rows.values()) <= {"done", "pruned"}
    pruned = [line for line in survivors[0].splitlines() if line.startswith("pruned:")]
    assert pruned == [line for line in survivors[1].splitlines() if line.startswith("pruned:")]


def test_a_claimed_cell_is_busy_for_others_and_free_once_its_owner_is_gone(tmp_path):
    """The lease rules themselves: a live owner's cell is busy, a dead local pid's is taken at once,
    a stale heartbeat's after the lease timeout, and a finished cell is never claimed again."""
    path = tmp_path / "s.sqlite"
    a, b = Store(path), Store(path)
    assert a.claim("c1") == "claimed"
    assert b.claim("c1") == "busy"
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with a.conn:
        a.conn.execute("UPDATE leases SET pid=? WHERE cell_id='c1'", (int(dead.stdout),))
    assert b.claim("c1") == "claimed"  # its owner's pid is gone from this host
    with b.conn:
        b.conn.execute("UPDATE leases SET host='elsewhere', pid=1, heartbeat=0 WHERE cell_id='c1'")
    assert a.claim("c1") == "claimed"  # another host's, silent for longer than the lease timeout
    cell = {"cell_id": "c1", "run_id": "r", "dataset": "d", "backbone": "b", "strategy": "s", "head": "h",
            "fold": 0, "n_folds": 2, "seed": 0, "config": {}}
    a.save_cell(cell, "done", {"m": 1.0})
    assert a.conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    assert b.claim("c1") == "finished"
    a.save_cell({**cell, "cell_id": "c2"}, "failed", error="x")
    assert b.claim("c2", since=0) == "finished"  # failed during this run: not retried by every process in turn
    assert b.claim("c2", since=2e9) == "claimed"  # failed in an earlier run: a rerun tries it again
    a.close()
    b.close()
