"""MLflow tracking: the results store's cells as MLflow runs, for teams that already track there.

The SQLite store stays the source of truth; MLflow gets a copy. One MLflow run per finished cell,
tagged `medtune.cell_id`: its resolved configuration as flattened params, its final metrics, its
per-epoch history as metric steps, and (for cells whose model was kept) the model directory as
artifacts; one more run per store, tagged `medtune.kind = grid`, holds the HTML report. Before a
cell's run is created, the experiment is searched for that tag, so tracking a store twice, or
tracking live during `medtune run` and again afterwards, never duplicates a run.

The default tracking URI is `sqlite:///mlflow.db` in the current folder (MLflow 3's own default,
what `mlflow ui` opens), with artifacts under `./mlruns`: offline, no server needed. Uses
`MlflowClient` with an explicit URI, never the process-global active run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError

DEFAULT_URI = "sqlite:///mlflow.db"
CELL_TAG = "medtune.cell_id"
KIND_TAG = "medtune.kind"
MAX_PARAM = 6000  # MLflow's limit on a param value's length
EPOCH_METRICS = ("train_loss", "val_loss", "val_balanced_accuracy", "trainable_blocks")


def require_mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise MedtuneError(f"MLflow tracking needs the `mlflow` package ({exc}); "
                           "pip install 'medtune[tracking]'.") from exc
    return MlflowClient


def mlflow_name(name: str) -> str:
    """A metric/param key MLflow accepts: `npv[malignant]` -> `npv/malignant`, other odd characters -> _."""
    return re.sub(r"[^\w\-. :/]", "_", re.sub(r"\[([^\]]*)\]", r"/\1", name))


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = mlflow_name(f"{prefix}{k}")
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:MAX_PARAM]
    return out


@dataclass
class TrackSummary:
    uri: str
    experiment: str
    created: int = 0
    existing: int = 0


class Tracker:
    """One MLflow experiment for one results store; `cell()` logs a finished cell once."""

    def __init__(self, uri: str | None, experiment: str) -> None:
        client_cls = require_mlflow()
        self.uri = uri or DEFAULT_URI
        self.client = client_cls(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.summary = TrackSummary(self.uri, experiment)

    def find(self, key: str, value: str) -> str | None:
        """The finished run tagged key=value; an unfinished one (a crash mid-logging) is deleted, to be redone."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=10)
        done = [r for r in runs if r.info.status == "FINISHED"]
        for r in runs:
            if r not in done:
                self.client.delete_run(r.info.run_id)
        return done[0].info.run_id if done else None

    def cell(self, row: dict, metrics: dict[str, float], info: dict, model_dir: Path | None = None) -> str:
        """The MLflow run of one done cell (a row of `Store.cells()`), created unless it exists."""
        from mlflow.entities import Metric, Param, RunTag

        existing = self.find(CELL_TAG, row["cell_id"])
        if existing:
            self.summary.existing += 1
            if model_dir is not None:
                self.attach_model(existing, model_dir)
            return existing
        name = (f"{row['dataset']} {row['backbone']} {row['strategy']} {row['head']} "
                f"seed {row['seed']} fold {row['fold']}")
        tags = {CELL_TAG: row["cell_id"], KIND_TAG: "cell", "mlflow.runName": name,
                **{f"medtune.{k}": str(row[k]) for k in ("dataset", "backbone", "strategy", "head", "fold", "seed",
                                                        "n_folds", "run_id")}}
        finished = int(1000 * (row.get("finished") or 0)) or None
        start = int(finished - 1000 * (row.get("seconds") or 0)) if finished else None
        run = self.client.create_run(self.experiment_id, start_time=start, tags=tags)
        rid = run.info.run_id
        params = [Param(k, v) for k, v in flatten(json.loads(row["config_json"])).items()]
        ts = finished or 0
        values = [Metric(mlflow_name(k), float(v), ts, 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        values.append(Metric("seconds", float(row.get("seconds") or 0.0), ts, 0))
        for h in info.get("history", []):
            for k in EPOCH_METRICS:
                v = h.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    values.append(Metric(f"epoch_{k}", float(v), ts, int(h.get("epoch", 0))))
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params at a time
            self.client.log_batch(rid, params=params[i:i + 100])
        for i in range(0, len(values), 1000):
            self.client.log_batch(rid, metrics=values[i:i + 1000])
        self.client.log_batch(rid, tags=[RunTag("medtune.best_epoch", str(info.get("best_epoch")))])
        if model_dir is not None:
            self.attach_model(rid, model_dir)
        self.client.set_terminated(rid, "FINISHED", end_time=finished)
        self.summary.created += 1
        return rid

    def attach_model(self, run_id: str, model_dir: Path) -> None:
        """The deployable model directory (weights, model.json, MODEL_CARD.md) under `model/`."""
        have = {f.path for f in self.client.list_artifacts(run_id, "model")}
        if not have:
            self.client.log_artifacts(run_id, str(model_dir), "model")

    def grid(self, store_path: Path, report_dir: Path | None) -> str:
        """The store's own run: the report as artifacts (logged again when it changed)."""
        key = str(Path(store_path).resolve())
        rid = self.find("medtune.evaluation.store", key)
        if rid is None:
            rid = self.client.create_run(self.experiment_id, tags={KIND_TAG: "grid", "medtune.evaluation.store": key,
                                                                   "mlflow.runName": f"grid {Path(store_path).name}"}
                                         ).info.run_id
            if report_dir is not None and report_dir.is_dir():
                self.client.log_artifacts(rid, str(report_dir), "report")
            self.client.set_terminated(rid, "FINISHED")
        elif report_dir is not None and report_dir.is_dir():  # the report may have been rebuilt since
            self.client.log_artifacts(rid, str(report_dir), "report")
        return rid


def model_dirs(store_path: Path) -> dict[str, Path]:
    """cell id -> what to attach to its run: the whole bundle (card, model.json, every fold) for the
    deployed group's first fold, that fold's own directory for the others."""
    from medtune.deploy.bundle import models_dir

    out: dict[str, Path] = {}
    root = models_dir(store_path)
    for meta_path in root.glob("*/model.json") if root.is_dir() else []:
        try:
            folds = json.loads(meta_path.read_text()).get("folds", [])
        except ValueError:
            continue
        for i, entry in enumerate(folds):
            out[entry["cell_id"]] = meta_path.parent if i == 0 else meta_path.parent / entry["dir"]
    return out


def experiment_name(store) -> str:
    runs = store.runs()
    if runs.empty:
        return f"medtune {store.path.stem}"
    return json.loads(runs.iloc[-1]["config_json"]).get("name") or f"medtune {store.path.stem}"


def track_store(store_path: str | Path, uri: str | None = None, experiment: str | None = None,
                report: bool = True) -> TrackSummary:
    """Every done cell of the store as an MLflow run (existing ones kept), and the report."""
    from medtune.evaluation.store import open_store

    store_path = Path(store_path)
    with open_store(store_path, must_exist=True) as s:
        cells = s.cells()
        cells = cells[cells.status == "done"]
        metrics = s.metrics().set_index("cell_id") if not cells.empty else None
        name = experiment or experiment_name(s)
    tracker = Tracker(uri, name)
    kept = model_dirs(store_path)
    skip = {"cell_id", "dataset", "backbone", "strategy", "head", "fold", "seed", "seconds"}
    for row in cells.to_dict("records"):
        m = {k: v for k, v in metrics.loc[row["cell_id"]].items() if k not in skip} if metrics is not None else {}
        tracker.cell(row, m, json.loads(row.get("info_json") or "{}"), kept.get(row["cell_id"]))
    report_dir = Path(f"{store_path}.report")
    if report and not report_dir.is_dir() and not cells.empty:
        try:
            from medtune.report.html import build_report

            build_report(store_path, report_dir)
        except ImportError:  # the report extra is not installed: track without it
            report_dir = None
    tracker.grid(store_path, report_dir if report else None)
    return tracker.summary


def cell_record(store, cell_id: str) -> tuple[dict, dict[str, float], dict]:
    """(cells row, metrics, info) of one cell, read from the store (what `track_store` reads for all)."""
    import pandas as pd

    row = pd.read_sql_query("SELECT * FROM cells WHERE cell_id=?", store.conn, params=(cell_id,)).iloc[0].to_dict()
    metrics = dict(store.conn.execute("SELECT name, value FROM metrics WHERE cell_id=?", (cell_id,)).fetchall())
    return row, metrics, json.loads(row.get("info_json") or "{}")


def live(uri: str | None, experiment: str, store, on_cell=None):
    """An `on_cell` callback for `runner.run` (`tracking: mlflow`): each done cell goes to MLflow as it
    finishes. A tracking failure (a server gone away) is warned about once and the grid goes on:
    the store has the cell, and `medtune track` copies it later."""
    import warnings

    tracker = Tracker(uri, experiment)
    state = {"warned": False}

    def callback(cell: dict, status: str) -> None:
        if status == "done":
            try:
                tracker.cell(*cell_record(store, cell["cell_id"]))
            except Exception as exc:  # noqa: BLE001 - any client/server error; the store stays complete
                if not state["warned"]:
                    warnings.warn(f"MLflow tracking at {tracker.uri} failed ({type(exc).__name__}: {exc}); the grid "
                                  "goes on; `medtune track --store STORE --mlflow URI` copies the cells later.",
                                  stacklevel=2)
                    state["warned"] = True
        if on_cell:
            on_cell(cell, status)

    return callback
