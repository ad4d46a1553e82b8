"""Parameter-efficient fine-tuning against the depth strategies on BUSI (issue 18): LoRA and SSF next
to linear_probe, partial_ft and full_ft, EfficientNet-Lite0 (ImageNet) at 224 px, 5 folds.

    python benchmarks/peft_busi.py                     # ../shared/data/busi, about an hour on 2 cores
    python benchmarks/peft_busi.py --every 10 --epochs 1   # every 10th image: a check of the script

Every strategy trains on equal terms: the same folds (identical images grouped), epochs, batch,
augmentation views, learning rate, class weighting and BatchNorm rule (the experiment's). Resumable
(cells in benchmarks/results/peft_busi[_everyN].sqlite). Writes peft_busi[_everyN].{md,json}: per
strategy the share of parameters that train, balanced accuracy and AUC (mean ± sd over folds), the
AUC as a fraction of full fine-tuning's, and the training seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

import medtune
from medtune.report.html import to_markdown
from medtune.evaluation.store import Store, read_cells

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies_busi import every_nth, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent
STRATEGIES = ["lora", "ssf", "linear_probe", {"name": "partial_ft", "blocks": 2}, "full_ft"]


def table(store: Path) -> pd.DataFrame:
    with Store(store) as s:
        m, cells = s.metrics(), read_cells(s)
    info = cells.set_index("cell_id")["info"]
    m = m.assign(trainable_fraction=m.cell_id.map(lambda c: info[c]["trainable_fraction"]),
                 strategy_label=m.cell_id.map(lambda c: info[c]["strategy_label"]))
    rows = []
    for label, g in m.groupby("strategy_label", sort=False):
        rows.append({"strategy": label, "cells": len(g), "trainable %": 100 * g.trainable_fraction.mean(),
                     "balanced_accuracy": g.balanced_accuracy.mean(),
                     "balanced_accuracy_sd": g.balanced_accuracy.std(ddof=1),
                     "auc": g.auc.mean(), "auc_sd": g.auc.std(ddof=1), "seconds": g.seconds.sum()})
    out = pd.DataFrame(rows)
    full = out.loc[out.strategy == "full_ft", "auc"]
    out["auc / full_ft"] = out.auc / float(full.iloc[0]) if len(full) else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=1, help="every N-th image of each class (a short check)")
    args = ap.parse_args()
    suffix = f"_every{args.every}" if args.every > 1 else ""
    data = every_nth(args.data, args.every) if args.every > 1 else args.data
    store = ROOT / "results" / f"peft_busi{suffix}.sqlite"
    raw = {"name": "peft_busi",
           "datasets": [{"name": "busi", "path": data, "positive": "malignant", "duplicates": "group"}],
           "backbones": [{"name": "efficientnet_lite0", "image_size": 224}], "strategies": STRATEGIES,
           "heads": ["softmax"], "folds": 5, "seeds": [0], "store": str(store), "keep_best": False,
           "train": {"epochs": args.epochs, "batch_size": 32, "lr": args.lr, "patience": 3}}
    t0 = time.perf_counter()
    summary = medtune.run(raw)
    wall = time.perf_counter() - t0
    t = table(store)
    command = " ".join(["python", *sys.argv])
    shown = pd.DataFrame({
        "strategy": t.strategy, "trainable params": t["trainable %"].map(lambda v: f"{v:.2f}%"),
        "balanced accuracy": [f"{a:.3f} ± {s:.3f}" for a, s in zip(t.balanced_accuracy, t.balanced_accuracy_sd)],
        "AUC": [f"{a:.3f} ± {s:.3f}" for a, s in zip(t.auc, t.auc_sd)],
        "AUC / full_ft": t["auc / full_ft"].map(lambda v: f"{100 * v:.0f}%"),
        "train s (5 folds)": t.seconds.map(lambda v: f"{v:.0f}")})
    md = ["# LoRA and SSF against the depth strategies on BUSI (EfficientNet-Lite0, 224 px, 5 folds"
          f"{f', every {args.every}th image' if args.every > 1 else ''})",
          "", f"Command: `{command}`  ",
          f"Measured {time.strftime('%Y-%m-%d %H:%M')}, 2 CPU cores; wall clock {wall:.0f} s for {summary.total} cells "
          f"({summary.done} run now, {summary.skipped} resumed, {summary.failed} failed). Every strategy: "
          f"{args.epochs} epochs, lr {args.lr:g} (one rate for all: no choice), batch 32, 4 augmentation views, "
          "class_weight balanced, BatchNorm rule `update`, early stopping on the inner validation split. Trainable "
          "params: the share of the (adapted) model's parameters that received a gradient, the new 3-class head "
          "included. Mean ± sd over folds; positive class malignant.", "",
          to_markdown(shown.set_index("strategy"), "strategy")]
    write_results(f"peft_busi{suffix}", md, summary.collapsed,
                  {"command": command, "wall_seconds": wall, "rows": t.to_dict(orient="records")})


if __name__ == "__main__":
    main()
