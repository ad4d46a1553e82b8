"""Cells per minute of one fixed small grid: local loop, Ray with 1 worker, Ray with 2 workers.

    PYTHONPATH=src python benchmarks/ray_scaling.py [--out benchmarks/results/ray_scaling.json]

Settings: the local loop with all cores' threads and with 1 thread; Ray with 1 and 2 workers of
1 thread each (a fresh local Ray instance with `num_cpus = workers`, `cpus_per_cell: 1`). Each is
timed cold (first grid: Ray starts its workers, each imports torch) and warm (a second grid with
another data seed, so no feature-cache hits, on the already started workers). Besides wall time
it reports the serial parts that do not shrink with more workers: data preparation on the driver,
`ray.put` of the table, and the driver's per-cell SQLite write.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medtune.config import load_config
from medtune.grid.cells import RunSummary, prepare, record
from medtune.grid.runner import run
from medtune.evaluation.store import Store

GRID = {
    "name": "ray-scaling",
    "datasets": [{"name": "synthetic", "source": "synthetic",
                  "options": {"n_patients": 60, "images_per_patient": 2, "seed": 0}}],
    "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 64}],
    "strategies": ["linear_probe", "full_ft", {"name": "partial_ft", "blocks": 2}],
    "folds": 2,
    "seeds": [0, 1],
    "train": {"epochs": 3, "batch_size": 16, "views": 2, "patience": 3, "amp": "off"},
    "device": "cpu",
}


def grid(folder: Path, name: str, data_seed: int, **extra) -> dict:
    ds = {**GRID["datasets"][0], "options": {**GRID["datasets"][0]["options"], "seed": data_seed}}
    return {**GRID, "datasets": [ds], "store": str(folder / f"{name}.sqlite"), **extra}


def timed(raw: dict) -> dict:
    t0 = time.perf_counter()
    summary = run(load_config(raw=raw), progress=False)
    wall = time.perf_counter() - t0
    with Store(raw["store"]) as s:
        secs = s.cells().seconds.to_numpy()
    return {"cells": int(summary.done), "failed": int(summary.failed), "wall_s": round(wall, 2),
            "cells_per_min": round(60 * summary.done / wall, 2), "cell_s_mean": round(float(secs.mean()), 3),
            "cell_s_median": round(float(np.median(secs)), 3)}


def local(threads: int, folder: Path) -> dict:
    torch.set_num_threads(threads)
    return {"executor": "local", "workers": 1, "threads": threads,
            "cold": timed(grid(folder, f"local{threads}", 0)), "warm": timed(grid(folder, f"local{threads}w", 1))}


def on_ray(workers: int, folder: Path) -> dict:
    """`workers` concurrent 1-thread cells. Cold: includes starting the workers (each imports torch);
    warm: a second grid (other data seed, so no feature-cache hits) on the same, started workers."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    t_init = time.perf_counter() - t0
    try:
        cold = timed(grid(folder, f"ray{workers}", 0, executor="ray", cpus_per_cell=1))
        warm = timed(grid(folder, f"ray{workers}w", 1, executor="ray", cpus_per_cell=1))
    finally:
        ray.shutdown()
    return {"executor": "ray", "workers": workers, "threads": 1, "ray_init_s": round(t_init, 2),
            "cold": cold, "warm": warm}


def serial_parts(folder: Path) -> dict:
    """Driver-side costs that every executor pays once per grid or once per cell."""
    import ray

    cfg = load_config(raw={**GRID, "store": str(folder / "serial.sqlite")})
    ds = cfg.datasets[0]
    t0 = time.perf_counter()
    data = prepare(ds, 64, cfg.folds)
    t_prepare = time.perf_counter() - t0
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    t0 = time.perf_counter()
    ray.get(ray.put(data))
    t_put = time.perf_counter() - t0
    ray.shutdown()
    # One cell's write: predictions for a test fold of 30 images, 3 classes, ~25 metrics.
    n = len(data.table) // 2
    cell = {"cell_id": "x", "run_id": "r", "dataset": "d", "backbone": "b", "strategy": "s", "head": "softmax",
            "fold": 0, "n_folds": 2, "seed": 0, "config": {"a": 1}}
    from medtune.grid.cells import CellResult

    result = CellResult({f"m{i}": 0.5 for i in range(25)},
                        (np.arange(n), [f"p{i}" for i in range(n)], np.zeros(n, int), np.full((n, 3), 1 / 3)), {}, 1.0)
    summary = RunSummary("r", 1, 0, 0, 0, 0.0, "")
    with Store(folder / "serial.sqlite") as s:
        t0 = time.perf_counter()
        reps = 50
        for i in range(reps):
            record(s, {**cell, "cell_id": f"x{i}"}, result, summary)
        t_write = (time.perf_counter() - t0) / reps
    return {"prepare_s": round(t_prepare, 3), "ray_put_get_s": round(t_put, 4),
            "store_write_per_cell_ms": round(1000 * t_write, 2),
            "n_images": len(data.table), "table_mb": round(data.table.images.numel() / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/ray_scaling.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [local(os.cpu_count() or 1, folder), local(1, folder), on_ray(1, folder), on_ray(2, folder)]
        serial = serial_parts(folder)
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "loadavg_after": os.getloadavg()},
           "grid": GRID, "runs": rows, "serial": serial}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for r in rows:
        print(r)
    print(serial, "loadavg", os.getloadavg())


if __name__ == "__main__":
    main()
