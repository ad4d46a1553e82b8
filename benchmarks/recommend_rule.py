"""What each recommendation rule (`recommend: leader` | `one_se`) picks from a finished store, and how
the two picks compare on the outer folds (paired, same folds), as the verdict reads the store.

    python benchmarks/recommend_rule.py benchmarks/results/strategies_busi.sqlite results/demo.sqlite

Both rules choose on inner-validation scores only; the outer-fold figures printed here describe the
picks, they are not used to set the default (that would tune a default on test folds).
Results: benchmarks/results/recommend_rule.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from medtune.evaluation.evidence import choices, label, read_evidence
from medtune.evaluation.headline import RULES

OUT = Path(__file__).resolve().parent / "results" / "recommend_rule.json"


def picks(store: str) -> list[dict]:
    ev = read_evidence(store)
    rows = []
    by_group = ev.metrics.groupby("group")
    for rule in RULES:
        ev.config["recommend"] = rule
        for ds, (group, how, leader) in choices(ev).items():
            m = by_group.get_group(group)
            first = ev.cells[ev.cells.group == group].iloc[0]
            rows.append({"store": store, "dataset": ds, "rule": rule, "how": how, "pick": label(first),
                         "trainable_share": float(first["info"].get("trainable_fraction", np.nan)),
                         "inner_mean": float(np.nanmean([ev.inner.get(c, np.nan) for c in m.cell_id])),
                         "outer_mean": float(m.balanced_accuracy.mean()), "outer_sd": float(m.balanced_accuracy.std()),
                         "folds": {f"{r.seed}/{r.fold}": float(r.balanced_accuracy) for r in m.itertuples()}})
    return rows


def main() -> None:
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for store in sys.argv[1:]:
        rows = picks(store)
        for ds in dict.fromkeys(r["dataset"] for r in rows):
            a, b = [next(r for r in rows if r["dataset"] == ds and r["rule"] == rule) for rule in ("leader", "one_se")]
            shared = sorted(set(a["folds"]) & set(b["folds"]))
            diff = [a["folds"][k] - b["folds"][k] for k in shared]
            entry = {"leader": a, "one_se": b, "leader_minus_one_se": {
                "mean": float(np.mean(diff)) if diff else None, "per_fold": diff}}
            results[f"{Path(store).name}:{ds}"] = entry
            print(f"{Path(store).name} {ds}: leader {a['pick']} {a['outer_mean']:.3f}±{a['outer_sd']:.3f} "
                  f"(share {a['trainable_share']:.2%}); one_se {b['pick']} {b['outer_mean']:.3f}±{b['outer_sd']:.3f} "
                  f"(share {b['trainable_share']:.2%}); leader - one_se {np.mean(diff) if diff else float('nan'):+.3f}")
    OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
