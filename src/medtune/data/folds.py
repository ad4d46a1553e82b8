"""Stratified (patient-grouped) k-fold: below data/splits.py and data/quality.py, which both plan folds.

It stays a module of its own because data/quality.py plans folds with it and data/splits.py imports
data/quality.py (inside a function): in splits.py it would close an import cycle (tests/test_imports.py).
data/splits.py re-exports it beside the other splitters.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold


class PatientKFold:
    """Stratified k-fold, grouped by patient when groups are given, with sklearn's splitter interface
    (`split(X, y, groups)`, `get_n_splits()`): scikit-learn's StratifiedGroupKFold with groups, else
    StratifiedKFold, both shuffled with `seed`. X is only counted (None: as many rows as y)."""

    def __init__(self, n_splits: int = 5, seed: int = 0) -> None:
        self.n_splits, self.seed = n_splits, seed

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits

    def split(self, X, y: np.ndarray, groups: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(train, test) index pairs, stratified by `y`."""
        x = np.zeros(len(y))
        if groups is not None:
            splitter = StratifiedGroupKFold(n_splits=self.n_splits, shuffle=True, random_state=self.seed)
            return iter(list(splitter.split(x, y, groups)))
        splitter = StratifiedKFold(n_splits=self.n_splits, shuffle=True, random_state=self.seed)
        return iter(list(splitter.split(x, y)))

    def __repr__(self) -> str:
        return f"PatientKFold(n_splits={self.n_splits}, seed={self.seed})"


def kfold(labels: np.ndarray, groups: np.ndarray | None, n_folds: int,
          seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs, stratified by label, grouped when groups are given (PatientKFold)."""
    return list(PatientKFold(n_folds, seed).split(None, labels, groups))
