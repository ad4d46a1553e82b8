"""The splitter objects (data/splits.py) give exactly the folds of the functions they replaced: the
previous implementations are copied here verbatim as the reference, on a few tables."""

import numpy as np
import pytest
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold

from medtune.data.loaders import ImageTable
from medtune.data.splits import LeaveOneSiteOut, OfficialSplit, PatientKFold, by_site, kfold
from medtune.errors import DataError
from medtune.grid.cells import PreparedData


def old_kfold(labels, groups, n_folds, seed):
    x = np.zeros(len(labels))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(x, labels, groups)]
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(x, labels)]


def old_by_site(labels, sites):
    sites = np.asarray(sites, dtype=object)
    names = sorted(set(sites))
    code = np.asarray([names.index(s) for s in sites])
    folds = [(tr, te) for tr, te in LeaveOneGroupOut().split(np.zeros(len(labels)), labels, code)]
    folds.sort(key=lambda f: code[f[1][0]])
    return folds


def tables():
    rng = np.random.default_rng(0)
    out = []
    for n, k, grouped in [(40, 2, False), (60, 3, True), (97, 4, True), (30, 3, False)]:
        labels = rng.integers(0, k, n)
        labels[:k] = np.arange(k)
        groups = np.asarray([f"p{i // 3}" for i in rng.permutation(n)], dtype=object) if grouped else None
        sites = np.asarray([["a", "c", "b"][i % 3] for i in range(n)], dtype=object)
        if groups is not None:  # a patient at one site only
            groups = np.asarray([f"{s}-{g}" for s, g in zip(sites, groups)], dtype=object)
        out.append((labels, groups, sites))
    return out


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("t", range(4))
def test_patient_kfold_gives_the_old_folds(t):
    labels, groups, _ = tables()[t]
    for seed in (0, 1, 7):
        for k in (2, 3, 5):
            splitter = PatientKFold(k, seed)
            got = list(splitter.split(None, labels, groups))
            assert splitter.get_n_splits() == k == len(got)
            assert same(got, old_kfold(labels, groups, k, seed))
            assert same(kfold(labels, groups, k, seed), got)


@pytest.mark.parametrize("t", range(4))
def test_leave_one_site_out_gives_the_old_folds(t):
    labels, groups, sites = tables()[t]
    splitter = LeaveOneSiteOut(sites, "t")
    got = list(splitter.split(None, labels, groups))
    assert splitter.get_n_splits() == 3 == len(got)
    assert same(got, old_by_site(labels, sites))
    assert same(by_site(labels, groups, sites, "t"), got)
    assert [sorted(set(sites[te])) for _, te in got] == [["a"], ["b"], ["c"]]


def test_leave_one_site_out_refuses_at_split_time():
    splitter = LeaveOneSiteOut(np.array(["a", "a", "b", "b"], dtype=object), "t")
    assert splitter.get_n_splits() == 2
    with pytest.raises(DataError, match="more than one site"):
        splitter.split(None, np.array([0, 1, 0, 1]), np.array(["p1", "p2", "p1", "p3"], dtype=object))


def test_official_split_and_prepared_data_route_through_the_splitters():
    import torch

    labels = np.array([0, 1] * 6)
    split = np.array(["train", "val", "test"] * 4, dtype=object)
    table = ImageTable(torch.zeros(12, 3, 4, 4, dtype=torch.uint8), labels, ["a", "b"], [f"f{i}" for i in range(12)],
                       split=split)
    splitter = OfficialSplit(split)
    assert splitter.get_n_splits() == 1
    (tr, te), = splitter.split(None, labels)
    assert te.tolist() == [2, 5, 8, 11] and tr.tolist() == [i for i in range(12) if i % 3 != 2]
    official = PreparedData(table, None, {}, None, official=True)
    assert isinstance(official.splitter(5, 0), OfficialSplit) and same(official.splits(5, 3), [(tr, te)])
    plain = PreparedData(table, None, {}, None)
    assert isinstance(plain.splitter(2, 1), PatientKFold) and same(plain.splits(2, 1), old_kfold(labels, None, 2, 1))
    sites = np.array(["x", "x", "y", "y"] * 3, dtype=object)
    sited = PreparedData(table, None, {}, None, sites=sites)
    assert isinstance(sited.splitter(5, 0), LeaveOneSiteOut) and same(sited.splits(0, 0), old_by_site(labels, sites))
