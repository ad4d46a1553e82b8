"""A linear probe fitted to convergence: logistic regression on frozen pooled features.

When only the classifier trains, the problem is convex, and a few epochs of SGD at the network's
learning rate stop short of its optimum (on a 4-class MRI set, 1,311 images, SGD for 8 epochs
reached balanced accuracy 0.821 where scikit-learn's logistic regression on the same Lite0
features reached 0.860). So the probe is scikit-learn's `LogisticRegression` (L-BFGS) on
standardised features, its C chosen from a small log grid by the loss on the inner validation
split (never the test fold), and the fitted weights folded back into the network's classifier
(which runs in fp32 under autocast, features.Forward.classify: folded weights in bf16 flip decisions).

A grid that ends where the optimum lies would pin the pick to its end without anyone seeing it
(on BUSI the probe chose the smallest C in 13 of 15 fits): `search` widens the grid past an end
whose value is strictly the best, one step at a time up to a bound, and reports the grid actually
searched and whether the pick still sits at a bound.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits
from torch import nn

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the start; widened by `search` up to C_BOUNDS
C_BOUNDS = (1e-6, 1e4)
C_STEP = 10.0


@dataclass
class Search:
    """A grid search's outcome: the pick, every value tried (sorted) and "low"/"high" when the pick
    is the best at an end the bound kept from widening (None otherwise)."""
    best: Any
    grid: list
    edge: str | None


def search(grid: Sequence, score: Callable[[Any], float], widen: Callable[[Any, str], Any]) -> Search:
    """The value of highest `score` (ties to the lower value); while it is an end of the grid and
    strictly better than its neighbour, the grid grows past that end by `widen(end, "low"|"high")`,
    which returns None at the bound. A plateau at an end is not widened: its inner value ties."""
    scores = {v: score(v) for v in grid}
    while True:
        values = sorted(scores)
        best = max(values, key=lambda v: (scores[v], -values.index(v)))
        i = values.index(best)
        side = "low" if i == 0 else "high" if i == len(values) - 1 else None
        if side is None or len(values) < 2 or scores[best] <= scores[values[1 if i == 0 else -2]]:
            return Search(best, values, None)
        new = widen(best, side)
        if new is None:
            return Search(best, values, side)
        scores[new] = score(new)


def widen_log(lo: float, hi: float, step: float) -> Callable[[float, str], float | None]:
    """A `widen` for a positive parameter on a log grid: one `step` factor past the end, within [lo, hi]."""
    def widen(v: float, side: str) -> float | None:
        new = v / step if side == "low" else v * step
        return float(f"{new:.6g}") if lo * (1 - 1e-9) <= new <= hi * (1 + 1e-9) else None
    return widen


@dataclass
class LinearFit:
    weight: np.ndarray  # (n_classes, d) on the raw (unstandardised) features
    bias: np.ndarray  # (n_classes,)
    C: float
    val_loss: float
    grid: list = field(default_factory=list)  # every C tried
    edge: str | None = None  # "low"/"high": the pick is still the best at a bound of C_BOUNDS


def _logistic(C: float, class_weight: str | None, seed: int) -> LogisticRegression:
    return LogisticRegression(C=C, class_weight=class_weight, max_iter=2000, random_state=seed)


# The convex fits (probe, SVM, kNN) are small, about 10^3 x 10^3, and run beside torch's own threads:
# OpenBLAS's threads then spin-wait for cores torch holds. One BLAS thread is the fast setting for them
# (benchmarks/results/init_estimate.json: a demo probe cell 57-67 s with OpenBLAS's 2 threads, 2-3 s with one).
one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")


@one_blas_thread
def fit_linear_probe(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
                     class_weight: str | None = None, seed: int = 0, grid: tuple[float, ...] = C_GRID) -> LinearFit:
    """Logistic regression on (x, y); C from `grid` by the (class-weighted, when `class_weight`
    is "balanced") log loss on (x_val, y_val), or C = 1 without a validation split."""
    if len(np.unique(y)) < 2:  # one class only (a tiny fold): predict it
        b = np.full(n_classes, -30.0)
        b[int(y[0])] = 0.0
        return LinearFit(np.zeros((n_classes, x.shape[1])), b, float("nan"), float("nan"))
    x, x_val = np.asarray(x, np.float64), np.asarray(x_val, np.float64)
    scaler = StandardScaler().fit(x)
    z, z_val = scaler.transform(x), scaler.transform(x_val) if len(x_val) else x_val
    if not len(y_val):
        grid = (1.0,)
    fits: dict[float, tuple[float, LogisticRegression]] = {}

    def score(C: float) -> float:
        """Minus the (class-weighted) validation log loss; 0 without a validation split."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = _logistic(C, class_weight, seed).fit(z, y)
        loss = (log_loss(y_val, _full(clf, z_val, n_classes), labels=range(n_classes),
                         sample_weight=compute_sample_weight(class_weight, y_val) if class_weight else None)
                if len(y_val) else float("nan"))
        fits[C] = (loss, clf)
        return -loss if np.isfinite(loss) else 0.0

    found = search(grid, score, widen_log(*C_BOUNDS, C_STEP) if len(y_val) else (lambda v, side: None))
    C = found.best
    loss, clf = fits[C]
    w, b = _full_coef(clf, n_classes)
    # logits = w (x - mean) / scale + b = (w / scale) x + (b - w mean / scale)
    w_raw = w / scaler.scale_
    return LinearFit(w_raw, b - w_raw @ scaler.mean_, C, loss, found.grid, found.edge)


def _full_coef(clf: LogisticRegression, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax weights over all classes: binary logistic regression is the softmax with logits
    (-f/2, f/2); a class absent from the fit gets a logit far below the others."""
    coef, icpt = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w = np.zeros((n_classes, coef.shape[1]))
    b = np.full(n_classes, -30.0 + (icpt.min() if len(icpt) else 0.0))
    w[clf.classes_], b[clf.classes_] = coef, icpt
    return w, b


def _full(clf: LogisticRegression, z: np.ndarray, n_classes: int) -> np.ndarray:
    p = np.zeros((len(z), n_classes))
    p[:, clf.classes_] = clf.predict_proba(z)
    return p


def load_into(classifier: nn.Module, fit: LinearFit) -> None:
    """Copy the fitted weights into the network's linear classifier."""
    with torch.no_grad():
        classifier.weight.copy_(torch.as_tensor(fit.weight, dtype=classifier.weight.dtype))
        classifier.bias.copy_(torch.as_tensor(fit.bias, dtype=classifier.bias.dtype))
