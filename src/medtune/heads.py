"""Heads: the network's own softmax, a linear SVM or a k-nearest-neighbour vote on its penultimate
features.

Bal-Ghaoui et al. 2023 replace the softmax layer by a linear SVM on deep features and report
about +6% for their best models. Here the SVM is fitted on the tuned network's pre-logits
features of the training fold's fit part: C is chosen on the inner validation split (balanced
accuracy), and the SVM at that C is fitted on the fit part with probabilities from Platt-style
sigmoid calibration, so AUC and the probability-based report work for both heads.

Every head trains on the fit part only and keeps the inner validation split for its choices, as
the softmax head does (the split stops its training early): the heads then train on the same
images, and a cell's inner-validation predictions come from a model that never saw them, which
racing, the recommended strategy and the operating points rely on. (Refitting on fit + validation,
as medtune did up to results version 4, scored an SVM on frozen BUSI features 0.93-0.99 balanced
accuracy on inner validation images it had been fitted on, against 0.77-0.80 on the test folds.)

Both heads follow one rule (`train.class_weight`, stored per cell with the decision rule):
- balanced (default): the softmax head's cross-entropy and the SVM's hinge loss weight each class
  by n / (k * n_class) (scikit-learn's `class_weight="balanced"`, `train.class_weights`), and both
  predict the argmax of probabilities under equal class priors: a class-weighted cross-entropy
  fits the posterior of a class-balanced population, and the SVM's calibrated probabilities are
  divided by the training frequencies and renormalised (below).
- none: unweighted losses, argmax of probabilities under the training fold's class frequencies.
Measured on generated 1:5 ultrasound (benchmarks/results/imbalance_synthetic.md, Lite0 96 px, 3
folds): the softmax head's balanced accuracy (linear probe / partial / full) was 0.51 / 0.50 /
0.52 unweighted, 0.49 / 0.56 / 0.59 with a class-balanced sampler and 0.62 / 0.64 / 0.65 with
the class-weighted loss, which is therefore what `balanced` means.

The kNN head is the MedMNIST+ protocol's (Doerrich et al. 2024) training-free evaluation of a
backbone's features: cosine distance on the pooled features, probabilities = the neighbours' vote
shares, k chosen from K_GRID on the inner validation split (balanced accuracy), the index holding
the fit part only. A vote has no class weights, so `balanced` applies the one rule
of both other heads through the probabilities: vote shares divided by the training frequencies
and renormalised (equal class priors), `none` keeps the raw shares.

The calibration folds are grouped by patient (StratifiedGroupKFold on the table's groups), as
every other split: images of one patient in both the part an SVM is fitted on and the part its
sigmoid is calibrated on would make the calibration optimistic.

Two choices measured on BUSI (Lite0 features at 224 px, fold 0 of 5):
- The calibrated probabilities carry the training prevalence back in: their argmax fell to
  balanced accuracy 0.64 where the class-balanced SVM's own decision reached 0.80. The head
  therefore reports probabilities under equal class priors (calibrated / training frequency,
  renormalised), whose argmax agrees with the SVM's decision (0.80), as the paper's SVM does.
- On standardised deep features (d = 1280 > n) the classes are separable, so large C
  approaches the hard-margin solution while liblinear needs seconds to get there (C = 1: 5000
  iterations, 6 s, not converged; C = 0.03: 1 s; C = 0.001: 38 iterations, 0.09 s). The grid
  starts at 1e-4..1e-2, which keeps the head's cost well below a second per fold, and widens past
  an end only where that end wins on the inner split (probe.search).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from medtune.metrics import balanced_accuracy_score
from medtune.probe import one_blas_thread, search, widen_log

HEADS = ("softmax", "svm", "knn")
FEATURE_HEADS = ("svm", "knn")  # fitted on the trained network's pooled features
C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the start; widened past an end that wins (probe.search)
C_BOUNDS = (1e-6, 1e4)
C_STEP = 10 ** 0.5
K_GRID = (5, 11, 21)  # the start; widened down to 1 and up to the fit part's size
CLASS_WEIGHTS = ("balanced", "none")
DECISION_RULES = {"balanced": "argmax of probabilities under equal class priors",
                  "none": "argmax of probabilities under the training class frequencies"}


@dataclass
class SVMHead:
    pipeline: Pipeline
    C: float
    priors: np.ndarray | None = None  # training frequency of each class in `pipeline.classes_`; None: keep them
    grid: list | None = None  # every C tried on the inner split
    edge: str | None = None  # "low"/"high": the pick is the best at a bound the grid could not pass

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, under equal class priors when `priors` is set (module docstring)."""
        p = self.pipeline.predict_proba(features)
        if self.priors is None:
            return p
        p = p / self.priors
        return p / p.sum(axis=1, keepdims=True)


def training_priors(y: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """The training frequency of each of `classes` (a fitted head's classes_): what `balanced` divides out."""
    return np.bincount(y, minlength=n_classes)[classes] / len(y)


@dataclass
class KNNHead:
    pipeline: Pipeline
    k: int
    priors: np.ndarray | None = None  # as SVMHead's: training frequencies, divided out under `balanced`
    grid: list | None = None  # every k tried on the inner split
    edge: str | None = None  # as SVMHead's

    predict_proba = SVMHead.predict_proba


def _knn(k: int) -> Pipeline:
    return make_pipeline(KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute"))


@one_blas_thread
def fit_knn(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
            n_classes: int, class_weight: str = "balanced") -> KNNHead:
    """k from K_GRID by balanced accuracy on the inner split (a k larger than the training part is
    skipped); the neighbours index holds the fit part only (module docstring). Probabilities under
    equal class priors when `class_weight` is balanced."""
    if class_weight not in CLASS_WEIGHTS:
        raise ValueError(f"class_weight must be one of {CLASS_WEIGHTS}, got {class_weight!r}")
    n = len(train_y)
    usable = [k for k in K_GRID if k <= n] or [max(1, n)]
    found = search(usable, lambda k: -1.0, lambda k, side: None)  # nothing to choose on: the first k

    def score(k: int) -> float:
        head = KNNHead(_knn(k).fit(train_x, train_y), k)
        if class_weight == "balanced":
            head.priors = training_priors(train_y, head.pipeline.classes_, n_classes)
        return balanced_accuracy_score(val_y, head.pipeline.classes_[head.predict_proba(val_x).argmax(1)])

    def widen(k: int, side: str) -> int | None:
        new = max(1, (k // 2) | 1) if side == "low" else min(n, 2 * k + 1)
        return None if new == k else new

    if len(val_y) and len(np.unique(val_y)) > 1:
        found = search(usable, score, widen)
    k = min(found.best, n)
    pipe = _knn(k).fit(train_x, train_y)
    return KNNHead(pipe, k, training_priors(train_y, pipe.classes_, n_classes) if class_weight == "balanced" else None,
                   found.grid, found.edge)


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


@one_blas_thread
def fit_svm(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
            n_classes: int, seed: int = 0, class_weight: str = "balanced",
            groups: np.ndarray | None = None) -> SVMHead:
    """C from the inner split, then the calibrated SVM (sigmoid, patient-grouped calibration folds)
    fitted on the fit part only (module docstring). `groups`: the patient of each fit-part row."""
    if class_weight not in CLASS_WEIGHTS:
        raise ValueError(f"class_weight must be one of {CLASS_WEIGHTS}, got {class_weight!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        found = search(C_GRID, lambda C: -1.0, lambda C, side: None)  # nothing to choose on: the first C
        if len(val_y) and len(np.unique(val_y)) > 1:
            found = search(C_GRID, lambda C: balanced_accuracy_score(val_y, make_pipeline(
                StandardScaler(), _svm(C, class_weight)).fit(train_x, train_y).predict(val_x)), widen_log(*C_BOUNDS, C_STEP))
        best_c = found.best
        if groups is not None and len(groups) != len(train_y):
            raise ValueError(f"groups has {len(groups)} entries for {len(train_y)} training rows")
        folds = calibration_folds(train_y, groups)
        calibrated = CalibratedClassifierCV(_svm(best_c, class_weight), method="sigmoid", cv=folds)
        pipe = make_pipeline(StandardScaler(), calibrated).fit(train_x, train_y)
    priors = training_priors(train_y, pipe.classes_, n_classes) if class_weight == "balanced" else None
    return SVMHead(pipe, best_c, priors, found.grid, found.edge)


def full_proba(head: "SVMHead | KNNHead", features: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes, also when a class was missing from the training fold."""
    p = head.predict_proba(features)
    classes = head.pipeline.classes_
    out = np.zeros((len(features), n_classes))
    out[:, classes] = p
    return out
