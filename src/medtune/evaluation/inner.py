"""Inner-validation scores read back from the store: what racing compares between candidates and what
the verdict ranks by. A cell's score is recomputed from its stored inner-validation predictions, so
every reader (a resumed race, `results`, the report) sees the same number for it."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from medtune.evaluation.metrics import clinical_metrics
from medtune.evaluation.store import Store


@dataclass(frozen=True)
class Score:
    """A done cell's inner-validation score and the sizes the corrected t-test needs."""
    value: float
    n_val: int
    n_fit: int


def inner_scores(store: Store, cell_ids: Iterable[str], metric: str) -> dict[str, Score]:
    """{cell id: Score} for the done cells among `cell_ids` that stored inner-validation predictions."""
    ids = list(cell_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = store.conn.execute(
        f"SELECT e.cell_id, e.y_true, e.probs_json, c.info_json, d.class_names_json, d.info_json "
        f"FROM extra_predictions e "
        f"JOIN cells c USING (cell_id) JOIN datasets d ON d.dataset = c.dataset "
        f"WHERE e.kind='inner_val' AND c.status='done' AND e.cell_id IN ({marks}) ORDER BY e.cell_id, e.sample",
        ids).fetchall()
    by_cell: dict[str, list] = defaultdict(list)
    meta: dict[str, tuple[str, str, str]] = {}
    for cid, y, probs, info, names, ds_info in rows:
        by_cell[cid].append((y, probs))
        meta[cid] = (info, names, ds_info)
    out = {}
    for cid, pairs in by_cell.items():
        info, names, ds_info = meta[cid]
        y = np.asarray([p[0] for p in pairs])
        probs = np.asarray([json.loads(p[1]) for p in pairs])
        positive = json.loads(ds_info).get("positive")  # the AUC of the data set's positive class
        value = clinical_metrics(y, probs, json.loads(names), positive=positive).get(metric, math.nan)
        n_train = int(json.loads(info).get("n_train", 0))
        out[cid] = Score(float(value), len(y), max(n_train - len(y), 1))
    return out
