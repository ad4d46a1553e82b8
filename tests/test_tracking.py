"""MLflow tracking with the real client: what `medtune track` and `tracking: mlflow` write, read back
with `mlflow.search_runs`, against the results store."""

from __future__ import annotations

import json
import shutil

import pytest

mlflow = pytest.importorskip("mlflow")

from typer.testing import CliRunner  # noqa: E402

from medtune.cli import app  # noqa: E402
from medtune.config import load_config  # noqa: E402
from medtune.grid.runner import run  # noqa: E402
from medtune.evaluation.store import Store  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def copy_store(tiny_run, tmp_path):
    store, _ = tiny_run
    dst = tmp_path / store.name
    shutil.copy(store, dst)
    shutil.copytree(f"{store}.models", f"{dst}.models")
    return dst


def search(uri: str, experiment: str, kind: str):
    mlflow.set_tracking_uri(uri)  # the test reads through mlflow's own module-level API
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`medtune.kind` = '{kind}'")


def cell_runs(uri: str, experiment: str):
    return search(uri, experiment, "cell")


def test_track_writes_one_run_per_cell_with_the_stores_metrics_and_twice_adds_nothing(tiny_run, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts go to ./mlruns
    store = copy_store(tiny_run, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["track", "--store", str(store), "--mlflow", uri, "--no-report"])
    assert res.exit_code == 0, res.output
    runs = cell_runs(uri, "tiny")
    with Store(store) as s:
        metrics = s.metrics().set_index("cell_id")
        cells = s.cells().set_index("cell_id")
    assert len(runs) == len(metrics) == 4
    client = mlflow.tracking.MlflowClient(uri)
    for _, r in runs.iterrows():
        cid = r["tags.medtune.cell_id"]
        for name in ("balanced_accuracy", "auc", "sensitivity"):
            assert r[f"metrics.{name}"] == pytest.approx(metrics.loc[cid, name])
        config = json.loads(cells.loc[cid, "config_json"])
        assert r["params.train.lr"] == json.dumps(config["train"]["lr"])
        assert r["params.strategy.name"] == config["strategy"]["name"]
        assert r["status"] == "FINISHED"
        history = json.loads(cells.loc[cid, "info_json"])["history"]
        steps = client.get_metric_history(r["run_id"], "epoch_train_loss")
        # a converged probe (linear_probe) has no SGD loss: its epoch's train_loss is None, not logged
        assert history and [(m.step, m.value) for m in steps] == [(h["epoch"], pytest.approx(h["train_loss"]))
                                                                  for h in history if h["train_loss"] is not None]
    # the deployable model is an artifact of the cell it came from
    best = json.loads((tmp_path / f"{store.name}.models" / "best" / "model.json").read_text())["cell_id"]
    best_run = runs[runs["tags.medtune.cell_id"] == best].run_id.iloc[0]
    assert "model/model.json" in {f.path for f in client.list_artifacts(best_run, "model")}
    again = CliRunner().invoke(app, ["track", "--store", str(store), "--mlflow", uri, "--no-report"])
    assert again.exit_code == 0 and "0 runs created, 4 already there" in again.output
    assert len(cell_runs(uri, "tiny")) == 4


def test_tracking_mlflow_in_the_config_logs_cells_as_they_finish(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'live.db'}"
    seen = []

    def count(cell, status):  # called after the tracker's own callback: the cell's run exists by now
        seen.append(len(cell_runs(uri, "tiny")))

    cfg = load_config(tiny_config(tmp_path, tracking="mlflow", tracking_uri=uri))
    summary = run(cfg, progress=False, on_cell=count)
    assert summary.done == 2 and seen == [1, 2]
    from medtune.report.tracking import track_store

    assert track_store(tmp_path / "store.sqlite", uri, "tiny", report=False).created == 0
    assert len(cell_runs(uri, "tiny")) == 2


def test_track_attaches_the_report_to_one_grid_run(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    store = copy_store(tiny_run, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):
        assert CliRunner().invoke(app, ["track", "--store", str(store), "--mlflow", uri]).exit_code == 0
    grid = search(uri, "tiny", "grid")
    assert len(grid) == 1
    names = {f.path for f in mlflow.tracking.MlflowClient(uri).list_artifacts(grid.run_id.iloc[0], "report")}
    assert "report/report.html" in names
