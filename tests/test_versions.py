"""The results version: part of each cell id, stored with each cell, flagged when a store mixes it."""


import numpy as np
import pytest
from planted import plant_cell

import medtune.grid.cells as cells
import medtune.grid.runner as runner
from medtune.config import load_config
from medtune.evaluation.store import Store
from medtune.version import RESULTS_VERSION


def _cells(cfg):
    key = f"syn@{cfg.backbones[0].image_size}"
    return cells.expand(cfg, "r", {key: "fp"})


def test_cell_id_changes_with_the_results_version(monkeypatch):
    cfg = load_config(raw={"datasets": [{"name": "syn", "source": "synthetic"}],
                           "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
                           "strategies": ["linear_probe"], "folds": 2})
    now = _cells(cfg)
    assert all(c["config"]["results_version"] == RESULTS_VERSION for c in now)
    monkeypatch.setattr(cells, "RESULTS_VERSION", RESULTS_VERSION + 1)
    bumped = _cells(cfg)
    assert {c["cell_id"] for c in now}.isdisjoint(c["cell_id"] for c in bumped)


def _probs(n=6):
    y = np.array([0, 1] * (n // 2))
    return y, np.stack([1 - y * 0.8 - 0.1, y * 0.8 + 0.1], 1)


def test_store_written_before_the_version_is_flagged_and_read_as_current_only(tmp_path):
    y, p = _probs()
    with Store(tmp_path / "s.sqlite") as s:
        plant_cell(s, {"results_version": None}, 0, 0, y, p)  # an old cell: no version in its config
        assert s.results_versions() == {1: 1}
        assert "results version 1" in s.version_warning()
        assert len(s.metrics()) == 1  # nothing newer: the old cells are what there is (flagged)
        plant_cell(s, {}, 0, 0, y, p)
        assert s.results_versions() == {1: 1, RESULTS_VERSION: 1}
        assert "mixed with newer" in s.version_warning()
        m = s.metrics()
        assert len(m) == 1  # tables read the current version only
    with Store(tmp_path / "t.sqlite") as s:
        plant_cell(s, {}, 0, 0, y, p)
        assert s.version_warning() is None


def test_resuming_an_old_store_warns(tmp_path):
    y, p = _probs()
    path = tmp_path / "old.sqlite"
    with Store(path) as s:
        plant_cell(s, {"results_version": None}, 0, 0, y, p)
    cfg = load_config(raw={"datasets": [{"name": "syn", "source": "synthetic",
                                         "options": {"n_patients": 8, "images_per_patient": 1, "seed": 0}}],
                           "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
                           "strategies": ["linear_probe"], "folds": 2, "keep_best": False, "store": str(path),
                           "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1}, "device": "cpu"})
    with pytest.warns(UserWarning, match="results version 1"):
        runner.run(cfg, progress=False)


def test_results_and_report_flag_an_old_store(tmp_path):
    from planted import plant_dataset, plant_run
    from typer.testing import CliRunner

    from medtune.cli import app

    y, p = _probs(8)
    path = tmp_path / "old.sqlite"
    with Store(path) as s:
        plant_dataset(s), plant_run(s)
        for fold in range(2):
            plant_cell(s, {"results_version": None}, fold, 0, y, p, samples=np.arange(8 * fold, 8 * fold + 8))
    res = CliRunner().invoke(app, ["results", "--store", str(path), "--wide"])  # the compact default shows ECE only
    assert res.exit_code == 0 and "results version 1" in res.output
    assert "ECE" in res.output and "Brier" in res.output and "PR-AUC" in res.output
    csv = CliRunner().invoke(app, ["results", "--store", str(path), "--format", "csv"])
    header = next(line for line in csv.output.splitlines() if line.startswith("group,"))
    assert {"ece", "brier", "pr_auc"} <= set(header.split(","))
    res = CliRunner().invoke(app, ["report", "--store", str(path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "results version 1" in res.output
    assert "Mixed or old results" in (tmp_path / "r" / "report.html").read_text()


def _flatten_test_cfg(path):
    return load_config(raw={"datasets": [{"name": "syn", "source": "synthetic",
                                          "options": {"n_patients": 8, "images_per_patient": 1, "seed": 0}}],
                            "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
                            "strategies": ["linear_probe"], "folds": 2, "keep_best": False, "store": str(path),
                            "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1}, "device": "cpu"})


def test_a_store_computed_in_another_precision_is_named_when_nothing_resumes(tmp_path, monkeypatch):
    """Cells finished in fp32 on a CPU without bf16 are not reused on a bf16 CPU (`amp: auto` resolves
    to another dtype there); the resumed run says which setting kept them apart and how to match it,
    and with oneDNN capped below bf16 (the documented switch) the same store resumes with nothing to run."""
    import warnings
    from medtune.training import precision

    cfg = _flatten_test_cfg(tmp_path / "s.sqlite")
    monkeypatch.setattr(precision, "cpu_flags", lambda: "fpu avx512f")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    first = runner.run(cfg, progress=False)
    assert first.total == 2 and first.skipped == 0
    monkeypatch.setattr(precision, "cpu_flags", lambda: "fpu avx512f avx512_bf16")
    with pytest.warns(UserWarning, match=r"2 finished cell\(s\).*precision.*float32.*bfloat16.*ONEDNN_MAX_CPU_ISA"):
        again = runner.run(cfg, progress=False)
    assert again.skipped == 0  # not reused: the numbers differ
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        resumed = runner.run(cfg, progress=False)
    assert resumed.skipped == 2 and resumed.total == 2
