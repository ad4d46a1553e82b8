"""Cross-validation splits that respect patients and duplicates.

Images of one patient, and identical images (same decoded pixels), must sit on the same side
of every split, or the estimate leaks. Groups come from the data (patient ids); exact
duplicates are merged into one group (`duplicates: group`, the default), refused
(`error`) or reduced to their first copy (`drop`); `ignore` only counts them (to measure how
much leakage inflates the metrics, never for a result you report). `near_duplicates: N` extends
the policy to images whose perceptual hashes differ in at most N bits (`medtune.data.quality`).
With groups, folds come from scikit-learn's StratifiedGroupKFold, else StratifiedKFold.

The outer folds come from splitter objects with scikit-learn's interface (`split(X, y, groups)`,
`get_n_splits()`): PatientKFold (k-fold, data/folds.py), LeaveOneSiteOut (`cv: by_site`) and
OfficialSplit (`split: official`); `kfold` and `by_site` are their folds as lists.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from medtune.data.loaders import ImageTable
from medtune.errors import DataError, DataWarning
from medtune.data.folds import PatientKFold, kfold

DUPLICATE_POLICIES = ("group", "error", "drop", "ignore")
__all__ = ["PatientKFold", "LeaveOneSiteOut", "OfficialSplit", "kfold", "by_site", "inner_split",
           "apply_duplicate_policy", "assert_disjoint", "check_foldable", "find_duplicates", "effective_groups",
           "DuplicateReport", "DUPLICATE_POLICIES"]


@dataclass
class DuplicateReport:
    groups: list[list[int]]  # each a list of table positions with identical (or near-identical) pixels
    conflicting: list[list[int]]  # duplicate groups whose labels disagree
    n_exact_groups: int = 0
    near_threshold: int | None = None

    @property
    def n_extra(self) -> int:
        return sum(len(g) - 1 for g in self.groups)

    def summary(self) -> dict:
        return {"duplicate_groups": len(self.groups), "duplicate_images": self.n_extra,
                "label_conflicts": len(self.conflicting), "exact_groups": self.n_exact_groups,
                "near_duplicates": self.near_threshold}


def find_duplicates(table: ImageTable, near_threshold: int | None = None) -> DuplicateReport:
    """Exact copies (same decoded pixels) and, with `near_threshold`, perceptual near-copies,
    merged transitively into groups."""
    from medtune.data.quality import exact_groups, near_duplicate_groups, table_phashes, union_groups

    exact = exact_groups(table.digests)
    groups = exact
    if near_threshold is not None:
        near = near_duplicate_groups(table_phashes(table.images), near_threshold)
        groups = union_groups(len(table), [(g[0], i) for g in exact + near for i in g[1:]])
    conflicting = [g for g in groups if len(set(table.labels[g])) > 1]
    return DuplicateReport(groups, conflicting, len(exact), near_threshold)


def effective_groups(table: ImageTable, dup: DuplicateReport) -> np.ndarray | None:
    """Patient ids merged with duplicate groups (union-find): one id per image, or None when
    there are neither patient ids nor duplicates."""
    if table.groups is None and not dup.groups:
        return None
    base = (table.groups if table.groups is not None
            else np.asarray([f"img{i}" for i in range(len(table))], dtype=object))
    parent = {g: g for g in base}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for g in dup.groups:
        root = find(base[g[0]])
        for i in g[1:]:
            parent[find(base[i])] = root
    return np.asarray([find(g) for g in base], dtype=object)


def apply_duplicate_policy(table: ImageTable, policy: str,
                           near_duplicates: int | None = None) -> tuple[ImageTable, np.ndarray | None, dict]:
    """The table to use (maybe with copies dropped), its groups, and a record of what was done."""
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"duplicates: {policy!r} is not one of {DUPLICATE_POLICIES}.")
    dup = find_duplicates(table, near_duplicates)
    record = {"policy": policy, **dup.summary()}
    if dup.conflicting:  # kept (one copy's label is wrong, not the data set), but never silently
        g = dup.conflicting[0]
        copies = " = ".join(f"{table.paths[i]} [{table.class_names[table.labels[i]]}]" for i in g[:2])
        kind = "identical" if near_duplicates is None else f"identical or near-identical (<= {near_duplicates} bits)"
        warnings.warn(f"{table.name}: {len(dup.conflicting)} group(s) of {kind} images carry different labels, "
                      f"e.g. {copies}. One label of each is wrong: fix it by hand (`medtune data check` lists them).",
                      DataWarning, stacklevel=2)
    if policy == "ignore":  # counted and recorded, folds see patient ids only
        return table, table.groups, record
    if dup.groups and policy == "error":
        first = dup.groups[0]
        raise DataError(
            f"{table.name}: {len(dup.groups)} groups of identical images ({dup.n_extra} extra copies), e.g. "
            f"{table.paths[first[0]]} = {table.paths[first[1]]}. Remove them, or set `duplicates: group` "
            "(keep copies in one fold) or `duplicates: drop` (keep the first copy)."
        )
    if dup.groups and policy == "drop":
        extra = {i for g in dup.groups for i in g[1:]}
        keep = np.asarray([i for i in range(len(table)) if i not in extra])
        table = table.subset(keep)
        dup = find_duplicates(table, near_duplicates)
    return table, effective_groups(table, dup), record


def check_foldable(labels: np.ndarray, groups: np.ndarray | None, class_names: list[str], n_folds: int,
                   where: str) -> None:
    """Every class needs at least `n_folds` images (patients, with groups) to appear in every test fold."""
    for c, name in enumerate(class_names):
        mask = labels == c
        units = len(set(groups[mask])) if groups is not None else int(mask.sum())
        if units < n_folds:
            what = "patients" if groups is not None else "images"
            if units < 2:  # no fold count helps: cross-validation takes at least 2 folds
                raise DataError(
                    f"{where}: class {name!r} has 1 {what[:-1]}, and cross-validation needs at least 2 {what} of "
                    f"every class (one to train on, one to test): add {what} of {name!r} or merge the class into "
                    "another (or drop it from the data set)."
                )
            raise DataError(
                f"{where}: class {name!r} has {units} {what}, fewer than the {n_folds} folds asked for. "
                f"Use `folds: {units}` or fewer, add data, or merge the class."
            )


def inner_split(train_idx: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a training fold into (fit, validation) for early stopping and the SVM's C, grouped and
    stratified like the outer folds. Returns an empty validation set when the fold is too small."""
    if fraction <= 0:
        return train_idx, train_idx[:0]
    n_splits = max(2, round(1 / fraction))
    y = labels[train_idx]
    g = groups[train_idx] if groups is not None else None
    units_min = min(len(set(g[y == c])) if g is not None else int(np.sum(y == c)) for c in np.unique(y))
    if units_min < 2:
        return train_idx, train_idx[:0]
    n_splits = min(n_splits, units_min) if units_min < n_splits else n_splits
    fit_pos, val_pos = kfold(y, g, n_splits, seed)[0]
    return train_idx[fit_pos], train_idx[val_pos]


def assert_disjoint(train_idx: np.ndarray, test_idx: np.ndarray, table: ImageTable, groups: np.ndarray | None,
                    duplicates: bool = True) -> None:
    """Leakage guard run for every cell: no image, patient or (unless `duplicates` is False, as under
    `duplicates: ignore`) identical image on both sides."""
    if set(train_idx) & set(test_idx):
        raise DataError("internal error: a test image is also in the training fold")
    if groups is not None and set(groups[train_idx]) & set(groups[test_idx]):
        raise DataError("internal error: a patient is on both sides of a split")
    if not duplicates:
        return
    leaked = {table.digests[i] for i in train_idx} & {table.digests[i] for i in test_idx}
    if leaked:
        raise DataError(f"{len(leaked)} identical image(s) are on both sides of a split; set `duplicates: group`.")


class LeaveOneSiteOut:
    """Leave-one-site-out folds (`cv: by_site`), with sklearn's splitter interface: fold i tests on
    site i (sorted by name) and trains on every other site, so the estimate is of a model meeting a
    hospital it has never seen. `split(X, y, groups)` refuses a patient (`groups`) imaged at two
    sites, or a training side missing a class; `where` names the data set in those errors."""

    def __init__(self, sites: np.ndarray, where: str = "data set") -> None:
        self.sites, self.where = np.asarray(sites, dtype=object), where

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return len(set(self.sites))

    def split(self, X, y: np.ndarray, groups: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from sklearn.model_selection import LeaveOneGroupOut

        labels, sites, where = y, self.sites, self.where
        names = sorted(set(sites))
        if len(names) < 2:
            raise DataError(f"{where}: `cv: by_site` needs at least 2 sites in the manifest's `site` column; found "
                            f"{names}. Use `cv: kfold`.")
        if groups is not None:
            spans = {g for g in set(groups) if len(set(sites[groups == g])) > 1}
            if spans:
                raise DataError(f"{where}: {len(spans)} patient(s) appear at more than one site "
                                f"(e.g. {sorted(spans)[0]!r}); "
                                "fix the `site` or `patient_id` column, since leave-one-site-out would leak them.")
        code = np.asarray([names.index(s) for s in sites])
        folds = [(tr, te) for tr, te in LeaveOneGroupOut().split(np.zeros(len(labels)), labels, code)]
        folds.sort(key=lambda f: code[f[1][0]])
        for tr, te in folds:
            missing = sorted(set(labels) - set(labels[tr]))
            if missing:
                raise DataError(f"{where}: without site {names[code[te[0]]]!r} the training side lacks class(es) "
                                f"{missing}; every class must be seen at other sites. Use `cv: kfold`.")
        return iter(folds)


class OfficialSplit:
    """The source's own split as the one fold (`split: official`, a MedMNIST .npz), with sklearn's
    splitter interface, like its PredefinedSplit: train on train+val, test on test."""

    def __init__(self, split: np.ndarray) -> None:
        self.split_of = np.asarray(split)

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return 1

    def split(self, X=None, y=None, groups=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        s = self.split_of
        return iter([(np.flatnonzero(s != "test"), np.flatnonzero(s == "test"))])


def by_site(labels: np.ndarray, groups: np.ndarray | None, sites: np.ndarray,
            where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-site-out folds as a list (LeaveOneSiteOut)."""
    return list(LeaveOneSiteOut(sites, where).split(None, labels, groups))
