"""Every registered strategy, softmax and SVM heads, on BUSI with EfficientNet-Lite0, 5 folds.

    python benchmarks/strategies_busi.py [--size 128] [--epochs 4] [--data ../shared/data/busi]

Writes benchmarks/results/strategies_busi.{md,json} (the table and the command). BUSI holds
duplicated images (see its README): folds group identical images (`duplicates: group`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import medtune
from medtune.report import format_pm, summary_table
from medtune.store import Store
from medtune.strategies import list_strategies

ROOT = Path(__file__).resolve().parent
PARAMS = {"partial_ft": {"fraction": 0.15}, "blockwise_ft": {"blocks": 2}, "lp_ft": {"lp_epochs": 4},
          "gradual_unfreeze": {"every": 1}, "surgical": {"block": "last"},
          "auto_depth": {"candidates": ["linear_probe", "partial_ft(blocks=2)", "full_ft"], "inner_folds": 2}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--store", default=str(ROOT / "results" / "strategies_busi.sqlite"))
    ap.add_argument("--skip", nargs="*", default=[], help="strategies to leave out")
    args = ap.parse_args()
    strategies = [{"name": n, **PARAMS.get(n, {})} for n in list_strategies() if n not in args.skip]
    raw = {"name": "strategies_busi", "datasets": [{"name": "busi", "path": args.data, "positive": "malignant"}],
           "backbones": [{"name": "efficientnet_lite0", "image_size": args.size}], "strategies": strategies,
           "heads": ["softmax", "svm"], "folds": args.folds, "seeds": [0], "store": args.store,
           "train": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-3, "patience": 3}}
    t0 = time.perf_counter()
    summary = medtune.run(raw)
    wall = time.perf_counter() - t0
    with Store(args.store) as s:
        table = summary_table(s.metrics())
    shown = format_pm(table)
    command = " ".join(["python", *sys.argv])
    md = [f"# Every strategy on BUSI (EfficientNet-Lite0, {args.size} px, {args.folds} folds, {args.epochs} epochs)", "",
          f"Command: `{command}`  ", f"Wall clock: {wall:.0f} s for {summary.total} cells "
          f"({summary.done} run now, {summary.skipped} resumed, {summary.failed} failed). Positive class for "
          "sensitivity/specificity/PPV/NPV: malignant. Mean ± sd over folds.", "",
          shown.drop(columns=["dataset", "backbone"]).to_markdown(index=False)]
    (ROOT / "results" / "strategies_busi.md").write_text("\n".join(md) + "\n")
    (ROOT / "results" / "strategies_busi.json").write_text(json.dumps({"command": command, "wall_seconds": wall,
                                                                     "rows": table.to_dict(orient="records")}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
