"""evaluation/diagnose.py's read-time diagnoses the verdict cites: collapse by class mix, budget-limited
strategies, a head's own C / k pinned at its grid's end. Each rule is tested on both sides."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medtune.evaluation.diagnose import budget_limited, budget_lines, collapse, edge_choices, head_choices

NAMES = ["benign", "malignant"]


def fold(true_benign: int, called_benign_of_benign: int, called_benign_of_malignant: int, n: int = 100):
    """A binary test fold: labels and one-hot predictions with the given counts."""
    y = np.array([0] * true_benign + [1] * (n - true_benign))
    pred = np.concatenate([np.where(np.arange(true_benign) < called_benign_of_benign, 0, 1),
                           np.where(np.arange(n - true_benign) < called_benign_of_malignant, 0, 1)])
    return y, np.eye(2)[pred]


def test_a_fold_called_mostly_benign_where_few_are_is_collapsed():
    """DDTI: 15% benign, 85% called benign, sensitivity for malignant 0.17 (not 95% of one class)."""
    y, p = fold(15, 15, 70)  # 85 called benign; malignant recall 15/85 = 0.18
    record = collapse(y, p, NAMES)
    assert record is not None and record["class"] == "benign" and record["rule"] == "class mix"
    assert record["predicted_share"] == 0.85 and record["true_share"] == 0.15 and record["other_recall"] < 0.2


def test_over_calling_a_class_with_the_others_still_found_is_not_collapsed():
    y, p = fold(15, 15, 15)  # 30 called benign (2x) but malignant recall 0.82
    assert collapse(y, p, NAMES) is None
    y, p = fold(5, 5, 7)  # 12% called where 5% are (2.4x), only 7 points moved
    assert collapse(y, p, NAMES) is None
    y, p = fold(50, 50, 30)  # 80% called benign where 50% are: 1.6x, a weak model, not a collapse
    assert collapse(y, p, NAMES) is None


def test_the_95_percent_rule_still_holds():
    y, p = fold(30, 30, 67)  # 97% benign
    assert collapse(y, p, NAMES)["predicted_share"] == 0.97


def cells(rows: list[dict]) -> pd.DataFrame:
    base = {"dataset": "d", "backbone": "b", "head": "softmax", "seed": 0}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_budget_limited_when_the_best_epoch_is_the_last_in_most_folds():
    c = cells([{"strategy": "full_ft", "fold": f, "info": {"best_epoch": 9, "epochs_run": 10}} for f in range(4)]
              + [{"strategy": "full_ft", "fold": 4, "info": {"best_epoch": 3, "epochs_run": 10}}]
              + [{"strategy": "partial_ft", "fold": f, "info": {"best_epoch": 9 if f < 3 else 5, "epochs_run": 10}}
                 for f in range(5)]
              + [{"strategy": "linear_probe", "fold": f, "info": {"best_epoch": 0, "epochs_run": 1,
                                                                 "history": [{"probe_C": 1.0}]}} for f in range(5)])
    t = budget_limited(c)
    assert list(t.strategy) == ["full_ft"] and int(t["last"].iloc[0]) == 4  # 4 of 5 = 80%; partial 3 of 5 is not
    assert budget_lines(c)[0].startswith(
        "budget-limited: d b full_ft softmax: the best epoch was the last one in 4 of 5")


def test_a_heads_own_choice_pinned_at_its_grid_end_is_flagged():
    from medtune.models.heads import C_GRID

    c = cells([{"strategy": "full_ft", "head": "svm", "fold": f, "info": {"svm_C": C_GRID[-1]}} for f in range(5)]
              + [{"strategy": "partial_ft", "head": "knn", "fold": f, "info": {"knn_k": [5, 11, 21, 11, 5][f]}}
                 for f in range(5)])
    t = head_choices(c)
    pinned = t[t.pinned != ""]
    assert list(pinned.hyperparameter) == ["svm_C"] and pinned.pinned.iloc[0].startswith("largest 0.01 in 5 of 5")
    lines = edge_choices(t)
    assert len(lines) == 1 and "svm_C" in lines[0] and "full_ft" in lines[0]


def test_a_choice_inside_its_widened_grid_is_not_pinned():
    """The probe's and heads' grids widen past an end that wins (probe.search) and each cell records the grid it
    searched and whether the pick still sat at a bound (`grids`, `grid_edges`). On BUSI the probe chose C 1e-3 in
    every fold after widening down to 1e-4: the smallest of the start grid, inside the searched one, so not
    pinned. A pick at a bound the search could not pass is pinned."""
    from medtune.models.probe import C_GRID

    searched = [C_GRID[0] / 10, *C_GRID]
    inside = cells([{"strategy": "linear_probe", "fold": f,
                     "info": {"probe_C": C_GRID[0], "grids": {"probe_C": searched}}} for f in range(5)])
    t = head_choices(inside)
    assert list(t.pinned) == [""] and t.candidates.iloc[0].startswith("0.0001")
    at_bound = cells([{"strategy": "linear_probe", "fold": f,
                       "info": {"probe_C": 1e-6, "grids": {"probe_C": [1e-6, *searched]},
                                "grid_edges": {"probe_C": "low"}}} for f in range(5)])
    t = head_choices(at_bound)
    assert t.pinned.iloc[0] == "at the bound of its search (low) in 5 of 5 folds"
