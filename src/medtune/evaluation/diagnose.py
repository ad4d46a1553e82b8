"""Diagnoses of finished cells that the metrics alone do not shout: a collapsed model.

A model that predicts one class for (almost) every test image has a balanced accuracy near
1 / k and an AUC that can still look like chance or better; on imbalanced data it is the
majority-class model, and its fold mean looks like a weak strategy rather than a failed fit.
On a real 1:5.4 ultrasound set every strategy of the demo grid did exactly that, with nothing
in the output saying so (issue 15). A cell whose test-fold predictions put at least
`COLLAPSE_SHARE` of the images in one class, where the true labels have more than one class and
that class holds less than that share, is flagged in its `info`, in the run's output, in
`medtune results` and in the report, with what to try.

A fold can also fail without reaching 95%: on DDTI two full_ft folds called 82-86% of the images
benign where 15% are, with a sensitivity of 0.17. `collapse` therefore also flags a fold by its
class mix (MIX_RATIO, MIX_SHIFT, MIX_RECALL): one class predicted at least twice as often as it
occurs, which moves at least a quarter of the fold into it, while the other classes' mean recall is
at most one half. Each condition alone is a plausible working model (a class-weighted model
over-calls a small class; a hard fold has low recall); together they describe a model that calls
most images one class whatever they are.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from medtune.evaluation.metrics import balanced_accuracy_score

COLLAPSE_SHARE = 0.95
MIX_RATIO = 2.0  # predicted share of a class >= this x its true share ...
MIX_SHIFT = 0.25  # ... moving at least this share of the fold into it ...
MIX_RECALL = 0.5  # ... while the other classes' mean recall is at most this

ADVICE = ("try: train.class_weight: balanced (the default) if it is off; a learning-rate choice such as "
          "lr: {choose: [1e-4, 3e-4, 1e-3]} (a too-high rate often ends in one class); bn_statistics: keep with "
          "a lower lr; more epochs or patience; the svm head")


def collapse(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
             share: float = COLLAPSE_SHARE) -> dict | None:
    """The collapse record of one cell's test-fold predictions, or None if the predictions are spread
    (module docstring: one class for `share` of the fold, or far off the fold's class mix)."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0 or len(np.unique(y_true)) < 2:
        return None
    pred = np.asarray(probs).argmax(1)
    counts = np.bincount(pred, minlength=len(class_names))
    top = int(counts.argmax())
    predicted, true = counts[top] / len(pred), float(np.mean(y_true == top))
    if true >= share:
        return None
    if predicted >= share:
        return {"class": class_names[top], "predicted_share": round(float(predicted), 4),
                "true_share": round(true, 4), "advice": ADVICE}
    rest = y_true != top  # the other classes' images: their balanced accuracy is their mean recall
    recall = balanced_accuracy_score(y_true[rest], pred[rest])
    if predicted >= MIX_RATIO * true and predicted - true >= MIX_SHIFT and recall <= MIX_RECALL:
        return {"class": class_names[top], "predicted_share": round(float(predicted), 4),
                "true_share": round(true, 4), "other_recall": round(recall, 4), "rule": "class mix",
                "advice": ADVICE}
    return None


def advice(config: dict | None) -> str:
    """What to try after a collapse, leaving out what the cell's own config already does (a line that
    suggests the value already set sends a user in a circle)."""
    train = (config or {}).get("train", {})
    lr = (config or {}).get("strategy", {}).get("lr", train.get("lr"))
    tips = ([] if train.get("class_weight") == "balanced" else ["train.class_weight: balanced (the default)"]) + \
           ([] if isinstance(lr, dict) else ["a learning-rate choice such as lr: {choose: [1e-4, 3e-4, 1e-3]} "
                                             "(a too-high rate often ends in one class)"]) + \
           ([] if train.get("bn_statistics") == "keep" else ["bn_statistics: keep with a lower lr"]) + \
           ["more epochs or patience", "the svm head"]
    return "try: " + "; ".join(tips)


def describe(cell: dict, record: dict) -> str:
    """One line for the run's output and `medtune results`."""
    recall = (f", the other classes' mean recall {record['other_recall']:.2f}" if "other_recall" in record else "")
    tip = advice(cell.get("config")) if cell.get("config") else record["advice"]
    return (f"collapsed: {cell['dataset']} {cell['backbone']} {cell['strategy']} {cell['head']} fold {cell['fold']} "
            f"predicts {record['class']!r} for {record['predicted_share']:.0%} of the test fold "
            f"({record['true_share']:.0%} truly are{recall}); {tip}")


def collapsed_cells(cells, predictions=None, class_names: dict | None = None) -> list[str]:
    """Lines for every flagged cell of a `store.read_cells` frame (info parsed). With the store's
    `predictions` and {data set: class names}, the rule is applied now, so a store written under an
    older rule gets today's diagnosis; else the record each cell stored."""
    by_cell = dict(tuple(predictions.groupby("cell_id"))) if predictions is not None else None
    out = []
    for _, r in cells.iterrows():
        info = r["info"] if isinstance(r["info"], dict) else {}
        record = info.get("collapsed")
        if by_cell is not None and class_names and r["cell_id"] in by_cell:
            p = by_cell[r["cell_id"]]
            record = collapse(p["y_true"].to_numpy(), np.array(p["probs"].tolist(), dtype=float),
                              class_names[r["dataset"]])
        if record:
            row = r.to_dict()
            if "config" not in row and isinstance(row.get("config_json"), str):
                row["config"] = json.loads(row["config_json"])
            out.append(describe(row, record))
    return out


# --------------------------------------------------------------------------- a budget that ended the training
BUDGET_SHARE = 0.8  # best epoch = last epoch in at least this share of a group's folds


def budget_limited(cells) -> pd.DataFrame:
    """One row per data set, backbone, strategy and head whose best epoch (on the inner validation
    split) was its last one in at least BUDGET_SHARE of its cells: still improving when the epochs ran
    out, so more epochs might change the ranking. A convex probe (no epochs) is never budget-limited."""
    rows: dict[tuple, list[bool]] = {}
    for _, r in cells.iterrows():
        info = r["info"] if isinstance(r["info"], dict) else {}
        history = info.get("history") or []
        run = info.get("epochs_run", len(history))
        if not run or info.get("best_epoch") is None or any("probe_C" in h for h in history):
            continue
        key = (r["dataset"], r["backbone"], r["strategy"], r["head"])
        rows.setdefault(key, []).append(int(info["best_epoch"]) >= int(run) - 1)
    out = [{"dataset": ds, "backbone": bb, "strategy": st, "head": hd, "last": sum(v), "cells": len(v)}
           for (ds, bb, st, hd), v in rows.items() if sum(v) / len(v) >= BUDGET_SHARE]
    return pd.DataFrame(out, columns=["dataset", "backbone", "strategy", "head", "last", "cells"])


def budget_lines(cells) -> list[str]:
    """Lines for `medtune results`, the report and the verdict, one per budget-limited group."""
    return [f"budget-limited: {r.dataset} {r.backbone} {r.strategy} {r['head']}: the best epoch was the last one in "
            f"{r['last']} of {r.cells} folds; more epochs might change the ranking (raise train.epochs)"
            for _, r in budget_limited(cells).iterrows()]


# --------------------------------------------------------------------------- a head's own choice at its grid's end
def head_choices(cells) -> pd.DataFrame:
    """The probe's C, the SVM's C and the kNN's k chosen on each fold's inner split (info keys
    `probe_C`, `svm_C`, `knn_k`, or the probe's history row), as `chosen_values` rows, so `edge_choices`
    flags a pick pinned at its grid's end. These grids widen past an end that wins (probe.search), and a
    cell records what it searched (`grids`) and whether its pick stayed at a bound the search could not
    pass (`grid_edges`): where cells record that, it decides, since a pick at the start grid's end is
    inside the searched one. Stores written before the widening are judged against the start grid (and
    the `*_at_edge` flags they recorded)."""
    from medtune.models.heads import HEADS
    from medtune.models.probe import C_GRID as PROBE_GRID

    grids = {"probe_C": list(PROBE_GRID), **{h.info_key: list(h.grid) for h in HEADS.values() if h.info_key}}
    rows: dict[tuple, dict] = {}
    for _, r in cells.sort_values(["seed", "fold"], kind="stable").iterrows():
        info = r["info"] if isinstance(r["info"], dict) else {}
        found = {k: info[k] for k in grids if info.get(k) is not None}
        for h in info.get("history") or []:
            if "probe_C" in h and "probe_C" not in found:
                found["probe_C"] = h["probe_C"]
        for key, value in found.items():
            row = rows.setdefault((r["dataset"], r["backbone"], r["strategy"], key),
                                  {"folds": {}, "flag": 0, "searched": set(), "bound": []})
            row["folds"].setdefault((r["seed"], r["fold"]), value)
            row["flag"] += bool(info.get(f"{key}_at_edge"))
            row["searched"] |= set((info.get("grids") or {}).get(key) or [])
            if (info.get("grid_edges") or {}).get(key):
                row["bound"].append(info["grid_edges"][key])
    out = []
    for (ds, bb, st, key), row in rows.items():
        picks = list(row["folds"].values())
        if row["searched"]:  # the cells say what they searched and where a pick stayed at a bound
            candidates = sorted(row["searched"])
            hits = len(row["bound"])
            edge = {"pinned": (f"at the bound of its search ({'/'.join(sorted(set(row['bound'])))}) in {hits} of "
                               f"{len(picks)} folds") if hits >= max(1, EDGE_SHARE * len(picks)) else "", "try": ""}
        else:
            candidates = grids[key]
            edge = _edge(key, candidates, picks)
            if not edge["pinned"] and row["flag"] >= max(2, EDGE_SHARE * len(picks)):
                edge = {"pinned": f"at its grid's edge in {row['flag']} of {len(picks)} folds", "try": ""}
        if edge["pinned"]:  # medtune's own grid, not a config list: nothing to extend in the YAML
            edge["try"] = ""
        out.append({"dataset": ds, "backbone": bb, "strategy": st, "hyperparameter": key,
                    "candidates": ", ".join(map(_text, candidates)), "chosen per fold": ", ".join(map(_text, picks)),
                    **edge})
    cols = ["dataset", "backbone", "strategy", "hyperparameter", "candidates", "chosen per fold", "pinned", "try"]
    return pd.DataFrame(out, columns=cols)


# --------------------------------------------------------------------------- choices at the edge of their list
EDGE_SHARE = 0.8  # the same end of the list in at least this share of a group's folds (4 of 5, all of 2 or 3)


def choice_lists(config: dict) -> dict[str, list]:
    """A cell config's `{choose: [...]}` lists by hyperparameter: the strategy's own (its `lr` among them),
    else `train.lr`, the chain `train_for_cell` follows (auto_depth's candidates share `train.lr`)."""
    from medtune.config import choice_values, is_choice

    strategy = config.get("strategy", {})
    if any(is_choice(v) for c in strategy.get("candidates", []) for v in c.values()):
        return {}  # auto_depth's candidates with lists of their own: a pick cannot be set against one list
    out = {k: choice_values(v) for k, v in strategy.items() if is_choice(v)}
    if "lr" not in out and is_choice(config.get("train", {}).get("lr")):
        out["lr"] = choice_values(config["train"]["lr"])
    return out


def chosen_values(cells) -> pd.DataFrame:
    """One row per data set, backbone, strategy and chosen hyperparameter of a `store.read_cells` frame:
    the candidate list, the value chosen on each fold's inner split (folds in order; the heads of one
    fold share their training, so each fold counts once) and, where the pick sat at the same end of a
    numeric list of three or more values in at least EDGE_SHARE of the folds, which end (`pinned`) and
    the list shifted one step past it (`try`)."""
    rows: dict[tuple, dict] = {}
    for _, r in cells.sort_values(["seed", "fold", "head"], kind="stable").iterrows():
        info = r["info"] if isinstance(r["info"], dict) else {}
        chosen = (info.get("choice") or info.get("auto_depth") or {}).get("chosen") or {}
        config = json.loads(r["config_json"]) if isinstance(r.get("config_json"), str) else r.get("config", {})
        for key, values in choice_lists(config).items():
            if key not in chosen:
                continue
            row = rows.setdefault((r["dataset"], r["backbone"], r["strategy"], key),
                                  {"values": values, "folds": {}})
            row["folds"].setdefault((r["seed"], r["fold"]), chosen[key])
    out = [{"dataset": ds, "backbone": bb, "strategy": st, "hyperparameter": key,
            "candidates": ", ".join(map(_text, row["values"])),
            "chosen per fold": ", ".join(_text(v) for v in row["folds"].values()),
            **_edge(key, row["values"], list(row["folds"].values()))}
           for (ds, bb, st, key), row in rows.items()]
    cols = ["dataset", "backbone", "strategy", "hyperparameter", "candidates", "chosen per fold", "pinned", "try"]
    return pd.DataFrame(out, columns=cols).sort_values(cols[:4], kind="stable", ignore_index=True)


def edge_choices(table: pd.DataFrame) -> list[str]:
    """Lines for `medtune results` and the report from a `chosen_values` table: the choices pinned at an end
    of their list, one line per data set, backbone, list and end, naming every strategy pinned there."""
    t = table[table["pinned"] != ""]
    lines = []
    for (ds, bb, key, cands, tried), g in t.groupby(["dataset", "backbone", "hyperparameter", "candidates", "try"],
                                                    sort=False):
        groups = ", ".join(f"{r.strategy} ({r.pinned})" for _, r in g.iterrows())
        lines.append(f"choice at its edge: {ds} {bb}: {key} from [{cands}] was pinned at one end for {groups}; the "
                     "best value may lie beyond it: " + (f"extend the list, e.g. {tried}" if tried else
                                                          "the grid is medtune's own (not a config list)"))
    return lines


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _edge(key: str, values: list, picks: list) -> dict[str, str]:
    """Where the picks pile up at one end of a numeric list: the best value may lie beyond it, so the
    cells measured the list, not the method. Empty when the list is short or the picks are spread."""
    none = {"pinned": "", "try": ""}
    nums = sorted({v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if len(nums) < 3 or len(nums) != len(values) or len(picks) < 2:
        return none
    for end, inner, word in ((nums[-1], nums[-2], "largest"), (nums[0], nums[1], "smallest")):
        hits = sum(p == end for p in picks)
        if hits / len(picks) < EDGE_SHARE:
            continue
        if word == "smallest" and end == 0:
            return none  # none of it (alpha 0, no regularisation) is an answer, not a boundary
        beyond = end * end / inner if end > 0 and inner > 0 else end + (end - inner)
        beyond = round(beyond) if all(isinstance(v, int) for v in nums) else float(f"{beyond:.1g}")
        listed = ", ".join(map(_text, [*nums[1:], beyond] if word == "largest" else [beyond, *nums[:-1]]))
        return {"pinned": f"{word} {_text(end)} in {hits} of {len(picks)} folds",
                "try": f"{key}: {{choose: [{listed}]}}"}
    return none
