"""keep_best's parts (deploy/bundle.py): which cells a verdict deploys, and a fold model that cannot
be retrained is left out with a warning naming it."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import medtune.grid.cells as cells
from medtune.config import load_config
from medtune.deploy.bundle import _deployed_cells, _fold_models
from medtune.errors import MedtuneError


def test_the_verdicts_group_deploys_its_first_seed_by_fold_and_a_group_not_in_the_grid_warns():
    sub = pd.DataFrame({"cell_id": ["c3", "c1", "c2", "c4"], "group": ["g", "g", "g", "h"], "seed": [0, 0, 1, 0],
                        "fold": [1, 0, 0, 0], "balanced_accuracy": [0.7, 0.6, 0.5, 0.4]})
    by_id = {c: {"cell_id": c} for c in sub.cell_id}
    verdict = SimpleNamespace(group="g", name="G")
    _, members, fold_cells = _deployed_cells(sub, "ds", {"ds": verdict}, by_id)
    assert [c["cell_id"] for c in fold_cells] == ["c1", "c3"] and list(members.fold) == [0, 1]
    assert _deployed_cells(sub, "other", {"ds": verdict}, by_id) is None
    assert _deployed_cells(sub.assign(balanced_accuracy=float("nan")), "ds", {"ds": verdict}, by_id) is None
    with pytest.warns(UserWarning, match="recommended group .G. has no cell in this run's grid"):
        assert _deployed_cells(sub, "ds", {"ds": SimpleNamespace(group="x", name="G")}, by_id) is None


def test_a_fold_that_cannot_be_retrained_is_left_out_with_a_warning(tmp_path, monkeypatch):
    cfg = load_config(raw={"datasets": [{"name": "syn", "source": "synthetic"}],
                           "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
                           "strategies": ["linear_probe"], "folds": 2})
    cell = cells.expand(cfg, "r", {"syn@32": "fp"}, precision="float32")[0]

    def fail(*a, **k):
        raise MedtuneError("planted")

    monkeypatch.setattr(cells, "run_cell", fail)
    settings = SimpleNamespace(cache=False, amp="off")
    with pytest.warns(UserWarning, match="syn: fold 0 of the deployed group .linear_probe. could not be retrained"):
        models, first, retrained = _fold_models([cell], "syn", {"syn@32": None}, settings, torch.device("cpu"),
                                                SimpleNamespace(path=tmp_path / "s.sqlite"))
    assert models == [] and first is None and retrained is False
