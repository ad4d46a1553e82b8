"""Training-set sizes (`train_sizes`, data/subsets.py, issue 40): the subsets a learning curve trains on
are nested, stratified and patient-intact, beside the same outer test fold; the full size is today's
cell, id for id; a size too small for an inner split is refused before anything trains."""

import numpy as np
import pytest

from medtune.config import load_config
from medtune.data.subsets import SUBSET_RULE, check_sizes, patient_order, train_subset
from medtune.errors import ConfigError, DataError
from medtune.evaluation.store import Store, at_size
from medtune.grid.cells import Grid

from conftest import smoke_raw


def table(n_patients=90, seed=0):
    """Patients with 1-4 images each, three classes of unequal size (60/25/15%)."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_patients)
    cls = rng.choice(3, n_patients, p=[0.6, 0.25, 0.15])
    groups = np.concatenate([[f"p{i}"] * k for i, k in enumerate(per)]).astype(object)
    labels = np.concatenate([[c] * k for c, k in zip(cls, per)])
    return labels, groups


SIZES = [0.1, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("grouped", [True, False])
def test_subsets_are_nested_patient_intact_and_stratified(grouped):
    labels, groups = table()
    groups = groups if grouped else None
    train_idx = np.arange(0, len(labels), 1)[np.arange(len(labels)) % 5 != 0]  # a fold's training side
    if grouped:  # a training side holds whole patients
        keep = {g for g in groups[np.arange(len(labels)) % 5 != 0]}
        train_idx = np.flatnonzero([g in keep for g in groups])
    subsets = [set(train_subset(train_idx, labels, groups, s, seed=3, fold=1).tolist()) for s in SIZES]
    assert subsets[-1] == set(train_idx.tolist())
    for small, large in zip(subsets, subsets[1:]):
        assert small < large  # strictly nested
    key = groups if grouped else np.arange(len(labels)).astype(str)
    fold_patients = {key[i] for i in train_idx}
    for s, sub in zip(SIZES, subsets):
        inside = {key[i] for i in sub}
        assert all(i in sub for i in train_idx if key[i] in inside)  # no patient cut in two
        # the share of each class's patients within one patient of the size's share
        for c in range(3):
            in_class = {key[i] for i in train_idx if labels[i] == c}
            assert abs(len(inside & in_class) - s * len(in_class)) <= 1.01, (s, c)
        assert abs(len(inside) - round(s * len(fold_patients))) <= 2


def test_subsets_come_from_the_seed_and_fold():
    labels, groups = table()
    idx = np.arange(len(labels))
    a = train_subset(idx, labels, groups, 0.25, seed=0, fold=0)
    assert np.array_equal(a, train_subset(idx, labels, groups, 0.25, seed=0, fold=0))
    assert not np.array_equal(a, train_subset(idx, labels, groups, 0.25, seed=1, fold=0))
    assert not np.array_equal(a, train_subset(idx, labels, groups, 0.25, seed=0, fold=1))
    order = patient_order(idx, labels, groups, 0, 0)
    assert sorted(np.concatenate(order).tolist()) == idx.tolist()  # every image of the fold once


def test_a_patient_count_takes_that_many_patients():
    labels, groups = table()
    idx = np.arange(len(labels))
    sub = train_subset(idx, labels, groups, 30, seed=0, fold=0)
    assert len(set(groups[sub])) == 30
    assert set(sub) <= set(train_subset(idx, labels, groups, 45, seed=0, fold=0))


def test_a_size_too_small_for_an_inner_split_names_the_class_and_size():
    labels, groups = table(n_patients=30)
    with pytest.raises(DataError, match=r"train size 10%.*fewer than 2 of class"):
        train_subset(np.arange(len(labels)), labels, groups, 0.1, seed=0, fold=0, class_names=["a", "b", "c"],
                     dataset="d")
    with pytest.raises(DataError, match="asks for 99 patients"):
        train_subset(np.arange(len(labels)), labels, groups, 99, seed=0, fold=0, dataset="d")


@pytest.mark.parametrize("sizes, error", [([0.25], "lacks 1.0"), ([1], "at least 2"), ([0.5, 1.0, 0.5], "twice"),
                                          ([1.5], r"fraction in \(0, 1\]"), (["half"], "neither a fraction")])
def test_bad_train_sizes_are_refused_with_what_to_write(sizes, error):
    with pytest.raises(ConfigError, match=error):
        check_sizes(sizes)


def test_the_full_size_keeps_todays_cell_ids(tmp_path):
    raw = smoke_raw(tmp_path)
    prints = {"syn@48": "fp"}
    today = {c.cell_id for c in Grid(load_config(raw=raw), "r", prints, None, "float32")}
    same = [c for c in Grid(load_config(raw={**raw, "train_sizes": [1.0]}), "r", prints, None, "float32")]
    assert {c.cell_id for c in same} == today
    curves = list(Grid(load_config(raw={**raw, "train_sizes": [0.5, 1.0]}), "r", prints, None, "float32"))
    assert len(curves) == 2 * len(today)
    assert {c.cell_id for c in curves if c.train_size == 1.0} == today
    halves = [c for c in curves if c.train_size == 0.5]
    assert all(c["config"]["train_size"] == 0.5 for c in halves) and not today & {c.cell_id for c in halves}
    assert all(c["config"]["subset_rule"] == SUBSET_RULE for c in halves)  # a new drawing rule, new ids
    assert [c.train_size for c in curves][:len(today)] == [0.5] * len(today)  # smaller sizes run first


def test_every_size_is_tested_on_the_same_outer_fold(tmp_path):
    import medtune

    raw = smoke_raw(tmp_path)
    raw["datasets"][0]["options"]["n_patients"] = 40
    raw.update(strategies=["linear_probe"], train_sizes=[0.5, 1.0])
    medtune.run(raw, progress=False)
    with Store(raw["store"], read_only=True) as s:
        m, preds = s.metrics(), s.predictions()
        info = {r.cell_id: r.info_json for r in s.cells().itertuples()}
    assert sorted(map(str, m.train_size)) == ["0.5", "0.5", "1.0", "1.0"]
    for fold in (0, 1):
        half = at_size(m, 0.5)
        full = at_size(m, 1.0)
        a = preds[preds.cell_id == half[half.fold == fold].cell_id.iloc[0]]["sample"].tolist()
        b = preds[preds.cell_id == full[full.fold == fold].cell_id.iloc[0]]["sample"].tolist()
        assert a == b and len(a) > 0
    import json
    n = {c: json.loads(i)["n_train_patients"] for c, i in info.items()}
    for fold in (0, 1):
        small = n[at_size(m, 0.5).query("fold == @fold").cell_id.iloc[0]]
        large = n[at_size(m, 1.0).query("fold == @fold").cell_id.iloc[0]]
        assert abs(small - large / 2) <= 1 and small < large


def test_a_size_too_small_is_refused_before_any_cell_trains(tmp_path):
    import medtune

    raw = {**smoke_raw(tmp_path), "train_sizes": [0.1, 1.0]}
    with pytest.raises(DataError, match="train size 10%"):
        medtune.run(raw, progress=False)
    import sqlite3
    from pathlib import Path

    if Path(raw["store"]).exists():  # nothing written: no cell, not even the tables
        with sqlite3.connect(raw["store"]) as conn:
            assert not conn.execute("SELECT name FROM sqlite_master WHERE name='cells'").fetchall()


def test_the_verdict_and_tables_read_the_full_size_and_each_size_reads_alone(tmp_path):
    from medtune.errors import MedtuneError
    from medtune.evaluation.evidence import read_evidence, train_sizes_in
    from planted import noisy_probs, plant_cell, plant_dataset, plant_run

    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 20)
    with Store(tmp_path / "s.sqlite") as store:
        plant_dataset(store)
        plant_run(store)
        for size in (0.25, 1.0):
            for fold in range(3):
                change = {"strategy": {"name": "full_ft"},
                          **({} if size == 1.0 else {"train_size": size, "subset_rule": SUBSET_RULE})}
                plant_cell(store, change, fold, 0, y, noisy_probs(y, 4 * size, rng))
    with pytest.raises(MedtuneError, match="no finished cells at training size 10%"):
        read_evidence(tmp_path / "s.sqlite", 0.1)
    assert train_sizes_in(tmp_path / "s.sqlite") == [0.25, 1.0]
    full, quarter = read_evidence(tmp_path / "s.sqlite"), read_evidence(tmp_path / "s.sqlite", 0.25)
    assert list(full.metrics.train_size) == [1.0] * 3 and list(quarter.metrics.train_size) == [0.25] * 3
    assert (full.train_size, quarter.train_size, full.sizes) == (1.0, 0.25, [0.25, 1.0])
    assert set(full.cells.cell_id) == set(full.metrics.cell_id) and set(full.predictions.cell_id) <= set(
        full.cells.cell_id)
    assert set(full.metrics.variant) == {""}  # a size is never shown as a variant of the strategy
    assert not set(full.metrics.group) & set(quarter.metrics.group)


def test_a_resumed_grid_does_not_call_its_other_sizes_unmatched(tmp_path):
    """The cells of the other sizes share every label with a full-size cell left to run; they are
    this grid's own cells, reused, and the resumed run must not warn that they "differ" and are not
    reused (it had, naming `train_size`, on the BUSI learning-curve resume)."""
    import sqlite3
    import warnings

    import medtune

    raw = smoke_raw(tmp_path)
    raw["datasets"][0]["options"]["n_patients"] = 40
    raw.update(strategies=["linear_probe"], train_sizes=[0.5, 1.0])
    medtune.run(raw, progress=False)
    with Store(raw["store"], read_only=True) as s:
        m = s.metrics()
    lost = at_size(m, 1.0).query("fold == 1").cell_id.iloc[0]
    with sqlite3.connect(raw["store"]) as conn:
        for table in ("metrics", "predictions", "extra_predictions", "cells"):
            conn.execute(f"DELETE FROM {table} WHERE cell_id = ?", (lost,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again = medtune.run(raw, progress=False)
    assert (again.total, again.skipped) == (4, 3)
