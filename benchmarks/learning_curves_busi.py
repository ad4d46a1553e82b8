"""Learning curves on BUSI (issue 40): would more data change which depth wins?

    python benchmarks/learning_curves_busi.py                        # ../shared/data/busi, hours on 2 cores
    python benchmarks/learning_curves_busi.py --every 10 --epochs 1  # every 10th image: a check of the script

EfficientNet-Lite0 (ImageNet) at 224 px, 5 patient/duplicate-grouped folds, training-set sizes 0.1 / 0.25 /
0.5 / 1.0 of each outer training fold's patients (nested, stratified, patient-intact subsets beside the
same test fold: medtune.data.subsets), three depths on equal terms: linear_probe, partial_ft(blocks=2) and
full_ft, full_ft with its learning rate chosen per outer fold on the inner split from the list
docs/config.md uses as its example ({choose: [1e-4, 3e-4, 1e-3]}, successive halving on: a 3-value choice for
about 1.7 fits). The other settings are configs/busi_evidence.yaml's (10 epochs, patience 3, batch 32,
lr 1e-3). Nothing here was tuned on BUSI's outer folds.

Resumable: the cells live in benchmarks/results/learning_curves_busi[_everyN].sqlite, so an interrupted run
(Ctrl-C, a lost machine) continues where it stopped. Writes learning_curves_busi[_everyN].md (the per-size
table, the verdict with its learning-curve lines, the cost per size and the cell-seconds against the
full-size grid's) and learning_curves_busi[_everyN].png (the curves, as the report draws them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import medtune
from medtune.data.subsets import size_label
from medtune.evaluation.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies_busi import every_nth  # noqa: E402

ROOT = Path(__file__).resolve().parent
SIZES = [0.1, 0.25, 0.5, 1.0]
LR_CHOICE = [1e-4, 3e-4, 1e-3]
STRATEGIES = ["linear_probe", {"name": "partial_ft", "blocks": 2}, {"name": "full_ft", "lr": {"choose": LR_CHOICE}}]


def config(data: str, store: Path, epochs: int) -> dict:
    return {"name": "learning_curves_busi",
            "datasets": [{"name": "busi", "path": data, "positive": "malignant", "duplicates": "group"}],
            "backbones": [{"name": "efficientnet_lite0", "image_size": 224}], "strategies": STRATEGIES,
            "train_sizes": SIZES, "heads": ["softmax"], "folds": 5, "seeds": [0], "halving": True,
            "store": str(store), "keep_best": False,
            "train": {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "patience": 3}}


def cell_seconds(store: Path) -> dict:
    """Training seconds of the finished cells per size: what the issue's cost bound is about."""
    with Store(store, read_only=True) as s:
        m = s.metrics()
    present = set(dict.fromkeys(m.train_size))
    return {size: float(m.seconds[[type(x) is type(size) and x == size for x in m.train_size]].sum())
            for size in SIZES if size in present}  # smallest first, as the curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--every", type=int, default=1, help="every N-th image of each class (a short check)")
    args = ap.parse_args()
    suffix = f"_every{args.every}" if args.every > 1 else ""
    data = every_nth(args.data, args.every) if args.every > 1 else args.data
    store = ROOT / "results" / f"learning_curves_busi{suffix}.sqlite"
    t0 = time.perf_counter()
    medtune.run(config(str(Path(data).resolve()), store, args.epochs))
    wall = time.perf_counter() - t0
    write_results(store, ROOT / "results" / f"learning_curves_busi{suffix}", " ".join(["python", *sys.argv]), wall)


def shown(path: Path) -> Path:
    """A path as the note shows it: relative to the repository when inside it."""
    return path.relative_to(ROOT.parent) if path.is_relative_to(ROOT.parent) else path


def write_results(store: Path, out: Path, command: str, wall: float) -> None:
    from medtune.evaluation.verdict import learning_of, store_verdicts
    from medtune.report.html import _plt, png_file
    from medtune.report.learning_plot import curve_figure

    secs = cell_seconds(store)
    full = secs.get(1.0, float("nan"))
    total = sum(secs.values())
    lc = learning_of(store)
    verdict = store_verdicts(store)["busi"]
    md = ["# Learning curves on BUSI (EfficientNet-Lite0 @224, 5 folds, sizes " +
          " / ".join(size_label(s) for s in SIZES) + ")", "",
          f"Command: `{command}` (this run's wall clock: {wall:.0f} s; resumed runs count only their own part).  ",
          f"Store: `{shown(store)}`.", "", "## The curves", "", lc.markdown("busi"), "",
          "## What the verdict says (`medtune results --store ...`, verbatim)", "", "```", *verdict.lines(), "```", "",
          "## Cost per size (training cell-seconds, all strategies and folds)", "",
          "| size | cell-seconds | / full size |", "|---|---|---|",
          *[f"| {size_label(s)} | {v:.0f} | {v / full:.2f} |" for s, v in secs.items()],
          f"| all sizes | {total:.0f} | {total / full:.2f} |", "",
          f"The issue's bound (the whole run's cell-seconds below twice the full-size grid's): "
          f"{'met' if total < 2 * full else 'NOT met'}, {total / full:.2f}x.", ""]
    out.with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
    png_file(curve_figure(lc, "busi", _plt()), out.with_suffix(".png"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
