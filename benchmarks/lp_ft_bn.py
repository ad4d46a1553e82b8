"""LP-FT's phase boundary under each BatchNorm rule, on one outer fold of BUSI (Lite0 @224).

Prints, epoch by epoch, the training loss and the inner validation loss and balanced accuracy (no
test fold is read) for: `update` without the BatchNorm refresh (the probe fitted on the pretrained
statistics, fine-tuning on batch statistics), `update` with it (lp_ft's default), and `keep`.

    python benchmarks/lp_ft_bn.py --data ../shared/data/busi --lr 3e-4   # about 4 minutes a variant here

Results: benchmarks/results/lp_ft_bn.json (and the table in lp_ft_bn.md, written by hand).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medtune.models.backbones import create_backbone
from medtune.grid.cells import prepare
from medtune.config import load_config
from medtune.training.features import Runtime, shared_cache
from medtune.training.precision import autocast_dtype, resolve_device
from medtune.training.strategies import create_strategy
from medtune.training.loop import fit

VARIANTS = {"update, no refresh": ("update", False), "update + refresh (default)": ("update", True),
            "keep": ("keep", True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"))
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    cfg = load_config(raw={"datasets": [{"name": "busi", "path": args.data, "duplicates": "group"}],
                           "backbones": ["efficientnet_lite0"], "strategies": ["lp_ft"]})
    data = prepare(cfg.datasets[0], 224, 5)
    fit_idx, val_idx = data.fit_val(5, 0, args.fold, cfg.train.val_fraction)
    device = resolve_device("auto")
    out = {"fold": args.fold, "lr": args.lr, "epochs": args.epochs, "variants": {}}
    for label, (bn, refresh) in VARIANTS.items():
        settings = cfg.train.model_copy(update={"lr": args.lr, "epochs": args.epochs, "bn_statistics": bn})
        rt = Runtime(device, shared_cache(), ("efficientnet_lite0", True, 224), autocast_dtype(device, settings.amp))
        torch.manual_seed(0)
        model = create_backbone("efficientnet_lite0", pretrained=True, num_classes=data.table.num_classes)
        t0 = time.perf_counter()
        res = fit(model, data.table, fit_idx, val_idx, create_strategy("lp_ft", refresh_bn=refresh), settings, rt)
        rows = [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_balanced_accuracy")} for h in res.history]
        out["variants"][label] = {"history": rows, "best_epoch": res.best_epoch, "seconds": time.perf_counter() - t0}
        print(label)
        for r in rows:
            print(f"  epoch {r['epoch']}: train loss {r['train_loss']:.3f}, val loss {r['val_loss']:.3f}, "
                  f"val balanced accuracy {r['val_balanced_accuracy']:.3f}")
        print(f"  best epoch {res.best_epoch}", flush=True)
    path = Path(__file__).resolve().parent / "results" / "lp_ft_bn.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
