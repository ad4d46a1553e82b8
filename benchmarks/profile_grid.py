"""Where a grid's seconds go: cProfile over one strategy's grid as grid_speed trains it.

grid_speed.py says how much faster medtune is than a hand-written loop; this says what is left to
win. It runs one strategy of grid_speed's grid (EfficientNet-Lite0 at 224 px, its training settings)
on every N-th image of each class, under cProfile, and prints the wall clock, the share of the
training steps (forward, backward), of the prediction and validation passes and of augmentation,
then the functions with the most cumulative and own time.

    python benchmarks/profile_grid.py                          # full_ft, every 4th image, 3 folds (~1 min)
    python benchmarks/profile_grid.py --strategy lp_ft --every 2

Nothing is written: the printout is the result (benchmarks/README.md records the figures it gave).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

import medtune

sys.path.insert(0, str(Path(__file__).parent))
from grid_speed import every_nth  # noqa: E402

SHARES = {  # label: (the file the function is in, the function whose cumulative time it is)
    "training steps": ("medtune/training/loop.py", "train_step"),
    "  backward": ("~", "run_backward"),  # torch's C++ autograd engine
    "prediction and validation passes": ("medtune/training/loop.py", "predict_proba"),
    "augmentation": ("medtune/training/features.py", "augment"),
}


def cumulative(stats: pstats.Stats, where: str, name: str) -> float:
    """The cumulative seconds of the function `name` defined in a file ending in `where` ("~": a builtin)."""
    return sum(v[3] for (file, _, fn), v in stats.stats.items()
               if file.endswith(where) and (fn == name or f"'{name}' of" in fn))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"))
    ap.add_argument("--strategy", default="full_ft", help="a strategy name (grid_speed's: linear_probe, "
                    "partial_ft, lp_ft, full_ft)")
    ap.add_argument("--every", type=int, default=4, help="every N-th image of each class")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--top", type=int, default=25, help="functions listed per ordering")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        ap.error(f"--data {args.data} is not a folder of class folders; pass the BUSI folder")
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp())
    data = every_nth(args.data, args.every, parent=work) if args.every > 1 else args.data
    strategy = {"name": "partial_ft", "blocks": 2} if args.strategy == "partial_ft" else args.strategy
    config = {"name": "profile", "datasets": [{"name": "busi", "path": data}],
              "backbones": [{"name": "efficientnet_lite0", "image_size": 224}], "folds": args.folds, "seeds": [0],
              "store": str(work / "grid.sqlite"), "keep_best": False, "strategies": [strategy],
              "train": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-3, "patience": args.epochs, "views": 2}}
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    medtune.run(config, progress=False)
    profile.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(profile)
    print(f"{args.strategy}, every {args.every}th image, {args.folds} folds, {args.epochs} epochs: {wall:.1f} s")
    for label, (where, name) in SHARES.items():
        seconds = cumulative(stats, where, name)
        print(f"  {label:<34} {seconds:7.1f} s  {seconds / wall:5.0%}")
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
