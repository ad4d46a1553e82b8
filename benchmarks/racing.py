"""What racing saves, and whether it changes the answer: one grid run twice in one process.

(b) medtune without racing: every strategy x fold, each with a 3-value learning-rate choice made
    on the inner validation split;
(c) the same grid with `racing: on` (racing.py: candidates stopped when their inner-validation
    scores show them worse than the leader by more than the margin) and `halving: on` (each
    learning-rate choice by successive halving on the inner split, select.py).

Strategies (issue 19): linear_probe, the SVM head on frozen features, partial_ft(blocks=2), lp_ft,
full_ft and l2_sp; Lite0 on BUSI. For each way it prints and stores the training seconds summed
over cells ("cell-seconds"), the wall clock, the recommended strategy (the leader on inner
validation scores, racing.leaders, for both ways: no test fold takes part) and that strategy's
outer estimate (mean balanced accuracy over the outer test folds, with the fold sd).

    python benchmarks/racing.py                      # 224 px, 5 folds, 4 epochs, all of BUSI (hours here)
    python benchmarks/racing.py --every 10 --epochs 3  # every 10th image of each class (minutes)

Results: benchmarks/results/racing[_everyN].json. Not yet here: issue 19's way (a), the
hand-written reference loop over every strategy x rate x fold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import medtune
from medtune.racing import leaders
from medtune.store import Store

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from grid_speed import every_nth  # noqa: E402  (benchmarks/ is not a package)

LRS = [3e-4, 1e-3, 3e-3]


def grid(data: str, size: int, folds: int, epochs: int, store: str, racing: bool) -> dict:
    choose = {"choose": LRS}
    base = {
        "name": "racing", "datasets": [{"name": "busi", "path": data}],
        "backbones": [{"name": "efficientnet_lite0", "image_size": size}],
        "folds": folds, "seeds": [0], "store": store, "keep_best": False,
        "train": {"epochs": epochs, "batch_size": 32, "lr": choose, "patience": epochs},
        "racing": "on" if racing else "off", "halving": racing,
    }
    # heads x strategies: the SVM head of each strategy is its own candidate; it shares the softmax
    # cell's training (cells.run_cell), so it costs an SVM fit, not another training run
    return {**base, "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 2}, "lp_ft", "full_ft", "l2_sp"],
            "heads": ["softmax", "svm"]}


def measure(raw: dict) -> dict:
    t0 = time.perf_counter()
    summary = medtune.run(raw, progress=False)
    wall = time.perf_counter() - t0
    with Store(raw["store"]) as s:
        m = s.metrics()
        lead = leaders(s, "balanced_accuracy").get("busi")
    rows = m.groupby("group").agg(strategy=("strategy", "first"), head=("head", "first"),
                                  bacc=("balanced_accuracy", "mean"), sd=("balanced_accuracy", "std"),
                                  folds=("fold", "count"), seconds=("seconds", "sum"), pruned=("pruned", "first"))
    best = rows.loc[lead]
    return {"wall_seconds": wall, "cell_seconds": float(m["seconds"].sum()), "cells_run": int(summary.done),
            "pruned": list(summary.pruned.values()),
            "recommended": f"{best.strategy} · {best['head']}", "recommended_bacc": float(best.bacc),
            "recommended_sd": float(best.sd),
            "rows": [{"strategy": r.strategy, "head": r["head"], "bacc": round(float(r.bacc), 4),
                      "sd": round(float(r.sd), 4) if np.isfinite(r.sd) else None, "folds": int(r.folds),
                      "seconds": round(float(r.seconds), 1), "pruned": bool(r.pruned)} for _, r in rows.iterrows()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--every", type=int, default=1, help="use every N-th image of each class")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    data = every_nth(args.data, args.every) if args.every > 1 else args.data
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.mkdtemp()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "size": args.size, "folds": args.folds,
              "epochs": args.epochs, "every": args.every, "lrs": LRS, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    for way, racing in (("b_no_racing", False), ("c_racing", True)):
        print(f"({way}) {data} @ {args.size}px, {args.folds} folds, {args.epochs} epochs, lr choose {LRS}", flush=True)
        result[way] = measure(grid(data, args.size, args.folds, args.epochs, os.path.join(tmp, f"{way}.sqlite"), racing))
        r = result[way]
        print(f"  {r['cell_seconds']:.0f} cell-seconds, {r['wall_seconds']:.0f} s wall; recommends {r['recommended']} "
              f"(outer {r['recommended_bacc']:.3f} ± {r['recommended_sd']:.3f}); pruned {len(r['pruned'])}", flush=True)
    b, c = result["b_no_racing"], result["c_racing"]
    result["training_seconds_ratio_b_over_c"] = b["cell_seconds"] / max(c["cell_seconds"], 1e-9)
    result["same_recommendation"] = b["recommended"] == c["recommended"]
    result["estimate_within_one_sd"] = abs(b["recommended_bacc"] - c["recommended_bacc"]) <= b["recommended_sd"]
    print(f"(b)/(c) training seconds: {result['training_seconds_ratio_b_over_c']:.2f}x; same recommendation: "
          f"{result['same_recommendation']}; estimate within one fold-sd: {result['estimate_within_one_sd']}")
    out = ROOT / "results" / f"racing{f'_every{args.every}' if args.every > 1 else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
