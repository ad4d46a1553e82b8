"""What `medtune run`, `medtune results` and `medtune report` print and write, read as a user
reads it, on one finished grid with two seeds; and a resumed store after `--set train.epochs=...`.

Expected numbers come from the store's per-cell metrics and predictions with pandas and
scikit-learn, never from the summary code under test.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from conftest import tiny_config
from medtune.cli import app
from medtune.evaluation.store import Store

GROUP = ["dataset", "backbone", "strategy", "head"]
STRATEGIES = ["linear_probe", "full_ft"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """(config, store, what `medtune run` printed) of a finished 2 strategies x 2 seeds x 2 folds grid.
    Shared by the module, so read-only: tests that write copy the store."""
    root = tmp_path_factory.mktemp("two_seeds")
    # 12 patients x 2 images, 3 epochs at lr 0.003: enough that full_ft's two seeds score differently
    cfg = tiny_config(root, seeds=[0, 1], strategies=STRATEGIES,
                      datasets=[{"name": "syn", "source": "synthetic",
                                 "options": {"n_patients": 12, "images_per_patient": 2, "seed": 0}}],
                      train={"epochs": 3, "batch_size": 8, "views": 1, "patience": 3, "lr": 0.003})
    res = CliRunner().invoke(app, ["run", str(cfg), "--quiet"])
    assert res.exit_code == 0, res.output
    return cfg, root / "store.sqlite", res.output


def per_cell(store) -> pd.DataFrame:
    with Store(store) as s:
        return s.metrics()


def expected_summary(store) -> pd.DataFrame:
    """Mean and sample sd (ddof 1) over the cells of each group, straight from the per-cell rows."""
    m = per_cell(store)
    g = m.groupby(GROUP)
    out = g[["balanced_accuracy", "auc", "accuracy"]].agg(["mean", "std", "size"])
    return out


def parse_rich_table(text: str) -> list[list[str]]:
    """Rows of a rich table as printed: a cell too wide for its column folds onto the next lines
    (the first column empty there), so fragments are joined per column."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if rows and not cells[-1] and len(cells) == len(rows[-1]):  # numbers never fold: a label's next line
            rows[-1] = [a + b for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    return rows


def header(text: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith("┃"))
    return [c.strip() for c in line.strip().strip("┃").split("┃")]


def check_table(text: str, store) -> None:
    """The compact table: one data set, backbone and head (named in the title, with the cells per row),
    balanced accuracy as mean ± sd, the other metrics as means."""
    exp = expected_summary(store)
    head = header(text)
    rows = parse_rich_table(text)
    title = next(x for x in text.splitlines() if x.startswith(str(store)))
    assert len(rows) == len(STRATEGIES)
    assert "dataset" not in head and "syn" in title and "4 cells" in title  # 2 folds x 2 seeds
    for row in rows:
        r = dict(zip(head, row))
        key = next(k for k in exp.index if k[2] == r["strategy"])
        e = exp.loc[key]
        assert r["bal acc"] == f"{e[('balanced_accuracy', 'mean')]:.3f}±{e[('balanced_accuracy', 'std')]:.3f}", r
        assert r["AUC"] == f"{e[('auc', 'mean')]:.3f}", r
        assert e[("balanced_accuracy", "size")] == 4


def test_run_prints_the_counts_and_the_results_table(two_seeds):
    _, store, out = two_seeds
    assert any(line.startswith("8 cells: 8 run, 0 already done, 0 failed,") for line in out.splitlines())
    assert f"Store: {store}" in " ".join(out.split())
    check_table(out, store)


def test_results_table_csv_and_json_agree_with_the_store(two_seeds):
    _, store, _ = two_seeds
    table = CliRunner().invoke(app, ["results", "--store", str(store)])
    assert table.exit_code == 0, table.output
    check_table(table.output, store)
    exp = expected_summary(store)
    csv = CliRunner().invoke(app, ["results", "--store", str(store), "--format", "csv"])
    js = CliRunner().invoke(app, ["results", "--store", str(store), "--format", "json"])
    assert csv.exit_code == js.exit_code == 0, csv.output + js.output
    from_csv = pd.read_csv(io.StringIO(csv.output))
    from_json = pd.DataFrame(json.loads(js.output)["results"])
    for got in (from_csv, from_json):
        assert len(got) == len(STRATEGIES) and set(got.strategy) == set(STRATEGIES)
        for _, r in got.iterrows():
            e = exp.loc[tuple(r[GROUP])]
            for metric in ("balanced_accuracy", "auc", "accuracy"):
                assert r[metric] == pytest.approx(e[(metric, "mean")], abs=1e-9), metric
                assert r[f"{metric}_sd"] == pytest.approx(e[(metric, "std")], abs=1e-9), metric
            assert r["n_cells"] == 4


def test_report_pools_every_seed(two_seeds, tmp_path):
    """The pooled out-of-fold balanced accuracy of a group uses both seeds' predictions. Each seed
    predicts every image once with the same classes, so pooling both seeds (or averaging per-seed
    pooled values) equals the balanced accuracy of their concatenated predictions."""
    _, store, _ = two_seeds
    res = CliRunner().invoke(app, ["report", "--store", str(store), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "report" / "results.csv")
    with Store(store) as s:
        preds = s.predictions().merge(s.cells()[["cell_id", "strategy", "seed"]], on="cell_id")
    pred = lambda p: np.array(p.probs.tolist()).argmax(1)  # noqa: E731
    lp = preds[preds.strategy == "full_ft"]
    by_seed = {seed: balanced_accuracy_score(p.y_true, pred(p)) for seed, p in lp.groupby("seed")}
    assert by_seed[0] != pytest.approx(by_seed[1])  # the seeds disagree, so the test can tell
    both = balanced_accuracy_score(lp.y_true, pred(lp))
    got = table.loc[table.strategy == "full_ft", "pooled_balanced_accuracy"].item()
    assert got == pytest.approx(both, abs=1e-9), (got, by_seed)


def resumed_with_more_epochs(two_seeds, tmp_path):
    cfg, store, _ = two_seeds
    copy = tmp_path / "store.sqlite"
    shutil.copy2(store, copy)
    res = CliRunner().invoke(app, ["run", str(cfg), "--quiet", "--store", str(copy), "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    return copy, res.output


def test_a_resumed_store_after_set_epochs_runs_the_new_cells_beside_the_old(two_seeds, tmp_path):
    _, store, _ = two_seeds
    copy, out = resumed_with_more_epochs(two_seeds, tmp_path)
    # nothing reused
    assert any(line.startswith("8 cells: 8 run, 0 already done, 0 failed,") for line in out.splitlines())
    # ... and the run says why, as one house-style warning line (no Python source line under it)
    assert "warning: resuming: " in out and "`train.epochs`: 3 there, 1 here" in out
    assert "UserWarning" not in out and "summary = run_grid" not in out
    old = per_cell(store).set_index("cell_id")
    with Store(copy) as s:
        cells = s.cells()
        preds = s.predictions()
        now = s.metrics().set_index("cell_id")
    assert len(cells) == 16 and cells.cell_id.is_unique and set(cells.status) == {"done"}
    epochs = {r.cell_id: json.loads(r.config_json)["train"]["epochs"] for r in cells.itertuples()}
    assert sorted(epochs.values()) == [1] * 8 + [3] * 8
    assert {c for c, e in epochs.items() if e == 3} == set(old.index)
    # the old cells are untouched, and every cell's predictions are there exactly once
    pd.testing.assert_frame_equal(now.loc[old.index, ["balanced_accuracy", "auc"]], old[["balanced_accuracy", "auc"]])
    counts = preds.groupby("cell_id")["sample"].agg(["size", "nunique"])
    assert (counts["size"] == counts["nunique"]).all() and counts["size"].sum() == 16 * 12


def test_results_of_a_resumed_store_never_mix_the_two_configurations(two_seeds, tmp_path):
    copy, _ = resumed_with_more_epochs(two_seeds, tmp_path)
    js = CliRunner().invoke(app, ["results", "--store", str(copy), "--format", "json"])
    assert js.exit_code == 0, js.output
    rows = json.loads(js.output)["results"]
    assert len(rows) == 2 * len(STRATEGIES)  # one row per strategy and epochs setting
    assert all(r["n_cells"] == 4 for r in rows), [r["n_cells"] for r in rows]


def test_eta_prices_the_remaining_cells_by_their_kind_not_by_the_mean_of_all(monkeypatch):
    """Two cheap probe cells, then two 10x dearer full_ft cells: once one full_ft cell has finished,
    the ETA is that cell's time, 10 s (the plain mean over all finished cells said 4 s)."""
    from medtune.grid import cells as cells_mod

    now = [0.0]
    monkeypatch.setattr(cells_mod.time, "perf_counter", lambda: now[0])
    grid = [{"cell_id": str(i), "dataset": "d", "backbone": "b", "strategy": s, "head": "softmax", "seed": 0,
             "fold": i % 2} for i, s in enumerate(["linear_probe", "linear_probe", "full_ft", "full_ft"])]
    out = io.StringIO()
    with cells_mod.GridProgress(grid, "grid", stream=out) as bar:
        for cell, seconds in zip(grid[:3], [1.0, 1.0, 10.0]):
            now[0] += seconds
            bar.finished(cell, "failed: planted")  # a failed cell's seconds are the time since the last one
        assert bar.eta(now[0]) == pytest.approx(10.0)
        now[0] += 10.0
        bar.finished(grid[3], "failed: planted")
    lines = out.getvalue().splitlines()
    assert lines[3].endswith("ETA 10 s") and lines[4].endswith("ETA done"), lines
