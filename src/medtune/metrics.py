"""Clinical metrics as pure functions of (y_true, probabilities): nothing here touches a model.

For a binary task the positive class (e.g. "malignant") defines sensitivity, specificity, PPV
and NPV. For more classes each of them is computed one-vs-rest per class and macro-averaged,
and reported per class too (`sensitivity[benign]`, ...).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

MAIN_METRICS = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc"]


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
    """All metrics medtune reports for one set of predictions.

    Binary: `positive` names the positive class (default: the second class). Multiclass:
    one-vs-rest per class, macro-averaged; `positive`, if given, adds its own one-vs-rest
    figures as the headline sensitivity/specificity/PPV/NPV.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    y_pred = probs.argmax(1)
    out: dict[str, float] = {"n": float(len(y_true))}
    out["accuracy"] = float(np.mean(y_pred == y_true))
    present = np.unique(y_true)
    out["balanced_accuracy"] = float(np.mean([np.mean(y_pred[y_true == c] == c) for c in present]))
    out["f1"] = float(f1_score(y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0))
    per_class = {}
    for c, name in enumerate(class_names):
        m = from_counts(**binary_counts(y_true, y_pred, c))
        per_class[name] = m
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            out[f"{key}[{name}]"] = m[key]
    if k == 2 or positive is not None:
        pos = class_names.index(positive) if positive is not None else 1
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            out[key] = per_class[class_names[pos]][key]
    else:
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            out[key] = float(np.nanmean([per_class[n][key] for n in class_names]))
    out["auc"] = auc(y_true, probs, positive=class_names.index(positive) if positive else None)
    return out


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


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean recall over the classes present in `y_true` (the report's headline metric)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(probs).argmax(1)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def bootstrap_ci(y_true: np.ndarray, probs: np.ndarray, metric=balanced_accuracy, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): percentile bootstrap over samples of the pooled out-of-fold predictions.

    Pooling the folds' test predictions uses every sample once, so the interval reflects the
    data set's size rather than the number of folds; resampling is seeded so reports are stable.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    point = metric(y_true, probs)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, n, n)
        stats[b] = metric(y_true[i], probs[i])
    stats = stats[~np.isnan(stats)]
    if not len(stats):
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(point), float(lo), float(hi)


def corrected_ttest(a: np.ndarray, b: np.ndarray, n_train: float, n_test: float) -> tuple[float, float]:
    """(t, two-sided p) of Nadeau & Bengio (2003): the paired t-test over folds with the variance
    inflated by (1/J + n_test/n_train), because CV folds share training data and the plain
    paired t-test is then far too eager to call a difference significant."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    j = len(d)
    if j < 2:
        return float("nan"), float("nan")
    mean, var = d.mean(), d.var(ddof=1)
    if var == 0:
        return (0.0, 1.0) if mean == 0 else (float(np.sign(mean) * np.inf), 0.0)
    t = mean / np.sqrt((1.0 / j + n_test / n_train) * var)
    return float(t), float(2 * stats.t.sf(abs(t), j - 1))


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
