"""The grid object (grid/cells.py's Grid) yields the cells the six nested loops it replaced did, in
their order, with the same ids; a Cell reads, compares and pickles like the dict a cell was."""

import json
import pickle

import pytest

from medtune.config import load_config
from medtune.grid.cells import (Cell, Grid, cell_id, data_key, data_key_of, expand, n_folds_of, numerics,
                                precision_of)
from medtune.grid.select import cell_strategies, strategy_label
from medtune.models.backbones import default_image_size
from medtune.training.loop import resolve_device
from medtune.version import RESULTS_VERSION


def old_expand(cfg, run_id, fingerprints, n_folds_by=None, precision="float32"):
    """grid/cells.py's expand before the grid object, verbatim but for the precision default."""
    cells = []
    train = cfg.train.model_dump(exclude={"compile"})
    constants = numerics()
    for ds in cfg.datasets:
        for bb in cfg.backbones:
            size = bb.image_size or default_image_size(bb.name)
            for strategy in cell_strategies(cfg):
                for seed in cfg.seeds:
                    n_folds = (n_folds_by or {}).get(f"{ds.display_name()}@{size}") or n_folds_of(ds, cfg.folds)
                    for fold in range(n_folds):
                        for head in cfg.heads:
                            config = {
                                "dataset": {**ds.model_dump(),
                                            "fingerprint": fingerprints[f"{ds.display_name()}@{size}"]},
                                "backbone": {**bb.model_dump(), "image_size": size},
                                "strategy": strategy,
                                "head": head, "fold": fold, "n_folds": n_folds, "seed": seed, "train": train,
                                "results_version": RESULTS_VERSION, "precision": precision,
                                "numerics": constants,
                            }
                            if cfg.test_datasets:
                                config["test_datasets"] = [{**t.model_dump(), "fingerprint": fingerprints[
                                    f"{t.display_name()}@{size}"]} for t in cfg.test_datasets]
                            if cfg.cv != "kfold":
                                config["cv"] = cfg.cv
                            if cfg.halving:
                                config["halving"] = True
                            cells.append({"cell_id": cell_id(config), "run_id": run_id, "dataset": ds.display_name(),
                                          "backbone": bb.name, "strategy": strategy_label(strategy), "head": head,
                                          "fold": fold, "n_folds": n_folds, "seed": seed, "config": config})
    return cells


class Prints(dict):
    def __missing__(self, key):
        return f"fp-{key}"


def syn(name):
    return {"name": name, "source": "synthetic", "options": {"n_patients": 12, "images_per_patient": 2, "seed": 0}}


GRIDS = {
    "many": ({"datasets": [syn("a"), syn("b")], "test_datasets": [syn("ext")],
              "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32},
                            {"name": "test_efficientnet", "pretrained": False, "image_size": 48}],
              "strategies": ["linear_probe", {"name": "partial_ft", "blocks": [1, 2]}, "full_ft"],
              "heads": ["softmax", "svm"], "seeds": [0, 1], "folds": 3, "racing": "on", "halving": True,
              "train": {"lr": {"choose": [1e-4, 1e-3]}}}, {"b@48": 4}),
    "by_site": ({"datasets": [syn("a"), syn("b")], "cv": "by_site",
                 "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
                 "strategies": ["linear_probe", "auto_depth"], "heads": ["softmax", "knn"], "seeds": [3]},
                {"a@32": 2, "b@32": 3}),
}


@pytest.mark.parametrize("name", GRIDS)
def test_the_grid_is_the_old_six_loops(name):
    raw, n_folds_by = GRIDS[name]
    cfg = load_config(raw=raw)
    for by in (None, n_folds_by):
        old = old_expand(cfg, "r", Prints(), by)
        grid = Grid(cfg, "r", Prints(), by, "float32")
        new = list(grid)
        assert len(grid) == len(new) == len(old) > 0
        assert [c["cell_id"] for c in new] == [c["cell_id"] for c in old]
        assert new == old  # Mapping equality: every key and value, configs included
        assert [list(c) for c in new] == [list(c) for c in old]  # same keys in the same order
        assert [json.dumps(c["config"]) for c in new] == [json.dumps(c["config"]) for c in old]
    assert expand(cfg, "r", Prints(), n_folds_by, "float32") == list(Grid(cfg, "r", Prints(), n_folds_by, "float32"))


def test_the_default_precision_is_the_configs_device():
    cfg = load_config(raw=GRIDS["many"][0])
    here = precision_of(cfg, resolve_device(cfg.device))
    assert ([c["cell_id"] for c in Grid(cfg, "r", Prints())]
            == [c["cell_id"] for c in Grid(cfg, "r", Prints(), None, here)])


def test_a_cell_reads_pickles_and_serialises_like_its_dict():
    cell = expand(load_config(raw=GRIDS["many"][0]), "r", Prints(), None, "float32")[0]
    assert isinstance(cell, Cell)
    plain = dict(cell)
    assert list(plain) == ["cell_id", "run_id", "dataset", "backbone", "strategy", "head", "fold", "n_folds", "seed",
                           "config"]
    assert cell == plain and {**cell, "cell_id": "x"}["cell_id"] == "x" and cell.get("nope") is None
    assert cell["config"] is cell.config and "fold" in cell and "nope" not in cell and len(cell) == 10
    with pytest.raises(KeyError):
        cell["nope"]
    with pytest.raises(AttributeError):
        cell.fold = 1  # frozen
    assert pickle.loads(pickle.dumps(cell)) == cell
    assert json.loads(json.dumps(plain))["cell_id"] == cell.cell_id
    assert data_key_of(cell) == cell.data_key == data_key("a", 32) == "a@32"
