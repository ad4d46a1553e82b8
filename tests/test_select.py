"""Choices made on inner splits: `{choose: [...]}` picks per outer fold without the test fold, a list
stays a grid axis, auto_depth is a selector whose pick is the best of its inner scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medtune
from conftest import DEVICE, smoke_raw
from medtune.config import load_config
from medtune.data.loaders import ImageTable
from medtune.errors import ConfigError
from medtune.grid.cells import PreparedData, expand, model_key, run_cell, settings_from
from medtune.grid.select import candidates, fit_candidate, inner_score
from medtune.data.splits import kfold
from medtune.evaluation.store import Store
from medtune.training.strategies import REGISTRY
from medtune.training.loop import Runtime


def _cells(raw: dict) -> list[dict]:
    cfg = load_config(raw=raw)
    size = cfg.backbones[0].image_size
    return expand(cfg, "run", {f"{cfg.datasets[0].display_name()}@{size}": "fp"})


def test_a_list_is_a_grid_axis_and_a_choice_is_one_cell(tmp_path):
    raw = smoke_raw(tmp_path)
    raw["strategies"] = [{"name": "partial_ft", "blocks": [1, 2, 3]},
                         {"name": "l2_sp", "alpha": {"choose": [0.001, 0.1]}, "lr": {"choose": [1e-4, 1e-3]}}]
    cells = [c for c in _cells(raw) if c["fold"] == 0]
    assert [c["strategy"] for c in cells] == ["partial_ft(blocks=1)", "partial_ft(blocks=2)", "partial_ft(blocks=3)",
                                              "l2_sp(alpha=choose(0.001, 0.1), lr=choose(0.0001, 0.001))"]
    spec = cells[-1]["config"]["strategy"]
    assert spec["alpha"] == {"choose": [0.001, 0.1]} and spec["lr"] == {"choose": [0.0001, 0.001]}
    # four candidates inside that one cell: 2 alphas x 2 learning rates
    cands = candidates(spec, cells[-1]["config"]["train"]["lr"])
    assert sorted((c.strategy.alpha, c.lr) for c in cands) == [(0.001, 1e-4), (0.001, 1e-3), (0.1, 1e-4), (0.1, 1e-3)]


def test_plain_strategies_keep_their_cell_config():
    """A strategy without choices is stored as before choices existed: {name, **params()}."""
    from medtune.grid.select import cell_strategy
    from medtune.training.strategies import create_strategy

    s = create_strategy("partial_ft", blocks=2)
    assert cell_strategy("partial_ft", {"blocks": 2}) == {"name": s.name, **s.params()}


@pytest.mark.parametrize("entry, words", [
    ({"name": "full_ft", "lr": {"chose": [1e-4]}}, "choose"),
    ({"name": "l2_sp", "alpha": {"pick": [0.1]}}, "choose"),
    ({"name": "l2_sp", "alpha": {"choose": []}}, "non-empty"),
    ({"name": "l2_sp", "alpha": {"choose": [0.1, -1]}}, "alpha"),
    ({"name": "full_ft", "lr": {"choose": [0, 1e-3]}}, "> 0"),
    ({"name": "auto_depth", "candidates": ["full_ft", "no_such_thing"]}, "no_such_thing"),
    ({"name": "auto_depth", "inner_folds": 1}, "inner_folds"),
])
def test_bad_choices_are_clear_errors(tmp_path, entry, words):
    raw = smoke_raw(tmp_path)
    raw["strategies"] = [entry]
    with pytest.raises(ConfigError, match=words):
        load_config(raw=raw)


def _planted_table(n_patients: int = 24, size: int = 32) -> tuple[ImageTable, np.ndarray]:
    """Two classes told apart by brightness, except in fold 0's test fold, where the cue is reversed:
    a learning rate that learns the cue scores well on the training fold and badly on that test fold."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), n_patients)  # one image per patient
    groups = np.array([f"P{i:03d}" for i in range(len(labels))], dtype=object)
    test0 = kfold(labels, groups, 2, 0)[0][1]
    bright = labels.astype(bool).copy()
    bright[test0] = ~bright[test0]
    level = np.where(bright, 190, 60)[:, None, None, None]
    images = np.clip(level + rng.normal(0, 25, (len(labels), 1, size, size)), 0, 255).astype(np.uint8)
    images = torch.from_numpy(np.repeat(images, 3, axis=1))
    table = ImageTable(images, labels, ["dark", "bright"], [f"mem://{g}" for g in groups],
                       groups=groups, name="planted")
    return table, test0


def test_a_choice_is_made_without_the_test_fold(tmp_path):
    table, test0 = _planted_table()
    raw = smoke_raw(tmp_path, epochs=4, val_fraction=0.3, views=1)
    raw["backbones"][0]["image_size"] = 32
    raw["strategies"] = [{"name": "full_ft", "lr": {"choose": [1e-9, 0.03]}}]
    cfg = load_config(raw=raw)
    cell = next(c for c in expand(cfg, "run", {"syn@32": table.fingerprint()}) if c["fold"] == 0)
    data = PreparedData(table, table.groups, {"policy": "group"}, None)
    settings = settings_from(cfg)
    rt = Runtime(torch.device(DEVICE), None, model_key(cell))
    result = run_cell(cell, data, settings, rt)
    choice = result.info["choice"]
    assert set(choice["scores"]) == {"full_ft lr=1e-09", "full_ft lr=0.03"} == set(choice["histories"])
    for rows in choice["histories"].values():  # each candidate's epochs, early stopping included
        assert [h["epoch"] for h in rows] == list(range(len(rows))) and 1 <= len(rows) <= 4
        assert all(np.isfinite(h["val_loss"]) and "val_balanced_accuracy" in h for h in rows)
    assert choice["picked"] == max(choice["scores"], key=lambda k: (choice["scores"][k], -choice["losses"][k]))
    # What each candidate would score on the test fold: a choice made there would pick the other one.
    train_idx = data.splits(2, 0)[0][0]
    assert sorted(data.splits(2, 0)[0][1]) == sorted(test0)
    fit_idx, val_idx = data.fit_val(2, 0, 0, settings.val_fraction)
    on_test = {}
    for cand in candidates(cell["config"]["strategy"], cell["config"]["train"]["lr"]):
        res = fit_candidate(cand, cell["config"], table, fit_idx, val_idx, settings, rt)
        on_test[cand.key()] = inner_score(res, table, test0, settings, rt)
    # the same rule (balanced accuracy, then the lower loss) applied to the test fold
    leaked_pick = max(on_test, key=lambda k: (on_test[k][0], -on_test[k][1]))
    assert leaked_pick == "full_ft lr=1e-09" != choice["picked"], (on_test, choice)
    assert choice["picked"] == "full_ft lr=0.03" and choice["chosen"] == {"lr": 0.03}
    assert not set(fit_idx) & set(test0) and not set(val_idx) & set(test0) and set(train_idx) >= set(val_idx)
    # the cell's score is the test fold's, which the plant makes poor for the chosen (cue-learning) rate
    assert result.metrics["balanced_accuracy"] == pytest.approx(on_test[choice["picked"]][0], abs=1e-9)
    assert result.metrics["balanced_accuracy"] < 0.5


def test_strategy_strength_is_chosen_and_recorded(tmp_path):
    raw = smoke_raw(tmp_path, val_fraction=0.3)
    raw["datasets"][0]["options"]["n_patients"] = 24
    raw["strategies"] = [{"name": "l2_sp", "alpha": {"choose": [0.0, 1.0]}}]
    summary = medtune.run(raw, progress=False)
    assert summary.done == 2 and summary.failed == 0
    with Store(raw["store"]) as s:
        cells = s.cells()
    assert set(cells.strategy) == {"l2_sp(alpha=choose(0, 1))"}
    for info in map(json.loads, cells.info_json):
        scores = info["choice"]["scores"]
        assert set(scores) == {"l2_sp(alpha=0.0)", "l2_sp(alpha=1.0)"}
        assert info["choice"]["picked"] == max(scores, key=lambda k: (scores[k], -info["choice"]["losses"][k]))
        assert info["strategy_label"] == info["choice"]["picked"]


def test_auto_depth_is_a_selector_not_a_strategy(tmp_path):
    assert "auto_depth" not in REGISTRY
    raw = smoke_raw(tmp_path)
    raw["strategies"] = [{"name": "auto_depth", "inner_folds": 2,
                          "candidates": ["linear_probe", {"name": "full_ft", "lr": {"choose": [1e-4, 1e-2]}}]}]
    summary = medtune.run(raw, progress=False)
    assert summary.done == 2 and summary.failed == 0
    with Store(raw["store"]) as s:
        cells = s.cells()
    for info in map(json.loads, cells.info_json):
        scores = info["auto_depth"]["scores"]
        assert set(scores) == {"linear_probe", "full_ft lr=0.0001", "full_ft lr=0.01"}
        best = max(scores.values())
        ties = [k for k, v in scores.items() if v == best]
        picked = info["auto_depth"]["picked"]
        assert picked in ties and (len(ties) == 1 or info["auto_depth"]["losses"][picked] ==
                                   min(info["auto_depth"]["losses"][k] for k in ties))
        assert info["strategy_label"] == picked.split(" lr=")[0]


@pytest.mark.parametrize("bn, expected", [("keep", 1), ("update", 1), ("update_all", 3)])
def test_an_lr_choice_for_the_convex_probe_trains_one_candidate(bn, expected):
    """linear_probe is fitted by logistic regression (no learning rate) unless BatchNorm follows the
    batch, when SGD trains it: three lr candidates would be three identical fits in the first case."""
    from medtune.grid.select import without_unused_lr
    from medtune.training.loop import TrainSettings

    settings = TrainSettings(epochs=3, bn_statistics=bn)
    spec = {"name": "linear_probe", "lr": {"choose": [1e-4, 1e-3, 1e-2]}}
    kept = without_unused_lr(candidates(spec, 1e-3), settings)
    assert len(kept) == expected
    assert all(("lr" in c.chosen) == (expected > 1) for c in kept)
    # a strategy that trains the backbone keeps every rate
    full = without_unused_lr(candidates({"name": "full_ft", "lr": {"choose": [1e-4, 1e-3]}}, 1e-3), settings)
    assert [c.lr for c in full] == [1e-4, 1e-3]


@pytest.fixture
def dropout_models(monkeypatch):
    """Cell models with dropout before the classifier (timm's EfficientNet `drop_rate`): training then
    draws from the global generator, as dropout and drop-path do in real backbones."""
    import medtune.grid.select as select_module

    real = select_module.create_backbone

    def with_dropout(*args, **kwargs):
        model = real(*args, **kwargs)
        model.drop_rate = 0.5
        return model

    monkeypatch.setattr(select_module, "create_backbone", with_dropout)


def test_interleaved_candidates_train_exactly_as_alone(tmp_path, dropout_models):
    """Two candidates advanced one epoch at a time in turn end as each trains alone: each keeps its
    own random state (select.Paused); without it the second's dropout draws would shift the first's."""
    from medtune.grid.cells import prepare
    from medtune.grid.select import Paused

    raw = smoke_raw(tmp_path, epochs=3, patience=3, val_fraction=0.3, views=1)
    raw["backbones"][0]["image_size"] = 32
    raw["strategies"] = [{"name": "full_ft", "lr": {"choose": [1e-3, 3e-3]}}]
    cfg = load_config(raw=raw)
    data = prepare(cfg.datasets[0], 32, 2)
    cell = next(c for c in expand(cfg, "run", {"syn@32": data.table.fingerprint()}) if c["fold"] == 0)
    settings, rt = settings_from(cfg), Runtime(torch.device(DEVICE), None, model_key(cell))
    fit_idx, val_idx = data.fit_val(2, 0, 0, settings.val_fraction)
    cands = candidates(cell["config"]["strategy"], cell["config"]["train"]["lr"])
    runs = [Paused(cand, cell["config"], data.table, fit_idx, val_idx, settings, rt) for cand in cands]
    for epoch in range(1, 5):
        for r in runs:
            r.advance(epoch)
    test_idx = data.splits(2, 0)[0][1]
    for cand, r in zip(cands, runs):
        alone = fit_candidate(cand, cell["config"], data.table, fit_idx, val_idx, settings, rt)
        np.testing.assert_allclose(r.result.predict_proba(data.table, test_idx),
                                   alone.predict_proba(data.table, test_idx), atol=1e-6)


def test_successive_halving_trains_less_and_its_survivor_exactly_as_alone(tmp_path, dropout_models):
    """`halving: on`: three learning rates train the first third of their schedule, one continues;
    the survivor's model is the one it gets trained alone (same predictions), the epochs trained are
    well under 3 full fits, and the halving is part of the cell (its id changes)."""
    from medtune.grid.cells import prepare

    raw = smoke_raw(tmp_path, epochs=6, patience=6, val_fraction=0.3, views=1)
    raw["backbones"][0]["image_size"] = 32
    raw["strategies"] = [{"name": "full_ft", "lr": {"choose": [1e-4, 1e-3, 1e-2]}}]
    raw["datasets"][0]["options"]["n_patients"] = 24
    data = prepare(load_config(raw=raw).datasets[0], 32, 2)
    table = data.table
    plain = next(c for c in expand(load_config(raw=raw), "run", {"syn@32": table.fingerprint()}) if c["fold"] == 0)
    cfg = load_config(raw={**raw, "halving": True})
    cell = next(c for c in expand(cfg, "run", {"syn@32": table.fingerprint()}) if c["fold"] == 0)
    assert cell["cell_id"] != plain["cell_id"] and cell["config"]["halving"] is True
    settings = settings_from(cfg)
    rt = Runtime(torch.device(DEVICE), None, model_key(cell))
    result = run_cell(cell, data, settings, rt)
    halving = result.info["choice"]["halving"]
    assert halving["epochs_without_halving"] == 18
    assert sorted(halving["stopped_after_epochs"].values()) == [2, 2]  # the first third of 6 epochs
    assert halving["epochs_trained"] <= 2 + 2 + 6 < 18
    picked = result.info["choice"]["picked"]
    assert picked not in halving["stopped_after_epochs"] and list(result.info["choice"]["scores"]) == [picked]
    # every candidate's epochs are recorded, so the rung's ranking can be read back from the record
    histories = result.info["choice"]["histories"]
    assert {k: len(v) for k, v in histories.items() if k != picked} == halving["stopped_after_epochs"]
    at_rung = {k: max((h["val_balanced_accuracy"], -h["val_loss"]) for h in rows[:2]) for k, rows in histories.items()}
    assert max(at_rung, key=at_rung.get) == picked
    assert all(a["elapsed_seconds"] < b["elapsed_seconds"]
               for rows in histories.values() for a, b in zip(rows, rows[1:]))
    # the survivor alone, without halving and without the other candidates in between
    cand = next(c for c in candidates(cell["config"]["strategy"], cell["config"]["train"]["lr"]) if c.key() == picked)
    fit_idx, val_idx = data.fit_val(2, 0, 0, settings.val_fraction)
    alone = fit_candidate(cand, cell["config"], table, fit_idx, val_idx, settings, rt)
    test_idx = data.splits(2, 0)[0][1]
    np.testing.assert_allclose(alone.predict_proba(table, test_idx), result.predictions[3], atol=1e-6)


def test_halving_ranks_lp_ft_rates_after_an_epoch_at_their_own_rate(tmp_path):
    """LP-FT's first evaluated epoch is its probe, fitted to convergence without a learning rate, so
    every candidate of a rate choice scores the same there. Halving counted it as the first rung's epoch:
    the candidates tied and the first-listed rates went on unseen (on BUSI's user-scale grid, 1e-4 and
    3e-4 in every fold, where the full choice took 1e-3 or 3e-3). A rung counts the epochs a candidate
    has trained at its own rate; the probe's row is marked in the record."""
    from medtune.grid.cells import prepare
    from medtune.grid.select import rate_epochs

    raw = smoke_raw(tmp_path, epochs=3, patience=3, val_fraction=0.3, views=1)
    raw["backbones"][0]["image_size"] = 32
    raw["strategies"] = [{"name": "lp_ft", "lr": {"choose": [1e-4, 1e-3, 1e-2]}}]
    raw["datasets"][0]["options"]["n_patients"] = 24
    cfg = load_config(raw={**raw, "halving": True})
    data = prepare(cfg.datasets[0], 32, 2)
    cell = next(c for c in expand(cfg, "run", {"syn@32": data.table.fingerprint()}) if c["fold"] == 0)
    result = run_cell(cell, data, settings_from(cfg), Runtime(torch.device(DEVICE), None, model_key(cell)))
    choice = result.info["choice"]
    histories, halving = choice["histories"], choice["halving"]
    # one rung (the first third of 3 epochs), one survivor; each stopped rate trained one epoch at its rate
    assert halving["stopped_after_epochs"] == {k: 1 for k in histories if k != choice["picked"]}
    for k, rows in histories.items():
        assert rows[0].get("probe") is True and all("probe" not in r for r in rows[1:])
        assert len(rows) == 1 + (3 if k == choice["picked"] else 1)
        assert rate_epochs(rows) == len(rows) - 1  # the record is read in halving's unit (racing_replay)
    # the probe is one fit shared by the rates; the rung ranks the rates on the epoch after it
    assert len({json.dumps(rows[0]["val_loss"]) for rows in histories.values()}) == 1
    at_rung = {k: max((h["val_balanced_accuracy"], -h["val_loss"]) for h in rows[:2]) for k, rows in histories.items()}
    assert max(at_rung, key=at_rung.get) == choice["picked"]
    assert halving["epochs_trained"] == 1 + 1 + 3 and halving["epochs_without_halving"] == 9


def test_a_choice_pinned_at_its_lists_end_is_shown_with_what_to_try(tmp_path, capsys):
    """BUSI's 224 px grid chose lr 1e-3, the top of [1e-4, 3e-4, 1e-3], in every fold for 6 of 13 strategies
    and auto_depth: those rows measured the list, not the method. Planted picks: the top in 4 of 5 folds is
    flagged, a spread pick is listed but not flagged, a two-value list is never an edge, auto_depth's pick is
    read too; `medtune results` and the report say so."""
    import html
    from pathlib import Path

    from planted import noisy_probs, plant_cell, plant_dataset, plant_run

    from medtune.cli import Fmt, print_results
    from medtune.evaluation.diagnose import chosen_values, edge_choices
    from medtune.report.html import build_report
    from medtune.evaluation.store import read_cells

    lrs = [1e-4, 3e-4, 1e-3]
    picks = {"bitfit": [1e-3, 1e-3, 3e-4, 1e-3, 1e-3], "full_ft": [1e-3, 3e-4, 3e-4, 1e-4, 1e-3]}
    path, rng = tmp_path / "s.sqlite", np.random.default_rng(0)
    with Store(path) as s:
        plant_dataset(s), plant_run(s, primary="full_ft")
        for name, chosen in picks.items():
            for fold, lr in enumerate(chosen):
                y = np.array([0, 1] * 10)
                for head in ("softmax", "svm"):  # the heads of a fold share one training: counted once
                    plant_cell(s, {"strategy": {"name": name}, "head": head, "n_folds": 5,
                                   "train": {"lr": {"choose": lrs}}}, fold, 0, y, noisy_probs(y, 1.0, rng),
                               samples=np.arange(fold * 20, (fold + 1) * 20), label=name,
                               info={"choice": {"chosen": {"lr": lr}}})
        for fold in range(5):  # a two-value list: its end is no evidence of a better value outside
            y = np.array([0, 1] * 10)
            plant_cell(s, {"strategy": {"name": "l2_sp", "alpha": {"choose": [0.0, 1.0]}}, "n_folds": 5}, fold, 0, y,
                       noisy_probs(y, 1.0, rng), samples=np.arange(fold * 20, (fold + 1) * 20), label="l2_sp",
                       info={"choice": {"chosen": {"alpha": 1.0}}})
        for fold in range(5):  # auto_depth's pick, its candidates sharing train.lr's list
            y = np.array([0, 1] * 10)
            plant_cell(s, {"strategy": {"name": "auto_depth", "candidates": [{"name": "full_ft"}], "inner_folds": 2},
                           "n_folds": 5, "train": {"lr": {"choose": lrs}}}, fold, 0, y, noisy_probs(y, 1.0, rng),
                       samples=np.arange(fold * 20, (fold + 1) * 20), label="auto_depth",
                       info={"auto_depth": {"picked": "full_ft lr=0.0001", "chosen": {"lr": 1e-4}}})
        cells = read_cells(s)
    chosen = chosen_values(cells)
    table = chosen.set_index("strategy")
    assert table.loc["bitfit", "chosen per fold"] == "0.001, 0.001, 0.0003, 0.001, 0.001"
    assert table.loc["bitfit", "pinned"] == "largest 0.001 in 4 of 5 folds"
    assert table.loc["bitfit", "try"] == "lr: {choose: [0.0003, 0.001, 0.003]}"
    assert table.loc["full_ft", "pinned"] == "" and table.loc["l2_sp", "pinned"] == ""
    assert table.loc["auto_depth", "pinned"] == "smallest 0.0001 in 5 of 5 folds"
    assert table.loc["auto_depth", "try"] == "lr: {choose: [3e-05, 0.0001, 0.0003]}"
    lines = edge_choices(chosen)  # one line per list and end, naming each group pinned there
    assert lines == ["choice at its edge: syn tiny_net: lr from [0.0001, 0.0003, 0.001] was pinned at one end for "
                     "auto_depth (smallest 0.0001 in 5 of 5 folds); the best value may lie beyond it: extend the "
                     "list, e.g. lr: {choose: [3e-05, 0.0001, 0.0003]}",
                     "choice at its edge: syn tiny_net: lr from [0.0001, 0.0003, 0.001] was pinned at one end for "
                     "bitfit (largest 0.001 in 4 of 5 folds); the best value may lie beyond it: extend the list, "
                     "e.g. lr: {choose: [0.0003, 0.001, 0.003]}"]
    print_results(Path(path), Fmt.table, False)
    out = capsys.readouterr().out
    assert lines[0] in out and lines[1] in out  # whole, not wrapped at the terminal's width
    page = build_report(path, tmp_path / "report", n_boot=50)["html"].read_text()
    assert "Hyperparameters chosen on inner splits" in page and "0.001, 0.001, 0.0003, 0.001, 0.001" in page
    assert ("largest 0.001 in 4 of 5 folds" in page and html.escape(lines[1]) in page
            and "tiny_net full_ft (" not in page)
