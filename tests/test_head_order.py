"""Training is a function of the cell without its head: the heads listed, their order and the
executor's sharing never change a cell's numbers (issue 37)."""

from __future__ import annotations

import json

import numpy as np
import yaml

import medtune
from conftest import tiny_config
from medtune.evaluation.store import Store


def _rows(tmp_path, name: str, heads: list[str], strategies=("linear_probe",)) -> dict:
    d = tmp_path / name
    d.mkdir()
    raw = yaml.safe_load(tiny_config(d, heads=heads, strategies=list(strategies)).read_text())
    raw["train"]["amp"] = "off"
    summary = medtune.run(raw, progress=False)
    assert summary.failed == 0, summary
    with Store(raw["store"]) as s:
        cells = s.cells()
        out = {}
        for _, c in cells.iterrows():
            p = s.predictions([c["cell_id"]]).sort_values("sample")
            out[(c["strategy"], c["head"], int(c["fold"]))] = (c["cell_id"], np.stack(p["probs"].to_numpy()),
                                                               json.loads(c["info_json"]))
    return out


def test_head_order_and_list_do_not_change_any_cell(tmp_path):
    """[svm, softmax] trained the softmax cell with 0 epochs (its probe never fitted) when the SVM
    came first; both orders, and each head alone, must give identical predictions."""
    a = _rows(tmp_path, "a", ["softmax", "svm"])
    b = _rows(tmp_path, "b", ["svm", "softmax"])
    alone = {**_rows(tmp_path, "c", ["softmax"]), **_rows(tmp_path, "d", ["svm"])}
    assert a.keys() == b.keys() == alone.keys() and len(a) == 4
    for key in a:
        assert a[key][0] == b[key][0] == alone[key][0]
        np.testing.assert_array_equal(a[key][1], b[key][1])
        np.testing.assert_array_equal(a[key][1], alone[key][1])


def test_cells_record_the_grids_searched_and_the_budget(tmp_path):
    """The keys a diagnosis reads: each head's pick and grid, a bound flag only where one was hit,
    and whether the best epoch was the last of the scheduled ones."""
    rows = _rows(tmp_path, "a", ["softmax", "svm", "knn"], strategies=("linear_probe", "full_ft"))
    assert {strategy for strategy, _, _ in rows} == {"linear_probe", "full_ft"}
    for (strategy, head, fold), (_, _, info) in rows.items():
        key = {"softmax": "probe_C", "svm": "svm_C", "knn": "knn_k"}[head]
        if strategy == "linear_probe" or head != "softmax":  # full_ft's softmax head chooses nothing
            assert info[key] in info["grids"][key]
        assert set(info.get("grid_edges", {})) <= {key, "probe_C"}
        if strategy == "linear_probe":  # every head's network had its probe fitted
            assert info["probe_C"] in info["grids"]["probe_C"]
        assert info["epochs_scheduled"] == 1 and info["epochs_run"] == len(info["history"])
        convex = any("probe_C" in h for h in info["history"])  # the probe: one fit, no epochs to run out
        assert info["best_epoch_is_last"] == (None if convex else info["best_epoch"] == info["epochs_run"] - 1)
