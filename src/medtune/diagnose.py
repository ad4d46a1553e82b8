"""Diagnoses of finished cells that the metrics alone do not shout: a collapsed model.

A model that predicts one class for (almost) every test image has a balanced accuracy near
1 / k and an AUC that can still look like chance or better; on imbalanced data it is the
majority-class model, and its fold mean looks like a weak strategy rather than a failed fit.
On a real 1:5.4 ultrasound set every strategy of the demo grid did exactly that, with nothing
in the output saying so (issue 15). A cell whose test-fold predictions put at least
`COLLAPSE_SHARE` of the images in one class, where the true labels have more than one class and
that class holds less than that share, is flagged in its `info`, in the run's output, in
`medtune results` and in the report, with what to try.
"""

from __future__ import annotations

import numpy as np

COLLAPSE_SHARE = 0.95

ADVICE = ("try: train.class_weight: balanced (the default) if it is off; a learning-rate choice such as "
          "lr: {choose: [1e-4, 3e-4, 1e-3]} (a too-high rate often ends in one class); bn_statistics: keep with "
          "a lower lr; more epochs or patience; the svm head")


def collapse(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
             share: float = COLLAPSE_SHARE) -> dict | None:
    """The collapse record of one cell's test-fold predictions, or None if the predictions are spread."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0 or len(np.unique(y_true)) < 2:
        return None
    pred = np.asarray(probs).argmax(1)
    counts = np.bincount(pred, minlength=len(class_names))
    top = int(counts.argmax())
    predicted, true = counts[top] / len(pred), float(np.mean(y_true == top))
    if predicted < share or true >= share:
        return None
    return {"class": class_names[top], "predicted_share": round(float(predicted), 4),
            "true_share": round(true, 4), "advice": ADVICE}


def describe(cell: dict, record: dict) -> str:
    """One line for the run's output and `medtune results`."""
    return (f"collapsed: {cell['dataset']} {cell['backbone']} {cell['strategy']} {cell['head']} fold {cell['fold']} "
            f"predicts {record['class']!r} for {record['predicted_share']:.0%} of the test fold "
            f"({record['true_share']:.0%} truly are); {record['advice']}")


def collapsed_cells(cells) -> list[str]:
    """Lines for every flagged cell of a `store.read_cells` frame (info parsed)."""
    out = []
    for _, r in cells.iterrows():
        info = r["info"] if isinstance(r["info"], dict) else {}
        if info.get("collapsed"):
            out.append(describe(r.to_dict(), info["collapsed"]))
    return out
