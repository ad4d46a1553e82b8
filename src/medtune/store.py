"""The results store: one SQLite file that every table, test and figure is computed from.

WAL journal, one transaction per finished cell (the cell row, its metrics and its per-sample
predictions land together or not at all), so a run killed at any moment leaves only whole
cells, and rerunning skips them. Reports read this file and never touch a model.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medtune.errors import MedtuneError

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
CREATE TABLE IF NOT EXISTS datasets (
    dataset TEXT PRIMARY KEY, class_names_json TEXT NOT NULL, info_json TEXT NOT NULL);
"""


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


class Store:
    """A thin layer over the SQLite file; every write of a cell is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedtuneError(f"cannot create the folder of the results store {self.path} ({exc.strerror}). "
                               "Give another --store path (or `store:` in the config).") from exc
        if self.path.is_file() and self.path.stat().st_size and not _is_sqlite(self.path):
            # SQLite would take a small non-database file for an empty database and overwrite it
            raise MedtuneError(f"{self.path} is not a medtune results store (not an SQLite file). Give another "
                               "--store path.")
        try:
            self.conn = sqlite3.connect(self.path, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self.conn:
                self.conn.executescript(SCHEMA)
                row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise MedtuneError(f"{self.path} is not a medtune results store ({exc}). Give another --store path.") from exc
        if row is not None and int(row[0]) != SCHEMA_VERSION:
            raise MedtuneError(f"{self.path} was written by a medtune with store schema {row[0]}; this version "
                               f"reads schema {SCHEMA_VERSION}. Use a new --store path, or the medtune that wrote it.")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
                  seconds: float | None = None, error: str | None = None, info: dict | None = None) -> None:
        """Write a finished (or failed) cell with everything that belongs to it, atomically.
        `predictions` = (sample indices, paths, y_true, probabilities)."""
        with self.conn:
            cid = cell["cell_id"]
            self.conn.execute("DELETE FROM metrics WHERE cell_id=?", (cid,))
            self.conn.execute("DELETE FROM predictions WHERE cell_id=?", (cid,))
            self.conn.execute(
                "INSERT OR REPLACE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (cid, cell["run_id"], cell["dataset"], cell["backbone"], cell["strategy"], cell["head"], cell["fold"],
                 cell["n_folds"], cell["seed"], json.dumps(cell["config"], sort_keys=True, default=str), status, error,
                 seconds, time.time(), strict_json(info or {})))
            if metrics:
                self.conn.executemany("INSERT INTO metrics VALUES (?,?,?)",
                                      [(cid, k, None if v is None or np.isnan(v) else float(v)) for k, v in metrics.items()])
            if predictions is not None:
                idx, paths, y, probs = predictions
                self.conn.executemany(
                    "INSERT INTO predictions VALUES (?,?,?,?,?)",
                    [(cid, int(i), p, int(t), json.dumps([round(float(v), 6) for v in pr]))
                     for i, p, t, pr in zip(idx, paths, y, probs)])

    # ------------------------------------------------------------------ reads
    def done_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT cell_id FROM cells WHERE status='done'")}

    def cells(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM cells ORDER BY dataset, backbone, strategy, head, seed, fold", self.conn)

    def metrics(self) -> pd.DataFrame:
        """One row per done cell, one column per metric, with the cell's grid coordinates."""
        long = pd.read_sql_query(
            "SELECT c.cell_id, c.dataset, c.backbone, c.strategy, c.head, c.fold, c.seed, c.seconds, m.name, m.value "
            "FROM cells c JOIN metrics m USING (cell_id) WHERE c.status='done'", self.conn)
        if long.empty:
            return long
        keys = ["cell_id", "dataset", "backbone", "strategy", "head", "fold", "seed"]
        wide = long.pivot(index="cell_id", columns="name", values="value")
        wide.columns.name = None
        cells = long.drop_duplicates("cell_id").set_index("cell_id")[keys[1:] + ["seconds"]]
        return cells.join(wide).reset_index()

    def predictions(self, cell_ids: list[str] | None = None) -> pd.DataFrame:
        q = "SELECT * FROM predictions"
        args: tuple = ()
        if cell_ids is not None:
            q += f" WHERE cell_id IN ({','.join('?' * len(cell_ids))})"
            args = tuple(cell_ids)
        df = pd.read_sql_query(q + " ORDER BY cell_id, sample", self.conn, params=args)
        df["probs"] = df.pop("probs_json").map(json.loads)
        return df

    def class_names(self, dataset: str) -> list[str]:
        row = self.conn.execute("SELECT class_names_json FROM datasets WHERE dataset=?", (dataset,)).fetchone()
        return json.loads(row[0]) if row else []

    def runs(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY started", self.conn)

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def open_store(path: str | Path, must_exist: bool = False) -> Store:
    p = Path(path)
    if must_exist and not p.exists():
        raise MedtuneError(f"no results store at {p}. Run `medtune run CONFIG` first, or pass --store PATH.")
    return Store(p)


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
    return _json_cols(df, {"info_json": "info"})
