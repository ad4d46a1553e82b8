"""Clinical metrics as pure functions of (y_true, probabilities): nothing here touches a model.

For a binary task the positive class (e.g. "malignant") defines sensitivity, specificity, PPV
and NPV. For more classes each of them is computed one-vs-rest per class and macro-averaged,
and reported per class too (`sensitivity[benign]`, ...).

`METRICS` is the one table of what medtune reports, after scikit-learn's scorer table
(sklearn/metrics/_scorer.py): results' columns, the report's legend, racing's choices and the
model card read it, and `clinical_metrics` computes each row's `compute`: a new metric is one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.metrics import (average_precision_score, brier_score_loss, confusion_matrix, f1_score,
                             roc_auc_score)


class Scored:
    """One set of predictions as every metric function reads it: labels, probabilities, the argmax
    decision and the positive class's index (None: a multiclass task without one, macro means)."""

    def __init__(self, y_true: np.ndarray, probs: np.ndarray, class_names: list[str], positive: str | None) -> None:
        self.y_true = np.asarray(y_true)
        self.probs = np.asarray(probs, dtype=np.float64)
        self.class_names = class_names
        self.k = len(class_names)
        self.y_pred = self.probs.argmax(1)
        self.positive = class_names.index(positive) if positive is not None else (1 if self.k == 2 else None)
        # one-vs-rest figures of every class (sensitivity, specificity, PPV, NPV, accuracy)
        self.per_class = {name: from_counts(**binary_counts(self.y_true, self.y_pred, c))
                          for c, name in enumerate(class_names)}

    def one_vs_rest(self, key: str) -> float:
        """The positive class's figure; without one, the macro mean over the classes, an undefined
        class (never predicted: PPV 0/0; always predicted: NPV 0/0) counting as 0, as scikit-learn's
        zero_division=0, so an always-majority model cannot score a macro PPV from the one class it
        predicts (the count of undefined ones is reported beside it: `clinical_metrics`)."""
        if self.positive is not None:
            return self.per_class[self.class_names[self.positive]][key]
        return float(np.mean(np.nan_to_num(self.by_class(key), nan=0.0)))

    def by_class(self, key: str) -> np.ndarray:
        return np.array([self.per_class[n][key] for n in self.class_names])


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: the store's key, how to compute it and how tables, legends and
    racing treat it."""

    name: str  # the key in the store, YAML, CSV and JSON
    short: str  # the column label in `medtune results` and the report
    legend: str  # what `short` stands for, in the report's legend
    compute: Callable[[Scored], float]  # the figure from one set of predictions
    greater_is_better: bool = True  # as scikit-learn's make_scorer
    needs_positive: bool = False  # a one-vs-rest figure of the positive class (macro mean without one)
    raceable: bool = False  # racing may compare candidates by it on the inner validation splits


def _one_vs_rest(key: str) -> Callable[[Scored], float]:
    return lambda s: s.one_vs_rest(key)


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "acc", "accuracy", lambda s: float(np.mean(s.y_pred == s.y_true)), raceable=True),
    Metric("balanced_accuracy", "bal_acc", "balanced accuracy",
           lambda s: balanced_accuracy_score(s.y_true, s.y_pred), raceable=True),
    Metric("sensitivity", "sens", "sensitivity", _one_vs_rest("sensitivity"), needs_positive=True),
    Metric("specificity", "spec", "specificity", _one_vs_rest("specificity"), needs_positive=True),
    Metric("ppv", "PPV", "positive predictive value", _one_vs_rest("ppv"), needs_positive=True),
    Metric("npv", "NPV", "negative predictive value", _one_vs_rest("npv"), needs_positive=True),
    Metric("f1", "F1", "macro F1", lambda s: float(f1_score(s.y_true, s.y_pred, labels=list(range(s.k)),
                                                            average="macro", zero_division=0)), raceable=True),
    Metric("auc", "AUC", "ROC area", lambda s: auc(s.y_true, s.probs, positive=s.positive), raceable=True),
    Metric("pr_auc", "PR-AUC", "average precision", lambda s: pr_auc(s.y_true, s.probs, s.positive)),
    Metric("brier", "Brier", "Brier score", lambda s: brier(s.y_true, s.probs, s.positive), greater_is_better=False),
    Metric("ece", "ECE", "expected calibration error (equal-mass bins, as many as keep the event rate rising: "
           "the monotonic sweep of Roelofs et al. 2022)",
           lambda s: calibration_error(s.y_true, s.probs, s.positive), greater_is_better=False),
)
MAIN_METRICS = [m.name for m in METRICS]  # the order of every metrics table
RACEABLE_METRICS = tuple(m.name for m in METRICS if m.raceable)
ONE_VS_REST = tuple(m.name for m in METRICS if m.needs_positive)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_counts(y_true: np.ndarray, y_pred: np.ndarray, positive: int) -> dict[str, int]:
    t, p = y_true == positive, y_pred == positive
    return {"tp": int(np.sum(t & p)), "fn": int(np.sum(t & ~p)), "tn": int(np.sum(~t & ~p)), "fp": int(np.sum(~t & p))}


def from_counts(tp: int, fn: int, tn: int, fp: int) -> dict[str, float]:
    """Sensitivity (recall), specificity, PPV (precision), NPV and accuracy from a 2x2 table."""
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def clinical_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
                     positive: str | None = None) -> dict[str, float]:
    """Every metric of METRICS for one set of predictions, plus the one-vs-rest figures of each class
    (`sensitivity[benign]`, ...) and, for a multiclass task without a positive class, how many classes'
    PPV/NPV were undefined (`ppv_undefined`).

    Binary: `positive` names the positive class (default: the second class). Multiclass:
    one-vs-rest per class, macro-averaged; `positive`, if given, adds its own one-vs-rest
    figures as the headline sensitivity/specificity/PPV/NPV.
    """
    s = Scored(y_true, probs, class_names, positive)
    out: dict[str, float] = {"n": float(len(s.y_true))}
    out.update({m.name: m.compute(s) for m in METRICS})
    for name, figures in s.per_class.items():
        out.update({f"{key}[{name}]": figures[key] for key in ONE_VS_REST})
    if s.positive is None:
        out.update({f"{key}_undefined": float(np.isnan(s.by_class(key)).sum()) for key in ("ppv", "npv")})
    return out


# --------------------------------------------------------------------------- calibration
def calibration(y_true: np.ndarray, probs: np.ndarray, positive: int | None,
                n_bins: int | None = None) -> dict[str, float]:
    """PR-AUC (average precision), Brier score and ECE. With a positive class: of its probability
    (scikit-learn's binary `brier_score_loss`, `average_precision_score`); without one: the
    multiclass Brier score, macro one-vs-rest average precision and the top-label ECE."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    return {"pr_auc": pr_auc(y_true, probs, positive), "brier": brier(y_true, probs, positive),
            "ece": calibration_error(y_true, probs, positive, n_bins)}


def pr_auc(y_true: np.ndarray, probs: np.ndarray, positive: int | None) -> float:
    """Average precision of the positive class; without one, the macro mean over the classes present."""
    if positive is not None:
        t = y_true == positive
        return float(average_precision_score(t, probs[:, positive])) if t.any() else float("nan")
    present = [c for c in range(probs.shape[1]) if (y_true == c).any()]
    if not present:
        return float("nan")
    return float(np.mean([average_precision_score(y_true == c, probs[:, c]) for c in present]))


def brier(y_true: np.ndarray, probs: np.ndarray, positive: int | None) -> float:
    """Brier score of P(positive); without a positive class, the multiclass Brier score."""
    if positive is not None:
        return float(brier_score_loss(y_true == positive, probs[:, positive], pos_label=True))
    rows = probs.sum(1, keepdims=True)  # float32 softmax sums to 1 only within ~1e-7; sklearn warns on that
    return float(brier_score_loss(y_true, probs / np.where(rows > 0, rows, 1), labels=list(range(probs.shape[1]))))


def calibration_error(y_true: np.ndarray, probs: np.ndarray, positive: int | None, n_bins: int | None = None) -> float:
    """ECE of P(positive); without a positive class, the top-label ECE (`ece`)."""
    if positive is not None:
        return ece((y_true == positive).astype(float), probs[:, positive], n_bins)
    return ece((probs.argmax(1) == y_true).astype(float), probs.max(1), n_bins)


def equal_mass_bins(p: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Indices of `p` sorted and cut into n_bins bins of (nearly) equal count: every bin has data,
    which equal-width bins over [0, 1] do not once a model is confident."""
    order = np.argsort(p, kind="stable")
    return [b for b in np.array_split(order, min(n_bins, len(p))) if len(b)]


def ece(outcome: np.ndarray, p: np.ndarray, n_bins: int | None = None) -> float:
    """Expected calibration error over equal-mass bins: sum_b (n_b / n) |mean(p_b) - mean(outcome_b)|,
    with `outcome` the event (binary: the positive class; multiclass: the top label was right).

    `n_bins=None` (what medtune reports) takes the number of bins by the monotonic sweep of Roelofs et
    al. 2022 ("Mitigating bias in calibration error estimation"): the most equal-mass bins whose event
    rates still rise with the probability. A fixed 10 bins over one test fold of ~16 images puts 1-2
    images in a bin and measures mostly their noise: a perfectly calibrated model scores 0.14 (10%
    prevalence) to 0.28 (30%) there, the sweep 0.08 to 0.13 (tests/test_stats.py simulates it)."""
    outcome, p = np.asarray(outcome, dtype=float), np.asarray(p, dtype=float)
    if not len(p):
        return float("nan")
    bins = equal_mass_bins(p, n_bins if n_bins is not None else sweep_bins(outcome, p))
    return float(sum(len(b) / len(p) * abs(p[b].mean() - outcome[b].mean()) for b in bins))


def sweep_bins(outcome: np.ndarray, p: np.ndarray) -> int:
    """The largest b such that the event rates of b equal-mass bins of `p` are non-decreasing, sweeping
    b = 1, 2, ... up to the first b that breaks monotonicity (Roelofs et al. 2022, ECE_sweep)."""
    n = len(p)
    csum = np.concatenate([[0.0], np.cumsum(outcome[np.argsort(p, kind="stable")])])
    best = 1
    for b in range(2, n + 1):
        # the bin edges np.array_split uses (equal_mass_bins): the first n % b bins one longer
        size, extra = divmod(n, b)
        edges = np.concatenate([[0], np.cumsum([size + 1] * extra + [size] * (b - extra))])
        rates = np.diff(csum[edges]) / np.diff(edges)
        if np.any(np.diff(rates) < -1e-12):
            break
        best = b
    return best


# --------------------------------------------------------------------------- operating points
def threshold_for(y_pos: np.ndarray, p: np.ndarray, target: str, value: float) -> float:
    """The decision threshold on P(positive) that reaches `target` (sensitivity or specificity) >=
    `value` on these predictions, as strict as it can be: for sensitivity the highest threshold,
    for specificity the lowest. Predicted positive means p >= threshold. Meant for inner
    validation predictions: the test fold is then scored at a threshold it never influenced."""
    y_pos, p = np.asarray(y_pos, dtype=bool), np.asarray(p, dtype=float)
    if target == "sensitivity":
        pos = np.sort(p[y_pos])[::-1]
        if not len(pos):
            return float("nan")
        need = int(np.ceil(value * len(pos) - 1e-9))  # positives that must score >= threshold
        return float(pos[max(need, 1) - 1])
    if target == "specificity":
        neg = np.sort(p[~y_pos])
        if not len(neg):
            return float("nan")
        need = int(np.ceil(value * len(neg) - 1e-9))  # negatives that must score < threshold
        if need <= 0:
            return float(neg[0])
        return float(np.nextafter(neg[need - 1], np.inf))
    raise ValueError(f"operating point target must be sensitivity or specificity, not {target!r}")


def at_threshold(y_pos: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    """The 2x2 counts when p >= threshold is called positive."""
    y_pos, pred = np.asarray(y_pos, dtype=bool), np.asarray(p, dtype=float) >= threshold
    return {"tp": int(np.sum(y_pos & pred)), "fn": int(np.sum(y_pos & ~pred)),
            "tn": int(np.sum(~y_pos & ~pred)), "fp": int(np.sum(~y_pos & pred))}


def net_benefit(y_pos: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(model, treat-all) net benefit at each threshold probability pt, as the dcurves package
    defines it (Vickers & Elkin 2006): TP/n - FP/n * pt / (1 - pt), predicted positive = p >= pt;
    treat-all calls everyone positive; treat-none is 0."""
    y_pos, p = np.asarray(y_pos, dtype=bool), np.asarray(p, dtype=float)
    n = len(y_pos)
    pt = np.asarray(thresholds, dtype=float)
    w = pt / (1 - pt)
    tp = np.array([np.sum(y_pos & (p >= t)) for t in pt])
    fp = np.array([np.sum(~y_pos & (p >= t)) for t in pt])
    prev = y_pos.mean()
    return tp / n - fp / n * w, prev - (1 - prev) * w


def auc(y_true: np.ndarray, probs: np.ndarray, positive: int | None = None) -> float:
    """ROC-AUC: binary on the positive class, else one-vs-rest macro; NaN when undefined."""
    k = probs.shape[1]
    try:
        if k == 2:
            pos = 1 if positive is None else positive  # not `positive or 1`: class 0 can be the positive one
            return float(roc_auc_score(y_true == pos, probs[:, pos]))
        if positive is not None:
            return float(roc_auc_score(y_true == positive, probs[:, positive]))
        if len(np.unique(y_true)) < k:
            return float("nan")
        return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    except ValueError:
        return float("nan")


def confusion(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, np.asarray(probs).argmax(1), labels=list(range(n_classes)))


# --------------------------------------------------------------------------- statistics
# Pure functions over scores or pooled predictions: what a reviewer asks for beside mean ± sd.


def balanced_accuracy_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The one balanced accuracy (the report's headline metric): mean recall over the classes present
    in `y_true`, as scikit-learn's `balanced_accuracy_score`, without its warning when `y_pred` holds a
    class `y_true` lacks (a bootstrap resample or a small inner split often does) and without its
    input checks, which bootstrap_ci would pay thousands of times. NaN when `y_true` is empty."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """`balanced_accuracy_score` of the most probable class: a metric of (y_true, probs), as
    bootstrap_ci takes."""
    return balanced_accuracy_score(y_true, np.asarray(probs).argmax(1))


def bootstrap_ci(y_true: np.ndarray, probs: np.ndarray, metric=balanced_accuracy, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0, clusters: np.ndarray | None = None) -> tuple[float, float, float]:
    """(point, low, high): percentile bootstrap of the pooled out-of-fold predictions.

    With `clusters` (a patient id per prediction) whole patients are resampled, since images of
    one patient are not independent: resampling images would make the interval too narrow.
    Pooling the folds' test predictions uses every sample once, so the interval reflects the
    data set's size rather than the number of folds; resampling is seeded so reports are stable.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    point = metric(y_true, probs)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    if clusters is not None:
        _, cid = np.unique(np.asarray(clusters), return_inverse=True)
        members = [np.flatnonzero(cid == c) for c in range(cid.max() + 1)]
    stats = np.empty(n_boot)
    for b in range(n_boot):
        if clusters is None:
            i = rng.integers(0, n, n)
        else:
            i = np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        stats[b] = metric(y_true[i], probs[i])
    stats = stats[~np.isnan(stats)]
    if not len(stats):
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(point), float(lo), float(hi)


def corrected_ttest(a: np.ndarray, b: np.ndarray, n_train: float, n_test: float,
                    min_var: float = 0.0) -> tuple[float, float]:
    """(t, two-sided p) of Nadeau & Bengio (2003): the paired t-test over folds with the variance
    inflated by (1/J + n_test/n_train), because CV folds share training data and the plain
    paired t-test is then far too eager to call a difference significant. `min_var` floors the
    differences' sample variance (grid/racing.py: a score that moves in steps can repeat exactly)."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    j = len(d)
    if j < 2:
        return float("nan"), float("nan")
    mean, var = d.mean(), max(d.var(ddof=1), min_var)
    if var == 0:
        return (0.0, 1.0) if mean == 0 else (float(np.sign(mean) * np.inf), 0.0)
    t = mean / np.sqrt((1.0 / j + n_test / n_train) * var)
    return float(t), float(2 * stats.t.sf(abs(t), j - 1))


def corrected_interval(a: np.ndarray, b: np.ndarray, n_train: float, n_test: float,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired differences a − b over folds, the interval under
    `corrected_ttest`'s inflated variance: the one interval medtune gives a difference between two
    configurations scored on the same folds (the depth comparisons, the paired-tests table and a
    learning curve's crossover print it)."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return (float("nan"),) * 3
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * np.sqrt((1 / len(d) + n_test / n_train) * d.var(ddof=1))
    return mean, float(mean - half), float(mean + half)


def holm(pvalues) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values for a family of tests: sort ascending, multiply the
    i-th smallest (0-based) by (m - i), carry the running maximum, cap at 1. NaN stays NaN and is
    not counted in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(statistic, two-sided p) of the Wilcoxon signed-rank test; p = 1 when all pairs tie."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0 or np.all(d == 0):
        return float("nan"), 1.0
    res = stats.wilcoxon(d)
    return float(res.statistic), float(res.pvalue)


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """Mean rank per method over blocks (rows = data sets or folds, columns = methods); rank 1 =
    highest score, ties share the mean rank (Demšar 2006)."""
    from scipy.stats import rankdata

    return np.mean([rankdata(-row) for row in np.asarray(scores, dtype=float)], axis=0)


def friedman(scores: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(chi-square, p, average ranks) of the Friedman test; rows are blocks (data sets or folds),
    columns the methods compared. Needs at least 3 methods and 2 blocks."""
    from scipy.stats import friedmanchisquare

    scores = np.asarray(scores, dtype=float)
    ranks = average_ranks(scores)
    if scores.shape[1] < 3 or scores.shape[0] < 2:
        return float("nan"), float("nan"), ranks
    stat, p = friedmanchisquare(*scores.T)
    return float(stat), float(p), ranks


def nemenyi_cd(k: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Critical difference of average ranks for the Nemenyi post-hoc test:
    CD = q_alpha * sqrt(k (k + 1) / (6 N)), q_alpha the studentized range quantile / sqrt(2)."""
    from scipy.stats import studentized_range

    q = studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6.0 * n_blocks)))


def cd_cliques(sorted_ranks: list[float], cd: float) -> list[tuple[int, int]]:
    """Maximal runs (first, last index) of methods, sorted by average rank, whose ranks differ by
    less than CD: the groups a critical-difference diagram joins as not significantly different."""
    cliques: list[tuple[int, int]] = []
    k = len(sorted_ranks)
    for i in range(k):
        j = i
        while j + 1 < k and sorted_ranks[j + 1] - sorted_ranks[i] < cd:
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in cliques):
            cliques.append((i, j))
    return cliques
