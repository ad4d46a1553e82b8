"""Heads: the network's own softmax, a linear SVM (Bal-Ghaoui et al. 2023) or a k-nearest-neighbour
vote (the MedMNIST+ protocol) on its penultimate features.

Each head is one registered class (`HEADS`, `create_head`, `medtune list heads`), after scikit-learn's
estimator contract, as each strategy is: it knows its name, how it is fitted and the info key of the
hyperparameter it chooses, so no other module branches on a head's name. Every head trains on the
training fold's fit part and makes its choices on the inner validation split; under
`class_weight: balanced` every head predicts under equal class priors. docs/heads.md says why, with
the measurements behind each choice.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from medtune.errors import ConfigError
from medtune.evaluation.metrics import balanced_accuracy_score
from medtune.models.probe import one_blas_thread, search, widen_log

HEADS: dict[str, type["Head"]] = {}  # registry key -> class, in registration order (softmax first)
C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the start; widened past an end that wins (probe.search)
C_BOUNDS = (1e-6, 1e4)
C_STEP = 10 ** 0.5
K_GRID = (5, 11, 21)  # the start; widened down to 1 and up to the fit part's size
CLASS_WEIGHTS = ("balanced", "none")
DECISION_RULES = {"balanced": "argmax of probabilities under equal class priors",
                  "none": "argmax of probabilities under the training class frequencies"}
# what heads pickled before the registry called their fitted attributes (`svm.joblib` of older bundles)
_OLD_ATTRIBUTES = {"pipeline": "pipeline_", "priors": "priors_", "grid": "grid_", "edge": "edge_",
                   "C": "chosen_", "k": "chosen_"}


def register(cls: type["Head"]) -> type["Head"]:
    HEADS[cls.name] = cls
    return cls


def list_heads() -> list[str]:
    return list(HEADS)


def head_class(name: str) -> type["Head"]:
    """The registered class of `name`; an unknown name is a ConfigError with the closest names."""
    if name not in HEADS:
        close = difflib.get_close_matches(str(name), list(HEADS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown head {name!r}.{hint} Known: {', '.join(list_heads())}.")
    return HEADS[name]


def create_head(name: str, **params: Any) -> "Head":
    """The one way in: `create_head("svm", class_weight="none")`, unfitted."""
    return head_class(name)(**params)


@dataclass
class Head:
    """How a trained network's output becomes class probabilities. A feature head follows
    scikit-learn's estimator contract: its hyperparameters are the fields, `fit` learns from the fit
    part's features and chooses its own hyperparameter on the inner split, setting attributes that
    end in `_`; `predict_proba` and `classes_` then serve any features of the same network. Adding a
    head is one registered subclass: cells, config, bundles and `medtune list heads` ask the registry."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line, for `medtune list heads`
    on_features: ClassVar[bool] = True  # False: the trained classifier itself, nothing fitted here
    info_key: ClassVar[str | None] = None  # a cell's info key for the chosen hyperparameter (stores read it)
    grid: ClassVar[tuple] = ()  # the start of that hyperparameter's search
    class_weight: str = "balanced"
    seed: int = 0

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, n_classes: int,
            groups: np.ndarray | None = None) -> "Head":
        """Fit on (X, y), the fit part's features, choosing on (X_val, y_val); `groups`: the patient
        of each row of X. Sets `pipeline_`, `chosen_`, `priors_`, `grid_` (every value tried) and
        `edge_` ("low"/"high" where the pick is the best at a bound the grid could not pass)."""
        raise NotImplementedError(f"the {self.name} head fits nothing on features")

    @property
    def classes_(self) -> np.ndarray:
        return self.pipeline_.classes_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """The pipeline's probabilities, under equal class priors when `priors_` is set (module docstring)."""
        p = self.pipeline_.predict_proba(X)
        if self.priors_ is None:
            return p
        p = p / self.priors_
        return p / p.sum(axis=1, keepdims=True)

    @staticmethod
    def _choose(grid, y_val: np.ndarray, score, widen):
        """probe.search over `grid` by `score` on the inner split; without a split holding two classes
        there is nothing to choose on, and the first value is taken."""
        if len(y_val) and len(np.unique(y_val)) > 1:
            return search(grid, score, widen)
        return search(grid, lambda v: -1.0, lambda v, side: None)

    def _check_class_weight(self) -> None:
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be one of {CLASS_WEIGHTS}, got {self.class_weight!r}")

    def __setstate__(self, state: dict) -> None:
        """Also reads a head pickled before the registry (`pipeline`, `C` or `k`, `priors`, ...)."""
        self.__dict__.update({_OLD_ATTRIBUTES.get(k, k): v for k, v in state.items()})


@register
@dataclass
class SoftmaxHead(Head):
    """The trained network's own classifier: its probabilities are the network's (training/loop.py)."""

    name: ClassVar[str] = "softmax"
    description: ClassVar[str] = "the trained network's own classifier"
    on_features: ClassVar[bool] = False


def training_priors(y: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """The training frequency of each of `classes` (a fitted head's classes_): what `balanced` divides out."""
    return np.bincount(y, minlength=n_classes)[classes] / len(y)


def _svm(C: float, class_weight: str) -> LinearSVC:
    return LinearSVC(C=C, class_weight="balanced" if class_weight == "balanced" else None, max_iter=5000,
                     dual="auto")


def calibration_folds(y: np.ndarray, groups: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """2-3 stratified folds for the sigmoid calibration, grouped by patient where groups exist. Folds
    whose fitting part lacks a class are dropped (a small class of few patients); at least one remains."""
    n_classes = len(np.unique(y))
    k = int(max(2, min(3, np.bincount(y)[np.unique(y)].min())))
    if groups is not None:
        k = int(max(2, min(k, len(np.unique(groups)))))
        splits = list(StratifiedGroupKFold(k).split(y, y, groups))
    else:  # what CalibratedClassifierCV(cv=k) does
        splits = list(StratifiedKFold(k).split(y, y))
    kept = [(tr, te) for tr, te in splits if len(np.unique(y[tr])) == n_classes and len(te)]
    return kept or splits[:1]


@register
@dataclass
class SVMHead(Head):
    """C from the inner split, then the calibrated SVM (sigmoid, patient-grouped calibration folds)
    fitted on the fit part only (module docstring)."""

    name: ClassVar[str] = "svm"
    description: ClassVar[str] = ("linear SVM on the network's pooled features (C chosen on the inner split, "
                                  "sigmoid-calibrated probabilities)")
    info_key: ClassVar[str] = "svm_C"
    grid: ClassVar[tuple] = C_GRID

    @one_blas_thread
    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, n_classes: int,
            groups: np.ndarray | None = None) -> "SVMHead":
        self._check_class_weight()
        cw = self.class_weight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            found = self._choose(C_GRID, y_val, lambda C: balanced_accuracy_score(y_val, make_pipeline(
                StandardScaler(), _svm(C, cw)).fit(X, y).predict(X_val)), widen_log(*C_BOUNDS, C_STEP))
            if groups is not None and len(groups) != len(y):
                raise ValueError(f"groups has {len(groups)} entries for {len(y)} training rows")
            folds = calibration_folds(y, groups)
            calibrated = CalibratedClassifierCV(_svm(found.best, cw), method="sigmoid", cv=folds)
            self.pipeline_ = make_pipeline(StandardScaler(), calibrated).fit(X, y)
        self.chosen_, self.grid_, self.edge_ = found.best, found.grid, found.edge
        self.priors_ = training_priors(y, self.pipeline_.classes_, n_classes) if cw == "balanced" else None
        return self


def _knn(k: int) -> Pipeline:
    return make_pipeline(KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute"))


@register
@dataclass
class KNNHead(Head):
    """k from K_GRID by balanced accuracy on the inner split (a k larger than the training part is
    skipped); the neighbours index holds the fit part only (module docstring). Probabilities under
    equal class priors when `class_weight` is balanced."""

    name: ClassVar[str] = "knn"
    description: ClassVar[str] = ("k-nearest-neighbour vote on the network's pooled features (cosine, k chosen "
                                  "on the inner split; the MedMNIST+ protocol)")
    info_key: ClassVar[str] = "knn_k"
    grid: ClassVar[tuple] = K_GRID

    @one_blas_thread
    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, n_classes: int,
            groups: np.ndarray | None = None) -> "KNNHead":
        self._check_class_weight()
        n = len(y)
        usable = [k for k in K_GRID if k <= n] or [max(1, n)]

        def score(k: int) -> float:
            trial = KNNHead(self.class_weight, self.seed)._fit_at(k, X, y, n_classes)
            return balanced_accuracy_score(y_val, trial.classes_[trial.predict_proba(X_val).argmax(1)])

        def widen(k: int, side: str) -> int | None:
            new = max(1, (k // 2) | 1) if side == "low" else min(n, 2 * k + 1)
            return None if new == k else new

        found = self._choose(usable, y_val, score, widen)
        self._fit_at(min(found.best, n), X, y, n_classes)
        self.grid_, self.edge_ = found.grid, found.edge
        return self

    def _fit_at(self, k: int, X: np.ndarray, y: np.ndarray, n_classes: int) -> "KNNHead":
        self.chosen_, self.pipeline_ = k, _knn(k).fit(X, y)
        balanced = self.class_weight == "balanced"
        self.priors_ = training_priors(y, self.pipeline_.classes_, n_classes) if balanced else None
        return self


def full_proba(head: Head, features: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes, also when a class was missing from the training fold."""
    p = head.predict_proba(features)
    out = np.zeros((len(features), n_classes))
    out[:, head.classes_] = p
    return out
