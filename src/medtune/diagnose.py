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

import json

import numpy as np
import pandas as pd

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
                     f"best value may lie beyond it: extend the list, e.g. {tried}")
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
        return {"pinned": f"{word} {_text(end)} in {hits} of {len(picks)} folds", "try": f"{key}: {{choose: [{listed}]}}"}
    return none
