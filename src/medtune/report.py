"""Tables and (later) the HTML report, computed only from the results store."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medtune.metrics import MAIN_METRICS

GROUP = ["dataset", "backbone", "strategy", "head"]


def summary_table(metrics: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Mean and sd over folds and seeds per (dataset, backbone, strategy, head)."""
    columns = [c for c in (columns or MAIN_METRICS) if c in metrics.columns]
    agg = metrics.groupby(GROUP, sort=False)
    mean = agg[columns].mean()
    sd = agg[columns].std(ddof=1)
    out = mean.copy()
    for c in columns:
        out[f"{c}_sd"] = sd[c]
    out["n_cells"] = agg.size()
    out["seconds"] = agg["seconds"].sum()
    return out.reset_index()


SHORT = {"accuracy": "acc", "balanced_accuracy": "bal_acc", "sensitivity": "sens", "specificity": "spec",
         "ppv": "PPV", "npv": "NPV", "f1": "F1", "auc": "AUC"}


def pm(mean: float, sd: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if np.isnan(sd) else f"{mean:.{digits}f}±{sd:.{digits}f}"


def format_pm(table: pd.DataFrame, columns: list[str] | None = None, digits: int = 3) -> pd.DataFrame:
    """'mean±sd' strings for display, with short metric names."""
    columns = [c for c in (columns or MAIN_METRICS) if c in table.columns]
    out = table[GROUP].copy()
    for c in columns:
        out[SHORT.get(c, c)] = [pm(m, s, digits) for m, s in zip(table[c], table[f"{c}_sd"])]
    out["folds"] = table["n_cells"]
    out["seconds"] = table["seconds"].round(1)
    return out
