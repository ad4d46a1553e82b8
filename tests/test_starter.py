"""`medtune init`'s grid: the recipe is chosen on inner splits, and its expected run time counts the
work that recipe does (successive halving of a four-value rate list), priced by the cost model
recorded in benchmarks/results/init_estimate.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from conftest import DEVICE, smoke_raw
from medtune.grid.cells import expand, model_key, prepare, run_cell, settings_from
from medtune.config import load_config
from medtune.grid.select import halving_epochs, halving_rungs
from medtune.starter import COST, LR_CHOICE, Inspection, cell_seconds, plan, render
from medtune.training.loop import Runtime

ROOT = Path(__file__).resolve().parents[1]


def test_halving_epochs_counts_what_a_halved_choice_trains_when_nothing_stops_early(tmp_path):
    """The estimate's unit is the trainer's own schedule: four rates over four epochs train 1 epoch
    each, the best two a second, the best one to the end (4 + 2 + 2 = 8 candidate-epochs, not 16)."""
    assert halving_rungs(4, 4) == [(1, 2), (2, 1)]
    assert halving_epochs(4, 4) == 8 and halving_epochs(3, 6) == 2 * 3 + 4 and halving_epochs(1, 5) == 5
    raw = smoke_raw(tmp_path, epochs=4, patience=10, val_fraction=0.3, views=1)
    raw["backbones"][0]["image_size"] = 32
    raw["strategies"] = [{"name": "full_ft", "lr": {"choose": [1e-4, 3e-4, 1e-3, 3e-3]}}]
    raw["halving"] = True
    raw["datasets"][0]["options"]["n_patients"] = 24
    cfg = load_config(raw=raw)
    data = prepare(cfg.datasets[0], 32, cfg.folds)
    cell = next(c for c in expand(cfg, "run", {"syn@32": data.table.fingerprint()}) if c["fold"] == 0)
    result = run_cell(cell, data, settings_from(cfg), Runtime(torch.device(DEVICE), None, model_key(cell)))
    assert result.info["choice"]["halving"]["epochs_trained"] == halving_epochs(4, 4)


def _inspection(n_per_class: int) -> Inspection:
    counts = {"benign": n_per_class, "malignant": n_per_class}
    return Inspection(Path("scans"), "folder", list(counts), counts, ["f"] * (2 * n_per_class),
                      ["benign"] * n_per_class + ["malignant"] * n_per_class,
                      duplicates={"exact_groups": 0, "exact_extra_images": 0, "exact_label_conflicts": 0,
                                  "exact_examples": [], "near_threshold": None})


def test_init_writes_a_rate_choice_with_halving_and_prices_its_work():
    insp = _inspection(300)
    grid = plan(insp, cuda=False, cpus=2, load_seconds=12.0)
    assert (grid["folds"], grid["epochs"], grid["lr"], grid["halving"]) == (5, 10, LR_CHOICE, True)
    # per strategy: folds x (fixed + per image-epoch x training images x the halved schedule's epochs)
    fixed, per = COST["full_ft"]
    assert abs(grid["seconds"]["full_ft"] - 5 * (fixed + per * 480 * halving_epochs(4, 10))) < 1e-6
    fixed, per = COST["linear_probe"]
    assert abs(grid["seconds"]["linear_probe"] - 5 * (fixed + per * 480)) < 1e-6
    assert abs(grid["total_seconds"] - sum(grid["seconds"].values()) - 12.0) < 1e-9
    # halving is what makes four rates affordable: it is priced below four full schedules
    assert cell_seconds("full_ft", 480, 10, 4, True) < cell_seconds("full_ft", 480, 10, 4, False)
    raw = yaml.safe_load(render(insp, grid, "scans"))
    assert raw["train"]["lr"] == {"choose": LR_CHOICE} and raw["halving"] is True
    cfg = load_config(raw=raw)  # what `medtune run` accepts
    assert cfg.halving and cfg.train.lr.choose == LR_CHOICE


def test_the_cost_model_is_the_one_recorded_with_its_measurements():
    rec = json.loads((ROOT / "benchmarks/results/init_estimate.json").read_text())
    assert {k: tuple(v) for k, v in rec["fit"]["cost"].items()} == COST
