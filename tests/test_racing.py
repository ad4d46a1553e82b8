"""Racing across folds (grid/racing.py): a far-worse candidate stops after the minimum folds, a near-tie
never does, and an interrupted race resumes to the same end with no cell run twice or lost.

The race driver is tested with planted cells: `run_round` writes each cell with inner-validation
predictions of a chosen skill, so the right decision is known without training; the CLI test at the
end races a real (tiny) grid under SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess

import numpy as np
import pytest

from conftest import PYTHON, cli_env, tiny_config
from medtune.config import RacingConfig, load_config
from medtune.errors import ConfigError
from medtune.grid.racing import PRUNED, Score, prune, race
from medtune.grid.cells import cell_id
from medtune.evaluation.store import Store
from planted import BASE, merge, plant_dataset

N_VAL = 80


def grid(skills: dict[str, list[float]], folds: int = 5) -> list[dict]:
    """Cells of one data set: a candidate (strategy label) per entry of `skills`, one cell per fold."""
    cells = []
    for name in skills:
        for fold in range(folds):
            config = merge(BASE, {"strategy": {"name": name}, "n_folds": folds})
            config.update(fold=fold, seed=0)
            cells.append({"cell_id": cell_id(config), "run_id": "r", "dataset": "syn", "backbone": "tiny_net",
                          "strategy": name, "head": "softmax", "fold": fold, "n_folds": folds, "seed": 0,
                          "config": config})
    return cells


def trainer(store: Store, skills: dict[str, list[float]], log: list, stop_after: int | None = None):
    """A run_round that 'trains' a cell by writing it done, its inner-validation accuracy exactly
    skills[candidate][fold]; it raises (a kill) once `stop_after` cells are written."""
    def run_round(todo: list[dict], stage: str = "") -> None:
        for c in todo:
            if stop_after is not None and len(log) >= stop_after:
                raise KeyboardInterrupt("killed")
            acc = skills[c["strategy"]][c["fold"]]
            y = np.tile([0, 1], N_VAL // 2)
            right = np.arange(N_VAL) < round(acc * N_VAL)
            pred = np.where(right, y, 1 - y)
            probs = np.stack([1.0 - pred, pred.astype(float)], 1) * 0.8 + 0.1
            store.save_cell(c, "done", {"balanced_accuracy": acc}, (np.arange(2), ["a", "b"], y[:2], probs[:2]), 1.0,
                            info={"n_train": 400, "n_test": 2},
                            extra=[("inner_val", "syn", np.arange(N_VAL), y, probs)])
            log.append((c["strategy"], c["fold"]))
    return run_round


def planted_store(tmp_path) -> Store:
    store = Store(tmp_path / "race.sqlite")
    plant_dataset(store)
    return store


def favour_on_test_folds(store: Store, strategy: str):
    """Make the test folds disagree with the inner splits: `strategy` gets the best test-fold mean.
    Returns the store's group table, indexed by strategy."""
    from medtune.evaluation.evidence import group_table, read_evidence

    store.conn.execute("UPDATE metrics SET value = 0.99 WHERE name='balanced_accuracy' AND cell_id IN "
                       "(SELECT cell_id FROM cells WHERE strategy=?)", (strategy,))
    store.conn.commit()
    return group_table(read_evidence(store.path), n_boot=20).set_index("strategy")


def test_a_far_worse_candidate_is_pruned_after_the_minimum_folds(tmp_path):
    """With two folds the t-test has one degree of freedom: only a large and consistent gap (here
    0.4000 and 0.4125) prunes as early as that; `close` (within noise of the leader) runs to the end."""
    # `close` sits a hair below `good` (0.8925 against 0.895; 0.881 against 0.8875 after two folds), so which
    # is the leader never hangs on how an exact tie breaks (by group key, i.e. on the cell ids' hashes)
    skills = {"good": [0.90, 0.875, 0.925, 0.90, 0.875], "bad": [0.50, 0.4625, 0.525, 0.50, 0.55],
              "close": [0.875, 0.8875, 0.90, 0.925, 0.875]}
    store, log = planted_store(tmp_path), []
    cells = grid(skills)
    out = race(cells, store, trainer(store, skills, log), RacingConfig(min_folds=2))
    # fold-major: every candidate's fold 0, then fold 1, ...
    assert log[:6] == [(s, f) for f in (0, 1) for s in skills]
    assert [why.split(":")[0] for why in out.values()] == ["syn tiny_net bad softmax"]
    assert "stopped after round 2 of 5" in next(iter(out.values()))
    assert ("bad", 2) not in log and {("good", 4), ("close", 4)} <= set(log)
    rows = store.conn.execute("SELECT strategy, fold, status, error FROM cells ORDER BY strategy, fold").fetchall()
    bad = [r for r in rows if r[0] == "bad"]
    assert [r[2] for r in bad] == ["done", "done", PRUNED, PRUNED, PRUNED]
    assert "worse than the leader" in bad[2][3] and "inner validation" in bad[2][3]
    assert len(rows) == len(cells)  # nothing lost: every cell is done or recorded as pruned


def test_a_near_tie_is_never_pruned():
    """Whatever the fold-to-fold noise, a candidate whose mean inner score is within `margin` of the
    leader's is not pruned (the one-sided test against the margin cannot reject then)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(2, 6))
        leader = rng.uniform(0.5, 0.95, k)
        other = leader - rng.uniform(0, 0.01, k) + rng.normal(0, rng.choice([0.0, 1e-4, 0.02]), k)
        if other.mean() > leader.mean():
            leader, other = other, leader
        if leader.mean() - other.mean() > 0.01:
            continue
        scores = {g: {(0, i): Score(float(v), 40, 200) for i, v in enumerate(vals)}
                  for g, vals in (("a", leader), ("b", other))}
        assert prune(scores, looks=3, confidence=0.95, margin=0.01) == {}
    # an exact, noiseless tie and a constant gap inside the margin, too
    same = {g: {(0, i): Score(0.8, 40, 200) for i in range(5)} for g in "ab"}
    assert prune(same, 3, 0.95, 0.01) == {}
    gap = {"a": {(0, i): Score(0.8, 40, 200) for i in range(5)}, "b": {(0, i): Score(0.795, 40, 200) for i in range(5)}}
    assert prune(gap, 3, 0.95, 0.01) == {}


def test_an_exact_tie_for_the_lead_goes_to_the_first_candidate_by_name():
    """Two candidates tie for the lead; the one a third is compared with decides whether it is pruned
    (against the steady leader the gap is certain, against the noisy one it is not). The tie went to
    the larger group key, a hash that changes with the results version; it goes to the candidate
    first by name."""
    steady = {(0, i): Score(0.9, 40, 200) for i in range(4)}
    noisy = {(0, i): Score(v, 40, 200) for i, v in enumerate([0.95, 0.85, 0.95, 0.85])}
    worse = {(0, i): Score(0.8, 40, 200) for i in range(4)}
    scores = {"y": steady, "x": noisy, "w": worse}
    assert list(prune(scores, 2, 0.95, 0.01, names={"y": "a_net", "x": "b_net", "w": "c_net"})) == ["w"]
    assert prune(scores, 2, 0.95, 0.01, names={"y": "b_net", "x": "a_net", "w": "c_net"}) == {}


def test_the_same_gap_on_two_folds_is_not_certainty():
    """Balanced accuracy on n validation images moves in steps of about 1/n, so two folds can show
    the very same gap: a sample variance of 0 on one degree of freedom, and the t-test was then
    "certain" (Holm p 8e-15 for a 0.033 gap on BUSI's every-5th-image grid, 19 validation images).
    The variance is floored at the steps' rounding variance, so that gap is not pruned after two
    folds, while a gap of half the scale still is."""
    leader = {(0, i): Score(0.9, 20, 100) for i in range(2)}
    small = {(0, i): Score(0.9 - 1 / 30, 20, 100) for i in range(2)}
    assert prune({"a": leader, "b": small}, 3, 0.95, 0.01) == {}
    large = {(0, i): Score(0.4, 20, 100) for i in range(2)}
    assert list(prune({"a": leader, "b": large}, 3, 0.95, 0.01)) == ["b"]


def test_an_interrupted_race_resumes_to_the_same_end(tmp_path):
    skills = {"good": [0.90, 0.875, 0.925, 0.90, 0.875], "bad": [0.50, 0.55, 0.525, 0.50, 0.55],
              "mid": [0.80, 0.85, 0.825, 0.80, 0.85]}
    (tmp_path / "whole").mkdir(), (tmp_path / "killed").mkdir()
    whole_store, whole = planted_store(tmp_path / "whole"), []
    expected = race(grid(skills), whole_store, trainer(whole_store, skills, whole), RacingConfig())
    store, runs = planted_store(tmp_path / "killed"), []
    for new_cells in (1, 3, 3, 2):  # each run killed after this many more cells: inside rounds 1 to 4
        log: list = []
        with pytest.raises(KeyboardInterrupt):
            race(grid(skills), store, trainer(store, skills, log, stop_after=new_cells), RacingConfig())
        runs.append(log)
    log = []
    got = race(grid(skills), store, trainer(store, skills, log), RacingConfig())
    runs.append(log)
    every = [c for r in runs for c in r]
    assert len(every) == len(set(every))  # no cell trained twice
    assert sorted(every) == sorted(whole)  # the same cells as the uninterrupted race, none lost
    assert got == expected
    statuses = dict(store.conn.execute("SELECT status, count(*) FROM cells GROUP BY status").fetchall())
    assert statuses == dict(whole_store.conn.execute("SELECT status, count(*) FROM cells GROUP BY status").fetchall())


def test_racing_config_switch_and_its_errors(tmp_path):
    assert load_config(tiny_config(tmp_path, racing="on", folds=3)).racing == RacingConfig()
    assert load_config(tiny_config(tmp_path, racing=False)).racing is None
    assert load_config(tiny_config(tmp_path, racing={"confidence": 0.9}, folds=3)).racing.confidence == 0.9
    with pytest.raises(ConfigError, match="racing.confidence"):
        load_config(tiny_config(tmp_path, racing={"confidence": 1.5}, folds=3))
    with pytest.raises(ConfigError, match="val_fraction is 0"):
        load_config(tiny_config(tmp_path, racing=True, folds=3, train={"val_fraction": 0}))
    with pytest.raises(ConfigError, match="min_folds .* leaves no round"):
        load_config(tiny_config(tmp_path, racing={"min_folds": 2}, folds=2))


def test_sigkill_during_a_race_and_rerun(tmp_path):
    """A real raced grid killed with SIGKILL after its first finished cells, then rerun: every cell
    ends done or pruned exactly once."""
    from test_kill_resume import count, store_state, wait_until

    cfg = tiny_config(tmp_path, strategies=["linear_probe", "full_ft"], seeds=[0, 1], racing="on",
                      train={"epochs": 1, "batch_size": 8, "views": 1, "patience": 1})
    store = tmp_path / "store.sqlite"
    cmd = [PYTHON, "-m", "medtune", "run", str(cfg), "--quiet"]
    log = tmp_path / "run0.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
        wait_until(proc, lambda: count(store, "cells WHERE status='done'") >= 3, "3 finished cells", log)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = store_state(store)
    final = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert store_state(store) >= before
    with sqlite3.connect(store) as conn:
        rows = conn.execute("SELECT cell_id, status FROM cells").fetchall()
    assert len(rows) == 8 and {s for _, s in rows} <= {"done", PRUNED}


def test_the_report_headlines_the_race_leader_and_lists_the_pruned(tmp_path):
    """Under racing the headline is the leader on inner validation scores (not the best test-fold
    mean), and a pruned candidate is listed with its reason, never the optimistic † row."""
    from medtune.report.html import build_report
    from planted import plant_run

    skills = {"good": [0.90, 0.875, 0.925, 0.90, 0.875], "bad": [0.50, 0.4625, 0.525, 0.50, 0.55],
              "close": [0.875, 0.8875, 0.90, 0.925, 0.875]}
    store = planted_store(tmp_path)
    plant_run(store, racing=RacingConfig().model_dump())
    race(grid(skills), store, trainer(store, skills, []), RacingConfig())
    t = favour_on_test_folds(store, "close")
    assert t.loc["good", "headline"] and t.loc["good", "headline_how"] == "inner"
    assert t.loc["close", "best_on_test_folds"] and not t.loc["bad", "best_on_test_folds"]
    assert t.loc["bad", "pruned"].startswith("worse than the leader") and t.loc["good", "pruned"] == ""
    page = build_report(store.path, tmp_path / "report", n_boot=20)["html"].read_text()
    assert "Racing: candidates stopped early" in page and "(pruned)" in page
    assert "rule `recommend: leader`: the best mean score on the inner validation splits" in page


def test_without_racing_the_headline_and_deployed_group_are_the_inner_validation_leader(tmp_path):
    """No racing, no primary, no auto_depth: the headline is still chosen on the cells' inner
    validation splits, not on the test folds, which are planted to favour another candidate; the
    group keep_best deploys is the same one (bundle.deployed), as is racing.leaders'. Without any inner-validation
    predictions the headline falls back to the test folds' best and says it is optimistic."""
    from medtune.deploy.bundle import deployed
    from medtune.evaluation.evidence import group_table, read_evidence
    from planted import plant_run

    skills = {"good": [0.90, 0.875, 0.925, 0.90, 0.875], "close": [0.875, 0.85, 0.85, 0.875, 0.85]}
    store = planted_store(tmp_path)
    plant_run(store)
    cells = grid(skills)
    trainer(store, skills, [])(cells)  # every cell, no race
    t = favour_on_test_folds(store, "close")
    assert t.loc["good", "headline"] and t.loc["good", "headline_how"] == "inner"
    assert t.loc["close", "best_on_test_folds"] and not t.loc["close", "headline"]
    assert deployed(store.path)[0]["syn"].group == t.loc["good", "group"]
    assert read_evidence(store.path).inner_leaders == {"syn": t.loc["good", "group"]}
    store.conn.execute("DELETE FROM extra_predictions")
    store.conn.commit()
    t = group_table(read_evidence(store.path), n_boot=20).set_index("strategy")
    assert t.loc["close", "headline"] and t.loc["close", "headline_how"] == "optimistic"



def test_each_training_set_size_is_its_own_race(tmp_path):
    """Learning curves (train_sizes): every candidate scores lower at 25% of the data than at the full
    size; raced together, the small sizes would all be 'worse than the leader' and pruned. Each size
    is its own race, so none is: a small size is never pruned for being small."""
    skills = {"a": [0.55, 0.5625, 0.55, 0.5375, 0.55], "b": [0.5625, 0.55, 0.5375, 0.55, 0.5625]}
    full = {"a": [0.9, 0.9125, 0.9, 0.8875, 0.9], "b": [0.9125, 0.9, 0.8875, 0.9, 0.9125]}
    cells = grid(skills) + grid(full)
    for c in cells[:len(cells) // 2]:  # the first copy: the 25% cells
        c["config"] = merge(c["config"], {"train_size": 0.25})
        c["cell_id"] = cell_id(c["config"])
    by_size = {0.25: skills, 1.0: full}
    store, log = planted_store(tmp_path), []

    def sized(todo, stage=""):  # the planted trainer, at the skills of each cell's size
        for c in todo:
            trainer(store, by_size[c["config"].get("train_size", 1.0)], log)([c], stage)
    out = race(cells, store, sized, RacingConfig(min_folds=2))
    assert out == {}
    assert len(log) == len(cells)


def test_the_inner_leader_is_the_full_sizes(tmp_path):
    """The recommendation (and the deployed model) is made at the full training size: a small size's
    inner-validation score, on fewer fit images, never names the leader."""
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.store import group_key

    small = {"a": [0.95] * 5, "b": [0.6] * 5}
    full = {"a": [0.8] * 5, "b": [0.9] * 5}
    cells = grid(small) + grid(full)
    for c in cells[:len(cells) // 2]:
        c["config"] = merge(c["config"], {"train_size": 0.25})
        c["cell_id"] = cell_id(c["config"])
    store, log = planted_store(tmp_path), []
    for c in cells:
        trainer(store, small if "train_size" in c["config"] else full, log)([c])
    b_full = next(c for c in cells if c["strategy"] == "b" and "train_size" not in c["config"])
    assert read_evidence(store.path).inner_leaders == {"syn": group_key(b_full["config"])}
