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
            return float(roc_auc_score(y_true == (positive if positive is not None else 1), probs[:, positive or 1]))
        if positive is not None:
            return float(roc_auc_score(y_true == positive, probs[:, positive]))
        if len(np.unique(y_true)) < k:
            return float("nan")
        return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    except ValueError:
        return float("nan")


def confusion(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, np.asarray(probs).argmax(1), labels=list(range(n_classes)))
