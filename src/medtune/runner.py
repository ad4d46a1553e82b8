"""The grid: data set x backbone x strategy x head x seed x fold, one cell at a time, resumable.

A cell is a plain JSON-serialisable dict; its id is a hash of its resolved configuration
(including the data set's content fingerprint), so the same cell always gets the same id and a
rerun skips every id the store already holds as done. Cells are executed by a local loop or by
Ray (`executor: ray`); either way only this process writes the store. With `racing:` the cells
run round by round (racing.py), each round through the same executor.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from medtune.version import __version__
from medtune.backbones import default_image_size
from medtune.cells import (CellResult, GridProgress, PreparedData, RunSummary, execute, expand, model_key, prepare,
                           precision_of, prepare_external, record, record_of, settings_from)
from medtune.config import ExperimentConfig
from medtune.store import Store
from medtune.train import Runtime, TrainSettings, autocast_dtype, resolve_device, shared_cache


# --------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    def git_commit() -> str | None:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                 cwd=Path(__file__).parent)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    import sklearn
    import timm

    return {"medtune": __version__, "torch": torch.__version__, "timm": timm.__version__, "sklearn": sklearn.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "git_commit": git_commit(),
            "hostname": platform.node()}


# --------------------------------------------------------------------------- the run
def run(cfg: ExperimentConfig, store_path: str | None = None, progress: bool = True,
        on_cell: Callable[[dict, str], None] | None = None) -> RunSummary:
    """Run (or resume) the grid of `cfg`; returns counts. Failed cells are recorded and skipped over."""
    t0 = time.perf_counter()
    store = Store(store_path or cfg.store)
    if (note := store.version_warning()) is not None:
        import warnings

        warnings.warn(f"resuming: {note}", stacklevel=2)
    # Under Ray the workers pick their devices; a driver without a GPU (a laptop, a login node) is fine.
    device = resolve_device(cfg.device) if cfg.executor == "local" else torch.device("cpu")
    # Every backbone's weights, once, before any data or cell: missing weights fail here in seconds.
    cfg, weights_record = check_weights(cfg)
    run_id = hashlib.sha1(f"{time.time()}-{os.getpid()}".encode()).hexdigest()[:12]
    prepared: dict[str, PreparedData] = {}
    fingerprints: dict[str, str] = {}
    for ds in cfg.datasets:
        for bb in cfg.backbones:
            size = bb.image_size or default_image_size(bb.name)
            key = f"{ds.display_name()}@{size}"
            if key not in prepared:
                prepared[key] = prepare(ds, size, cfg.folds, cfg.subgroups, cfg.cv)
                fingerprints[key] = prepared[key].table.fingerprint()
                store.add_dataset(ds.display_name(), prepared[key].table.class_names,
                                  record_of(prepared[key], ds.positive))
                for ext in cfg.test_datasets:
                    e = prepare_external(ext, size, prepared[key].table.class_names)
                    prepared[key].external[ext.display_name()] = e.table
                    fingerprints[f"{ext.display_name()}@{size}"] = e.table.fingerprint()
                    store.add_dataset(ext.display_name(), e.table.class_names,
                                      record_of(e, ext.positive or ds.positive, role=f"external to {ds.display_name()}"))
    n_folds_by = {k: len(p.splits(0, 0)) for k, p in prepared.items() if p.sites is not None}
    cells = expand(cfg, run_id, fingerprints, n_folds_by, precision_of(cfg, device))
    done = store.done_ids()
    todo = [c for c in cells if c["cell_id"] not in done]
    store.add_run(run_id, cfg.model_dump(), {**environment(device), "weights": weights_record})
    settings = settings_from(cfg)
    summary = RunSummary(run_id, len(cells), len(cells) - len(todo), 0, 0, 0.0, str(store.path),
                         {k: v.duplicates for k, v in prepared.items()})
    data_of = {c["cell_id"]: prepared[f"{c['dataset']}@{c['config']['backbone']['image_size']}"] for c in todo}
    if cfg.tracking == "mlflow":  # each done cell goes to MLflow as it finishes
        from medtune.tracking import live

        on_cell = live(cfg.tracking_uri, cfg.name, store, on_cell)
    # with keep_best, each cell's model (first seed) is kept so the deployed group needs no retraining
    keep_seed = min(cfg.seeds) if cfg.keep_best else None

    def run_some(some: list[dict], stage: str = "") -> None:
        if cfg.executor == "ray":
            from medtune.distributed import run_ray

            run_ray(cfg, some, data_of, settings, store, summary, progress, on_cell, stage)
        else:
            run_local(some, data_of, settings, device, store, summary, progress, on_cell, keep_seed, stage)

    if cfg.racing is None:
        run_some(todo)
    else:  # round by round, the done cells replayed from the store (racing.py)
        from medtune.racing import race

        for c in cells:
            data_of.setdefault(c["cell_id"], prepared[f"{c['dataset']}@{c['config']['backbone']['image_size']}"])
        started = False
        if cfg.executor == "ray":  # one Ray session for every round
            from medtune.distributed import connect

            started = connect(cfg)
        try:
            summary.pruned = race(cells, store, run_some, cfg.racing)
        finally:
            if started:
                import ray

                ray.shutdown()
    if cfg.keep_best:
        from medtune.bundle import keep_best

        from medtune.racing import leaders as inner_leaders

        leaders = inner_leaders(store, cfg.racing.metric if cfg.racing is not None else "balanced_accuracy")
        summary.best_models = [str(p) for p in keep_best(cells, prepared, settings, device, store,
                                                          primary=cfg.primary, inner_leaders=leaders)]
    if cfg.tracking == "mlflow" and cfg.keep_best:  # the saved models, as artifacts of their cells' runs
        from medtune.tracking import track_store

        track_store(store.path, cfg.tracking_uri, cfg.name, report=False)
    summary.seconds = time.perf_counter() - t0
    store.close()
    return summary


def check_weights(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict]:
    """Resolve every backbone (medtune.weights.check_grid) and pin each local file's sha256 into the
    config, so a cell id changes when the file behind a path does."""
    from medtune.backbones import check_name
    from medtune.weights import check_grid, label

    resolved = check_grid(cfg.backbones, check_name)
    pinned = [b.model_copy(update={"sha256": resolved[label(b)].sha256})
              if resolved[label(b)].kind == "file" else b for b in cfg.backbones]
    return cfg.model_copy(update={"backbones": pinned}), {k: r.record() for k, r in resolved.items()}


def run_local(todo: list[dict], data_of: dict, settings: TrainSettings, device: torch.device, store: Store,
              summary: RunSummary, progress: bool, on_cell, keep_seed: int | None = None, stage: str = "") -> None:
    """Run `todo` here, one cell at a time; `stage` prefixes the progress title (a racing round)."""
    cache = shared_cache() if settings.cache else None
    amp = autocast_dtype(device, settings.amp)
    memo: dict = {}
    with GridProgress(todo, f"{stage}{len(todo)} cells to run ({summary.skipped} already done)", progress) as bar:
        for cell in todo:
            bar.starting(cell)
            rt = Runtime(device, cache, model_key(cell), amp, memo)
            keep = cell["seed"] == keep_seed
            outcome = execute(cell, data_of[cell["cell_id"]], settings, rt, keep_model=keep)
            if keep and isinstance(outcome, CellResult):
                from medtune.bundle import save_fold_model

                save_fold_model(store.path, cell["cell_id"], outcome.state_dict, outcome.head_model)
            status = record(store, cell, outcome, summary)
            if on_cell:
                on_cell(cell, status)
            bar.finished(cell, outcome)
