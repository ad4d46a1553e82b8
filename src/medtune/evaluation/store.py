"""The results store: one SQLite file that every table, test and figure is computed from.

WAL journal, one transaction per finished cell (the cell row, its metrics and its per-sample
predictions land together or not at all), so a run killed at any moment leaves only whole
cells, and rerunning skips them. Reports read this file and never touch a model.

Several `medtune run` processes on one machine may share a store: each cell is claimed in the
`leases` table (one BEGIN IMMEDIATE transaction: done? held by a live owner? else take it) before
it runs, its lease's heartbeat is renewed while it runs, and the write of the finished cell
drops the lease in the same transaction. The lease of a process that died is taken over at once
when its pid is gone from this host, else once its heartbeat is older than `lease_seconds()`.
SQLite's locking needs one machine's file system: across machines use Ray (`executor: ray`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from medtune.data.subsets import FULL, size_of

from medtune.errors import MedtuneError, StoreError
from medtune.version import RESULTS_VERSION, UNVERSIONED

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started REAL NOT NULL, config_json TEXT NOT NULL, env_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, dataset TEXT NOT NULL, backbone TEXT NOT NULL,
    strategy TEXT NOT NULL, head TEXT NOT NULL, fold INTEGER NOT NULL, n_folds INTEGER NOT NULL,
    seed INTEGER NOT NULL, config_json TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
    seconds REAL, finished REAL, info_json TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS metrics (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), name TEXT NOT NULL, value REAL,
    PRIMARY KEY (cell_id, name));
CREATE TABLE IF NOT EXISTS predictions (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), sample INTEGER NOT NULL, path TEXT NOT NULL,
    y_true INTEGER NOT NULL, probs_json TEXT NOT NULL, PRIMARY KEY (cell_id, sample));
CREATE TABLE IF NOT EXISTS extra_predictions (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), kind TEXT NOT NULL, dataset TEXT NOT NULL,
    sample INTEGER NOT NULL, y_true INTEGER NOT NULL, probs_json TEXT NOT NULL,
    PRIMARY KEY (cell_id, kind, dataset, sample));
CREATE TABLE IF NOT EXISTS datasets (
    dataset TEXT PRIMARY KEY, class_names_json TEXT NOT NULL, info_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    cell_id TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    heartbeat REAL NOT NULL);
"""

LEASE_ENV = "MEDTUNE_LEASE_SECONDS"  # how long a silent lease of another host's (or a live pid's) process holds
HEARTBEAT_ENV = "MEDTUNE_HEARTBEAT_SECONDS"
# Test-only: caps the store at this many pages more than it holds when opened (SQLite's max_page_count),
# so SQLite answers "database or disk is full" exactly as on a full disk.
MAX_PAGES_ENV = "MEDTUNE_TEST_MAX_PAGES"


def lease_seconds() -> float:
    """A lease older than this (no heartbeat) is taken over: 10 min, ~60 missed heartbeats, so only a
    process that stopped (or a machine that froze that long) loses its cell."""
    return float(os.environ.get(LEASE_ENV, 600))


def heartbeat_seconds() -> float:
    return float(os.environ.get(HEARTBEAT_ENV, 10))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def store_error(path: str | Path, exc: BaseException, doing: str = "") -> StoreError:
    """One paragraph for an SQLite or file-system error on the store: what happened to which file,
    what is kept, and what to do."""
    msg = str(exc).lower()
    where = f" (found while {doing})" if doing else ""
    if "readonly" in msg or "read-only" in msg or isinstance(exc, PermissionError) or \
            getattr(exc, "errno", None) in (errno.EACCES, errno.EROFS, errno.EPERM):
        return StoreError(f"the results store {path} is read-only{where} ({exc}): medtune cannot record cells there. "
                          "Make the file and its folder writable (chmod u+w), or give another --store path.")
    if "full" in msg or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"the disk holding the results store {path} is full{where} ({exc}). Every finished cell "
                          "is kept in the store. Free some space and rerun the same command: it resumes.")
    if "locked" in msg or "busy" in msg:
        return StoreError(f"the results store {path} stayed locked by another program for 30 s{where} ({exc}). "
                          "medtune runs share a store on their own; close the other program (e.g. a database "
                          "browser holding a transaction open) and rerun.")
    if "unable to open" in msg:
        return StoreError(f"cannot open the results store {path}{where} ({exc}). Check that its folder exists and is "
                          "writable, or give another --store path.")
    return StoreError(f"the results store {path} is damaged{where} ({exc}). Keep a copy, then try `sqlite3 {path} "
                      "'.recover' | sqlite3 recovered.sqlite` and pass --store recovered.sqlite, or start a new "
                      "--store (finished cells are rerun there).")


@contextlib.contextmanager
def guarded(path: str | Path, doing: str = "") -> Iterator[None]:
    """Turn an SQLite error on the store into its one-paragraph StoreError."""
    try:
        yield
    except (sqlite3.Error, pd.errors.DatabaseError) as exc:  # pandas wraps SQLite's errors in its own
        raise store_error(path, exc, doing) from exc


DISPLAY = ["dataset", "backbone", "strategy", "head"]  # how a group is named; `variant` tells apart the rest
NOT_GROUPED = ("fold", "seed")  # the only settings a group's cells may differ in
# a training-set size (data/subsets.py) is never a variant's name: each size is read on its own
# (evidence.read_evidence), and the learning curves join a strategy's sizes by its name and variant
SIZE_KEYS = ("train_size", "subset_rule")


def group_key(config: dict) -> str:
    """A cell group's identity: the hash of its whole resolved configuration except fold and seed.
    Two image sizes of one backbone, with and without pretraining, or two training settings are
    two groups, never one row averaged over both."""
    rest = {k: v for k, v in config.items() if k not in NOT_GROUPED}
    return hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the leaves two configurations can differ in."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, list) else v
    return out


def variant_labels(configs: dict[str, dict]) -> dict[str, str]:
    """For groups that share a display name: a short label of the settings in which they differ
    (e.g. 'backbone.image_size=224'); '' for a group whose name is already unique."""
    if len(configs) < 2:
        return {g: "" for g in configs}
    flat = {g: flatten({k: v for k, v in c.items() if k not in (*NOT_GROUPED, *SIZE_KEYS)})
            for g, c in configs.items()}
    keys = sorted(set().union(*flat.values()))
    differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat.values()}) > 1]
    return {g: ", ".join(f"{k}={f.get(k)}" for k in differing) for g, f in flat.items()}


def add_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Add `group` (group_key) and `variant` columns to done cells with a `config_json` column, and
    refuse a group holding the same (seed, fold) twice (a paired test would then pair repeats)."""
    df = df.copy()
    configs = df["config_json"].map(json.loads)
    df["group"] = configs.map(group_key)
    df["variant"] = ""
    first = dict(zip(df["group"], configs))
    for _, sub in df.groupby(DISPLAY, sort=False):
        labels = variant_labels({g: first[g] for g in dict.fromkeys(sub["group"])})
        df.loc[sub.index, "variant"] = sub["group"].map(labels)
    dup = df[df.duplicated(["group", "seed", "fold"], keep=False)]
    if not dup.empty:
        r = dup.iloc[0]
        raise MedtuneError(f"cell group {r.dataset} · {r.backbone} · {r.strategy} · {r['head']} holds seed {r.seed} "
                           f"fold {r.fold} more than once ({len(dup)} cells); its folds cannot be paired. "
                           "Rebuild the store from one config.")
    return df


def strict_json(obj) -> str:
    """JSON without NaN/Infinity (which Python writes but SQLite's json_extract, pandas' readers in
    strict mode and JavaScript reject): non-finite floats become null."""
    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), default=str, allow_nan=False)


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def check_store_path(path: str | Path, write: bool = True) -> None:
    """Refuse a store path that can never be a store, before any work and without creating anything:
    a non-SQLite file, a folder that is a file, and (`write`) a file or folder this user cannot write
    (SQLite also writes its -wal and -shm files beside the store)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MedtuneError(f"cannot create the folder of the results store {path} ({parent} is a file). "
                                   "Give another --store path (or `store:` in the config).")
            if write and not os.access(parent, os.W_OK):
                raise store_error(path, PermissionError(errno.EACCES, f"the folder {parent} is not writable"))
            break
    if write and path.is_file() and not os.access(path, os.W_OK):
        raise store_error(path, PermissionError(errno.EACCES, "the file is not writable"))
    if path.is_dir():
        raise MedtuneError(f"{path} is a folder, not a medtune results store. Give a file path with --store.")
    if path.is_file() and path.stat().st_size and not _is_sqlite(path):
        raise MedtuneError(f"{path} is not a medtune results store (not an SQLite file). Give another --store path.")


class Store:
    """A thin layer over the SQLite file; every write of a cell is one transaction. `read_only`:
    a reader (results, report, track) that writes nothing, so it works on a read-only store."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        check_store_path(self.path, write=not read_only)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedtuneError(f"cannot create the folder of the results store {self.path} ({exc.strerror}). "
                               "Give another --store path (or `store:` in the config).") from exc
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        row = None
        try:
            self.conn = sqlite3.connect(self.path, timeout=30)
            if read_only and not os.access(self.path.parent, os.W_OK) and not Path(f"{self.path}-shm").exists():
                # a WAL store in a read-only folder: SQLite cannot create its -shm file; the file is at rest
                self.conn.close()
                self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True)
            if read_only:
                row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            else:
                tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "meta" not in tables:  # another program's database: never add our tables to it
                    self.conn.close()
                    raise MedtuneError(f"{self.path} is an SQLite database of another program (tables "
                                       f"{', '.join(sorted(tables)[:5])}), not a medtune results store. Give another "
                                       "--store path.")
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                with self.conn:
                    self.conn.executescript(SCHEMA)
                    row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                    if row is None:
                        self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                if os.environ.get(MAX_PAGES_ENV):
                    pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
                    self.conn.execute(f"PRAGMA max_page_count={pages + int(os.environ[MAX_PAGES_ENV])}")
        except sqlite3.OperationalError as exc:
            if read_only and "no such table" in str(exc):
                raise MedtuneError(f"{self.path} is not a medtune results store (it has no medtune tables). "
                                   "Give another --store path.") from exc
            raise store_error(self.path, exc, "opening it") from exc
        except sqlite3.DatabaseError as exc:
            if "malformed" in str(exc):  # a store once, damaged since: say so and how to recover
                raise store_error(self.path, exc, "opening it") from exc
            raise MedtuneError(f"{self.path} is not a medtune results store ({exc}). "
                               "Give another --store path.") from exc
        if row is not None and int(row[0]) != SCHEMA_VERSION:
            raise MedtuneError(f"{self.path} was written by a medtune with store schema {row[0]}; this version "
                               f"reads schema {SCHEMA_VERSION}. Use a new --store path, or the medtune that wrote it.")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ sharing
    def claim(self, cell_id: str, since: float | None = None) -> str:
        """Claim a cell for this process in one BEGIN IMMEDIATE transaction. Returns "claimed";
        "finished" when the store holds it done or pruned (or failed after `since`, i.e. during
        this run: not retried by every process in turn); "busy" while another live owner holds it."""
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.conn.execute("SELECT status, finished FROM cells WHERE cell_id=?", (cell_id,)).fetchone()
            if row is not None and (row[0] != "failed" or (since is not None and (row[1] or 0) >= since)):
                self.conn.rollback()
                return "finished"
            held = self.conn.execute("SELECT owner, host, pid, heartbeat FROM leases WHERE cell_id=?",
                                     (cell_id,)).fetchone()
            if held is not None and held[0] != self.owner:
                dead = held[1] == socket.gethostname() and not pid_alive(int(held[2]))
                if not dead and now - held[3] < lease_seconds():
                    self.conn.rollback()
                    return "busy"
            self.conn.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?)",
                              (cell_id, self.owner, socket.gethostname(), os.getpid(), now))
            self.conn.commit()
            return "claimed"
        except BaseException:
            self.conn.rollback()
            raise

    def release(self, cell_id: str) -> None:
        """Give up a claim (a cell not run after all, or an interrupted one: the next run takes it at once)."""
        with self.conn:
            self.conn.execute("DELETE FROM leases WHERE cell_id=? AND owner=?", (cell_id, self.owner))

    def held_by_others(self) -> int:
        """Leases of other owners that are still alive: cells running elsewhere now."""
        rows = self.conn.execute("SELECT host, pid, heartbeat FROM leases WHERE owner != ?", (self.owner,)).fetchall()
        now, host = time.time(), socket.gethostname()
        return sum(1 for h, pid, beat in rows
                   if now - beat < lease_seconds() and not (h == host and not pid_alive(pid)))

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew this owner's leases every heartbeat_seconds() from a small thread (its own connection)
        while the block runs, so a long cell is never taken for a dead one."""
        stop = threading.Event()

        def beat() -> None:
            try:
                conn = sqlite3.connect(self.path, timeout=30)
            except sqlite3.Error:
                return
            try:
                while not stop.wait(heartbeat_seconds()):
                    try:
                        with conn:
                            conn.execute("UPDATE leases SET heartbeat=? WHERE owner=?", (time.time(), self.owner))
                    except sqlite3.Error:  # a busy or full store: the next beat tries again
                        pass
            finally:
                conn.close()

        thread = threading.Thread(target=beat, name="medtune-lease-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    @contextlib.contextmanager
    def exclusive(self, name: str, poll: float = 0.5) -> Iterator[None]:
        """Hold the lease `name` (not a cell id) while the block runs, waiting for another owner to
        finish with it: e.g. one process at a time writes the deployed models."""
        while True:
            self.conn.execute("BEGIN IMMEDIATE")
            held = self.conn.execute("SELECT owner, host, pid, heartbeat FROM leases WHERE cell_id=?",
                                     (name,)).fetchone()
            free = held is None or held[0] == self.owner or time.time() - held[3] >= lease_seconds() or \
                (held[1] == socket.gethostname() and not pid_alive(int(held[2])))
            if free:
                self.conn.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?)",
                                  (name, self.owner, socket.gethostname(), os.getpid(), time.time()))
                self.conn.commit()
                break
            self.conn.rollback()
            time.sleep(poll)
        try:
            with self.heartbeat():
                yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                self.release(name)

    # ------------------------------------------------------------------ writes
    def add_run(self, run_id: str, config: dict, env: dict) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?)",
                              (run_id, time.time(), json.dumps(config, default=str), json.dumps(env, default=str)))

    def add_dataset(self, name: str, class_names: list[str], info: dict) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO datasets VALUES (?,?,?)",
                              (name, json.dumps(class_names), strict_json(info)))

    def save_cell(self, cell: dict, status: str, metrics: dict[str, float] | None = None,
                  predictions: tuple[np.ndarray, list[str], np.ndarray, np.ndarray] | None = None,
                  seconds: float | None = None, error: str | None = None, info: dict | None = None,
                  extra: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]] | None = None) -> None:
        """Write a finished (or failed) cell with everything that belongs to it, atomically.
        `predictions` = (sample indices, paths, y_true, probabilities) on the outer test fold;
        `extra` = (kind, data set, sample indices, y_true, probabilities) for the other sets a cell
        predicts: kind "inner_val" (its inner validation split, where operating points are chosen)
        or "external" (a `test_datasets` entry, predicted without refitting)."""
        with self.conn:
            cid = cell["cell_id"]
            self.conn.execute("DELETE FROM leases WHERE cell_id=?", (cid,))  # finished: nobody holds it now
            self.conn.execute("DELETE FROM metrics WHERE cell_id=?", (cid,))
            self.conn.execute("DELETE FROM predictions WHERE cell_id=?", (cid,))
            self.conn.execute("DELETE FROM extra_predictions WHERE cell_id=?", (cid,))
            self.conn.execute(
                "INSERT OR REPLACE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (cid, cell["run_id"], cell["dataset"], cell["backbone"], cell["strategy"], cell["head"], cell["fold"],
                 cell["n_folds"], cell["seed"], json.dumps(cell["config"], sort_keys=True, default=str), status, error,
                 seconds, time.time(), strict_json(info or {})))
            if metrics:
                self.conn.executemany("INSERT INTO metrics VALUES (?,?,?)",
                                      [(cid, k, None if v is None or np.isnan(v) else float(v))
                                       for k, v in metrics.items()])
            if predictions is not None:
                idx, paths, y, probs = predictions
                self.conn.executemany(
                    "INSERT INTO predictions VALUES (?,?,?,?,?)",
                    [(cid, int(i), p, int(t), json.dumps([round(float(v), 6) for v in pr]))
                     for i, p, t, pr in zip(idx, paths, y, probs)])
            for kind, dataset, idx, y, probs in extra or []:
                self.conn.executemany(
                    "INSERT INTO extra_predictions VALUES (?,?,?,?,?,?)",
                    [(cid, kind, dataset, int(i), int(t), json.dumps([round(float(v), 6) for v in pr]))
                     for i, t, pr in zip(idx, y, probs)])

    # ------------------------------------------------------------------ reads
    def done_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT cell_id FROM cells WHERE status='done'")}

    def cells(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM cells ORDER BY dataset, backbone, strategy, head, seed, fold",
                                 self.conn)

    def current_ids(self) -> set[str] | None:
        """Done cells of this medtune's results version, or None when the store holds no older ones
        (nothing to filter). A store mixing versions is read as its current cells only, so one group
        never averages numbers computed by two versions of the code."""
        versions = self.results_versions()
        if set(versions) <= {RESULTS_VERSION} or RESULTS_VERSION not in versions:
            return None
        rows = self.conn.execute("SELECT cell_id FROM cells WHERE status='done' AND "
                                 "json_extract(config_json, '$.results_version') = ?", (RESULTS_VERSION,))
        return {r[0] for r in rows}

    def metrics(self) -> pd.DataFrame:
        """One row per done cell, one column per metric, with the cell's grid coordinates."""
        long = pd.read_sql_query(
            "SELECT c.cell_id, c.dataset, c.backbone, c.strategy, c.head, c.fold, c.seed, c.seconds, c.config_json, "
            "m.name, m.value "
            "FROM cells c JOIN metrics m USING (cell_id) WHERE c.status='done'", self.conn)
        current = self.current_ids()
        if current is not None:
            long = long[long.cell_id.isin(current)]
        if long.empty:
            return long
        keys = ["cell_id", "dataset", "backbone", "strategy", "head", "fold", "seed"]
        wide = long.pivot(index="cell_id", columns="name", values="value")
        wide.columns.name = None
        cells = long.drop_duplicates("cell_id").set_index("cell_id")[keys[1:] + ["seconds", "config_json"]]
        out = add_groups(cells.join(wide).reset_index())
        out["train_size"] = sizes_of(out)
        reasons = self.pruned_groups()
        out["pruned"] = [reasons.get(g, "") for g in out["group"]]  # racing: why a group stopped early
        return out.drop(columns=["config_json"])

    def pruned_groups(self) -> dict[str, str]:
        """{group key: reason} of the candidates racing stopped (their remaining cells are stored
        with status `pruned`), of this medtune's results version."""
        rows = self.conn.execute("SELECT config_json, error FROM cells WHERE status='pruned' AND "
                                 "json_extract(config_json, '$.results_version') = ?", (RESULTS_VERSION,))
        return {group_key(json.loads(c)): e or "" for c, e in rows}

    def predictions(self, cell_ids: list[str] | None = None) -> pd.DataFrame:
        q = "SELECT * FROM predictions"
        args: tuple = ()
        if cell_ids is not None:
            q += f" WHERE cell_id IN ({','.join('?' * len(cell_ids))})"
            args = tuple(cell_ids)
        df = pd.read_sql_query(q + " ORDER BY cell_id, sample", self.conn, params=args)
        df["probs"] = df.pop("probs_json").map(json.loads)
        return df

    def extra_predictions(self, kind: str | None = None) -> pd.DataFrame:
        """Inner-validation ("inner_val") or external-set ("external") predictions of done cells."""
        q, args = "SELECT * FROM extra_predictions", ()
        if kind is not None:
            q, args = q + " WHERE kind=?", (kind,)
        df = pd.read_sql_query(q + " ORDER BY cell_id, dataset, sample", self.conn, params=args)
        df["probs"] = df.pop("probs_json").map(json.loads)
        return df

    def class_names(self, dataset: str) -> list[str]:
        row = self.conn.execute("SELECT class_names_json FROM datasets WHERE dataset=?", (dataset,)).fetchone()
        return json.loads(row[0]) if row else []

    def runs(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY started", self.conn)

    def results_versions(self) -> dict[int, int]:
        """{results version: number of done cells}; a cell written before versions existed counts as
        version 1 (its config has no `results_version`)."""
        rows = self.conn.execute(
            "SELECT json_extract(config_json, '$.results_version'), COUNT(*) FROM cells WHERE status='done' GROUP BY 1")
        return {int(v) if v is not None else UNVERSIONED: int(n) for v, n in rows}

    def medtune_versions(self) -> list[str]:
        """The medtune versions of the runs that wrote this store (from each run's environment)."""
        rows = self.conn.execute("SELECT DISTINCT json_extract(env_json, '$.medtune') FROM runs ORDER BY started")
        return [str(v) for (v,) in rows if v is not None]

    def version_warning(self) -> str | None:
        """A sentence for `results`, `report` and a resumed `run` when the store holds cells computed
        by other code than this medtune's (results version != RESULTS_VERSION), else None."""
        versions = self.results_versions()
        old = {v: n for v, n in versions.items() if v != RESULTS_VERSION}
        if not old:
            return None
        what = ", ".join(f"{n} cell(s) of results version {v}" for v, n in sorted(old.items()))
        mixed = " mixed with newer ones" if RESULTS_VERSION in versions else ""
        return (f"{self.path} holds {what}{mixed}; this medtune computes results version {RESULTS_VERSION}, so "
                "those numbers come from older code (docs/report.md lists what changed). A rerun of the config "
                "recomputes them under new cell ids; tables here include only version "
                f"{RESULTS_VERSION} cells when there are any.")

    def unmatched_note(self, todo: list[dict]) -> str | None:
        """A sentence for a resumed `run` when finished cells of this store match cells about to run in
        every label (data set, backbone, strategy, head, seed, fold, training-set size) but not in id: which settings of
        the cell config kept them apart, with their values there and here, so a user who expected a
        resume learns why nothing was reused. None when there are none (results versions are
        `version_warning`'s)."""
        label = ("dataset", "backbone", "strategy", "head", "seed", "fold")
        wanted = {(*(c[k] for k in label), size_of(c["config"])): c for c in todo}
        rows = self.conn.execute(f"SELECT {', '.join(label)}, config_json FROM cells WHERE status='done'").fetchall()
        differ: dict[str, list] = {}
        n = 0
        for *key, config_json in rows:
            there = json.loads(config_json)
            cell = wanted.get((*key, size_of(there)))  # another size of a cell is another cell, not a mismatch
            if cell is None:
                continue
            there, here = flatten(there), flatten(cell["config"])
            keys = [k for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)
                    and not k.startswith("results_version")]
            if not keys:
                continue
            n += 1
            for k in keys:
                differ.setdefault(k, [there.get(k), here.get(k)])
        if not n:
            return None
        what = "; ".join(f"`{k}`: {v[0]!r} there, {v[1]!r} here" for k, v in list(differ.items())[:4])
        more = f" and {len(differ) - 4} more setting(s)" if len(differ) > 4 else ""
        hints = [hint for prefix, hint in UNMATCHED_HINTS.items() if any(k.startswith(prefix) for k in differ)]
        return (f"{self.path} holds {n} finished cell(s) of this grid's data sets, models, strategies and folds that "
                f"differ from this run's in {what}{more}; they are not reused, since their numbers would differ. "
                + " ".join(hints))

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# What to do about a setting that keeps a finished cell from being reused (Store.unmatched_note).
UNMATCHED_HINTS = {
    "precision": "`precision` is what `train.amp: auto` resolved to on the machine that ran the cell; to resume "
                 "float32 cells on a CPU with bf16, run with ONEDNN_MAX_CPU_ISA=AVX512_CORE (oneDNN's own cap, "
                 "under which `auto` resolves to float32).",
    "dataset.options": "A data set's options (its root folder included, written the same way) are part of its cells.",
    "dataset.fingerprint": "The images or labels changed since those cells ran.",
    "numerics": "medtune's searched grids (C, k) changed since those cells ran.",
}


def open_store(path: str | Path, must_exist: bool = False) -> Store:
    """A store to read (`must_exist`: results, report, track; opened without writing) or to write."""
    p = Path(path)
    if must_exist and not p.exists():
        raise MedtuneError(f"no results store at {p}. Run `medtune run CONFIG` first, or pass --store PATH.")
    return Store(p, read_only=must_exist)


def _json_cols(df: pd.DataFrame, cols: dict[str, str]) -> pd.DataFrame:
    for src, dst in cols.items():
        df[dst] = df.pop(src).map(json.loads)
    return df


def read_datasets(store: Store) -> pd.DataFrame:
    """One row per data set: class names and the loader's record (duplicates, counts, grouping)."""
    df = pd.read_sql_query("SELECT * FROM datasets ORDER BY dataset", store.conn)
    return _json_cols(df, {"class_names_json": "class_names", "info_json": "info"})


def read_cells(store: Store) -> pd.DataFrame:
    """Done cells with `info` (history, trainable blocks, strategy label) parsed from JSON."""
    df = store.cells()
    df = df[df.status == "done"].copy()
    current = store.current_ids()
    if current is not None:
        df = df[df.cell_id.isin(current)]
    if not df.empty:
        df = add_groups(df)
        df["train_size"] = sizes_of(df)
    return _json_cols(df, {"info_json": "info"})


def sizes_of(df: pd.DataFrame) -> list:
    """Each row's training-set size (data/subsets.py: FULL, 1.0, where the config names none), from
    its `config_json`: an object column, fractions beside patient counts."""
    return [size_of(json.loads(c)) for c in df["config_json"]]


def at_size(df: pd.DataFrame, size: float | int = FULL) -> pd.DataFrame:
    """The rows of one training-set size (a frame with `train_size`; the full size by default): the
    verdict, tables and tests read the full size, the learning curves every size."""
    if df.empty or "train_size" not in df:
        return df
    keep = [type(s) is type(size) and s == size for s in df["train_size"]]
    return df[keep]
