"""`medtune init`'s expected run time against the measured run of the file it writes.

    python benchmarks/init_estimate.py --data ../shared/data/busi --per-class 30   # 90 images
    python benchmarks/init_estimate.py --data ../shared/data/busi                  # every image
    python benchmarks/init_estimate.py --store results/demo.sqlite --label demo    # an existing store
    python benchmarks/init_estimate.py --fit demo                                   # the cost model

The first two write the experiment file for DATA (or for its first N images per class, linked
into a temporary folder, so a subset needs no copy), run it as written in a fresh process and
record, per strategy, the estimate `init` printed and the cell-seconds measured, with the wall
clock of the whole run. Every form also records what the cost model of `medtune.starter` is
calibrated on: per strategy and fold, the training images, the scheduled candidate-epochs and the
cell's seconds (`starter.COST` is fitted to these rows, the demo's so far; see the
`fit` entry of the results file). Results: benchmarks/results/init_estimate.json (one entry per
label, later runs replace earlier ones with the same label).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medtune.grid.select import halving_epochs
from medtune.starter import COST, write_starter
from medtune.evaluation.store import Store

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "init_estimate.json"


def subset(data: Path, per_class: int) -> Path:
    """The first `per_class` files (by name) of each class folder, linked into a temporary folder."""
    out = Path(tempfile.mkdtemp()) / f"{data.name}_{per_class}"
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (out / cls.name / f.name).symlink_to(f.resolve())
    return out


def rows_of(store: str) -> list[dict]:
    """Per done cell: strategy key, training images, scheduled candidate-epochs, seconds."""
    with Store(store) as s:
        cells = s.cells()
    rows = []
    for _, c in cells[cells["status"] == "done"].iterrows():
        cfg, info = json.loads(c["config_json"]), json.loads(c["info_json"])
        key = str(c["strategy"]).split("(", 1)[0]
        lr = cfg["train"]["lr"]
        n_rates = len(lr["choose"]) if isinstance(lr, dict) else 1
        epochs = cfg["train"]["epochs"]
        work = 1 if key == "linear_probe" else (
            halving_epochs(n_rates, epochs) if cfg.get("halving") else n_rates * epochs)
        rows.append({"strategy": key, "n_train": int(info["n_train"]), "work_epochs": int(work),
                     "epochs_run": int(info.get("epochs_run", 0)), "seconds": round(float(c["seconds"]), 2)})
    return rows


def fit(rows: list[dict]) -> dict[str, list[float]]:
    """Per strategy (fixed seconds, seconds per training image and candidate-epoch): the ratio of the
    summed seconds to the summed work (no fixed part: one data-set size cannot separate it)."""
    cost = {}
    for key in sorted({r["strategy"] for r in rows}):
        mine = [r for r in rows if r["strategy"] == key]
        cost[key] = [0.0, round(sum(r["seconds"] for r in mine)
                                / sum(r["n_train"] * r["work_epochs"] for r in mine), 5)]
    return cost


def measure(data: Path, per_class: int | None) -> dict:
    folder = subset(data, per_class) if per_class else data
    tmp = Path(tempfile.mkdtemp())
    cfg_path, insp, grid = write_starter(folder, tmp / "exp.yaml")  # as `medtune init` DATA does
    store = str(tmp / "exp.sqlite")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medtune", "run", str(cfg_path), "--set", f"store={store}",
                    "--set", "keep_best=false"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = rows_of(store)
    measured = {}
    for r in rows:
        measured[r["strategy"]] = round(measured.get(r["strategy"], 0.0) + r["seconds"], 1)
    estimate = {k: round(v, 1) for k, v in grid["seconds"].items()}
    total_est, total = sum(estimate.values()) + grid.get("load_seconds", 0.0), wall
    return {"data": f"{data}" + (f", first {per_class} per class" if per_class else ""), "images": insp.n,
            "folds": grid["folds"], "epochs": grid["epochs"], "estimate_seconds": estimate,
            "estimate_load_seconds": round(grid.get("load_seconds", 0.0), 1),
            "measured_cell_seconds": measured, "wall_seconds": round(wall, 1),
            "estimate_total_seconds": round(total_est, 1), "ratio_measured_over_estimate": round(total / total_est, 2),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--store", help="record the rows of an existing store instead of running")
    ap.add_argument("--label", default=None)
    ap.add_argument("--fit", nargs="+", metavar="LABEL", help="fit the cost model to these entries' rows")
    a = ap.parse_args()
    if a.fit:
        results = json.loads(OUT.read_text())
        results["fit"] = {"from": a.fit, "cost": fit([r for label in a.fit for r in results[label]["rows"]])}
        OUT.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results["fit"], indent=1))
        return
    if a.store:
        entry = {"store": a.store, "rows": rows_of(a.store)}
        label = a.label or Path(a.store).stem
    else:
        entry = measure(a.data, a.per_class)
        label = a.label or f"{a.data.name}_{a.per_class or 'all'}"
    entry.update(measured_at=time.strftime("%Y-%m-%d %H:%M"), threads=os.cpu_count())
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[label] = entry
    results["cost_model_now"] = {k: list(v) for k, v in COST.items()}
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in entry.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
