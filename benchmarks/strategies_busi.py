"""Every registered strategy and auto_depth, softmax and SVM heads, on BUSI with EfficientNet-Lite0
at 224 px, 5 folds, the learning rate chosen per outer fold on its inner split; plus a reference row:
scikit-learn's LogisticRegression on the same frozen Lite0 features and the same folds.

    python benchmarks/strategies_busi.py --data ../shared/data/busi   # the full benchmark (hours on 2 cores)
    python benchmarks/strategies_busi.py --every 10      # every 10th image of each class: a check
    python benchmarks/strategies_busi.py --skip auto_depth bitfit
    python benchmarks/strategies_busi.py --only bitfit ssf --lr 3e-4 1e-3 3e-3   # another rate list, its own table

Resumable: cells live in benchmarks/results/strategies_busi[_everyN].sqlite and a rerun skips
the finished ones; the reference row is kept in ..._logreg.json (keyed by the data fingerprint,
size and folds) and recomputed only when those change. Writes strategies_busi[_everyN].{md,json}
(the table and the command). BUSI holds duplicated images (see its README): folds group
identical images (`duplicates: group`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import medtune
from medtune.models.backbones import create_backbone, preprocessing
from medtune.config import load_config
from medtune.evaluation.diagnose import chosen_values, edge_choices
from medtune.evaluation.metrics import clinical_metrics
from medtune.report.html import format_pm, summary_table, to_markdown
from medtune.grid.cells import prepare
from medtune.evaluation.store import Store, read_cells
from medtune.training.strategies import list_strategies

ROOT = Path(__file__).resolve().parent
LR_CHOICE = [1e-4, 3e-4, 1e-3]
PARAMS = {"partial_ft": {"fraction": 0.15}, "blockwise_ft": {"blocks": 2}, "lp_ft": {"lp_epochs": 4},
          "gradual_unfreeze": {"every": 1}, "surgical": {"block": "last"}}
AUTO_DEPTH = {"name": "auto_depth", "candidates": ["linear_probe", "partial_ft(blocks=2)", "full_ft"], "inner_folds": 2}
LOGREG_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
REFERENCE = "sklearn_logreg (frozen features)"


def every_nth(data: str, n: int) -> str:
    """A folder of links to every n-th image (sorted by name) of each class folder of `data`, at a fixed
    path (the path is part of each cell's id, so a rerun resumes)."""
    out = Path(tempfile.gettempdir()) / f"medtune_{Path(data).name}_every{n}"
    for cls in sorted(p for p in Path(data).iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[::n]:
            if not (out / cls.name / f.name).exists():
                (out / cls.name / f.name).symlink_to(f.resolve())
    return str(out)


@torch.no_grad()
def frozen_features(table, size: int) -> np.ndarray:
    """Lite0's pre-logits features of every plain image, in fp32, with timm alone (no medtune loop)."""
    model = create_backbone("efficientnet_lite0", pretrained=True, num_classes=table.num_classes).eval()
    pre = preprocessing(model)
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    out = []
    for s in range(0, len(table), 64):
        x = (table.images[s:s + 64].float() / 255 - mean) / std
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out).numpy()


def logreg_reference(cfg, size: int, folds: int, cache: Path) -> pd.DataFrame:
    """Per-fold metrics of a class-balanced LogisticRegression on frozen features: C chosen on the same
    inner (fit, validation) split medtune uses, refitted on both, scored on the outer test fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = prepare(cfg.datasets[0], size, folds)
    key = {"fingerprint": data.table.fingerprint(), "size": size, "folds": folds}
    if cache.exists() and json.loads(cache.read_text()).get("key") == key:
        return pd.DataFrame(json.loads(cache.read_text())["rows"])
    t0 = time.perf_counter()
    feats = frozen_features(data.table, size)
    y, rows = data.table.labels, []

    def model(C):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000))

    for fold in range(folds):
        fit_idx, val_idx = data.fit_val(folds, 0, fold, cfg.train.val_fraction)
        test_idx = data.splits(folds, 0)[fold][1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = {C: balanced_accuracy_score(y[val_idx],
                                                 model(C).fit(feats[fit_idx], y[fit_idx]).predict(feats[val_idx]))
                      for C in LOGREG_C}
            best = max(scores, key=scores.get)
            both = np.concatenate([fit_idx, val_idx])
            probs = model(best).fit(feats[both], y[both]).predict_proba(feats[test_idx])
        m = clinical_metrics(y[test_idx], probs, data.table.class_names, positive=cfg.datasets[0].positive)
        rows.append({"dataset": cfg.datasets[0].display_name(), "backbone": "efficientnet_lite0", "strategy": REFERENCE,
                     "head": "logreg", "fold": fold, "seed": 0,
                     "seconds": (time.perf_counter() - t0) / folds, "C": best, **m})
    cache.write_text(json.dumps({"key": key, "rows": rows}, indent=1))
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--every", type=int, default=1, help="every N-th image of each class (a short check)")
    ap.add_argument("--skip", nargs="*", default=[], help="strategies to leave out (auto_depth too)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these strategies (auto_depth too)")
    ap.add_argument("--lr", nargs="+", type=float, default=LR_CHOICE,
                    help=f"the learning-rate list chosen from on inner splits (default {LR_CHOICE}); another list "
                         "writes its own store and table (..._lr<list>), as it is another protocol")
    args = ap.parse_args()
    every = f"_every{args.every}" if args.every > 1 else ""
    suffix = every + ("" if args.lr == LR_CHOICE else "_lr" + "-".join(f"{x:g}" for x in args.lr))
    if args.only is not None:
        args.skip = [n for n in [*list_strategies(), "auto_depth"] if n not in args.only]
    data = every_nth(args.data, args.every) if args.every > 1 else args.data
    store = ROOT / "results" / f"strategies_busi{suffix}.sqlite"
    strategies = [{"name": n, **PARAMS.get(n, {})} for n in list_strategies() if n not in args.skip]
    if "auto_depth" not in args.skip:
        strategies.append(AUTO_DEPTH)
    raw = {"name": "strategies_busi", "datasets": [{"name": "busi", "path": data, "positive": "malignant"}],
           "backbones": [{"name": "efficientnet_lite0", "image_size": args.size}], "strategies": strategies,
           "heads": ["softmax", "svm"], "folds": args.folds, "seeds": [0], "store": str(store), "keep_best": False,
           "train": {"epochs": args.epochs, "batch_size": 32, "lr": {"choose": args.lr}, "patience": 3}}
    cfg = load_config(raw=raw)
    t0 = time.perf_counter()
    reference = logreg_reference(cfg, args.size, args.folds, ROOT / "results" / f"strategies_busi{every}_logreg.json")
    summary = medtune.run(cfg)
    wall = time.perf_counter() - t0
    with Store(store) as s:
        metrics, cells = s.metrics(), read_cells(s)
    chosen = chosen_values(cells)
    edges = edge_choices(chosen)
    reference = reference.assign(group=REFERENCE, variant="")  # the store's group keys (evidence.summary_table)
    table = summary_table(pd.concat([metrics, reference.drop(columns=["C"])], ignore_index=True))
    shown = format_pm(table)
    command = " ".join(["python", *sys.argv])
    md = [f"# Every strategy on BUSI (EfficientNet-Lite0, {args.size} px, {args.folds} folds, {args.epochs} epochs"
          f"{f', every {args.every}th image' if args.every > 1 else ''})", "",
          f"Command: `{command}`  ", f"Wall clock: {wall:.0f} s for {summary.total} cells "
          f"({summary.done} run now, {summary.skipped} resumed, {summary.failed} failed). Learning rate chosen per "
          f"outer fold on its inner validation split from {args.lr}; class_weight balanced (the default). "
          f"`{REFERENCE}`: scikit-learn's class-balanced LogisticRegression on the same frozen Lite0 features "
          f"(fp32, plain images) and folds, C from {list(LOGREG_C)} on the same inner split (chosen C per fold: "
          f"{reference.C.tolist()}). Positive class for sensitivity/specificity/PPV/NPV: malignant. "
          "Mean ± sd over folds.", "",
          to_markdown(shown.drop(columns=["dataset", "backbone"]).set_index("strategy"), "strategy"), "",
          "Learning rate chosen on each outer fold's inner split (evaluation/diagnose.py; a pick at the same end of "
          "the list in most folds means the best rate may lie outside it):", "",
          to_markdown(chosen.drop(columns=["dataset", "backbone", "try"]).set_index("strategy"), "strategy"), "",
          *[f"- {line}" for line in edges]]
    write_results(f"strategies_busi{suffix}", md, summary.collapsed,
                  {"command": command, "wall_seconds": wall, "rows": table.to_dict(orient="records")})


def write_results(stem: str, md: list[str], collapsed: list[str], payload: dict) -> None:
    """benchmarks/results/STEM.md (the table, the command, any collapsed cells) and STEM.json; prints the md."""
    if collapsed:
        md = [*md, "", "Collapsed cells (evaluation/diagnose.py):", *[f"- {line}" for line in collapsed]]
    (ROOT / "results" / f"{stem}.md").write_text("\n".join(md) + "\n")
    (ROOT / "results" / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
