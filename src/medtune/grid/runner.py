"""The grid: data set x backbone x strategy x seed x fold x head, one cell at a time, resumable.

A cell (grid/cells.py's Grid yields them) is a read-only mapping whose `config` is a
JSON-serialisable dict; its id is a hash of that resolved configuration
(including the data set's content fingerprint), so the same cell always gets the same id and a
rerun skips every id the store already holds as done. Cells are executed by a local loop or by
Ray (`executor: ray`). With `racing:` the cells run round by round (grid/racing.py), each round through
the same executor.

Several local runs may share one store (evaluation/store.py's leases): each claims a cell before running it
and skips cells others hold or finished. A run that finds the cells left all held by live others
waits for them instead of exiting, so that a racing round is decided on all of its cells, the
deployed model is chosen from the whole grid, and the exit status and summary describe the whole
grid (a script that runs `report` after `medtune run` sees every cell). A process that dies
leaves its lease behind; the others take its cell over (evaluation/store.py says when).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from medtune.version import __version__
from medtune.models.backbones import default_image_size
from medtune.grid.cells import (Cell, CellResult, GridProgress, PreparedData, RunSummary, data_key, data_key_of,
                                execute, expand, labels, model_key, precision_of, prepare, prepare_external, record,
                                record_of, settings_from)
from medtune.config import ExperimentConfig
from medtune.errors import Interrupted, StoreError
from medtune.evaluation.store import Store, check_store_path, guarded, store_error
from medtune.training.loop import Runtime, TrainSettings, autocast_dtype, resolve_device, shared_cache


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

    return {"medtune": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "git_commit": git_commit(),
            "hostname": platform.node()}


# --------------------------------------------------------------------------- the run
POLL_SECONDS = 1.0  # how often a run waiting for cells held by other processes looks again


def run(cfg: ExperimentConfig, store_path: str | None = None, progress: bool = True,
        on_cell: Callable[[dict, str], None] | None = None) -> RunSummary:
    """Run (or resume) the grid of `cfg`; returns counts. Failed cells are recorded and skipped over.
    The store file is created only once the data are ready, so a run that fails before its first
    cell leaves nothing behind. Ctrl-C raises `Interrupted` carrying what was kept."""
    t0 = time.perf_counter()
    since = time.time()  # a cell that fails after this is not retried by this run (nor by its sharers)
    path = Path(store_path or cfg.store)
    check_store_path(path)  # a path that can never be a store fails before any work
    summary = RunSummary("", 0, 0, 0, 0, 0.0, str(path))
    try:
        return _run(cfg, path, progress, on_cell, t0, since, summary)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(summary) from None


def _run(cfg: ExperimentConfig, path: Path, progress: bool, on_cell, t0: float, since: float,
         summary: RunSummary) -> RunSummary:
    # Under Ray the workers pick their devices; a driver without a GPU (a laptop, a login node) is fine.
    device = resolve_device(cfg.device) if cfg.executor == "local" else torch.device("cpu")
    # Every backbone's weights, once, before any data or cell: missing weights fail here in seconds.
    cfg, weights_record = check_weights(cfg)
    run_id = hashlib.sha1(f"{time.time()}-{os.getpid()}".encode()).hexdigest()[:12]
    prepared, fingerprints, datasets = prepare_all(cfg)
    # each data set's fold count from its splitter: k, one per site (`cv: by_site`) or 1 (`split: official`)
    n_folds_by = {k: p.splitter(cfg.folds, 0).get_n_splits() for k, p in prepared.items()}
    cells = expand(cfg, run_id, fingerprints, n_folds_by, precision_of(cfg, device))
    check_repeats(cells)
    env = {**environment(device), "weights": weights_record}
    store = Store(path)  # the first write: only now does the store file exist
    try:
        with guarded(path, "recording the run"):
            if (note := store.version_warning()) is not None:
                import warnings

                warnings.warn(f"resuming: {note}", stacklevel=3)
            for name, class_names, info in datasets:
                store.add_dataset(name, class_names, info)
            done = store.done_ids()
            store.add_run(run_id, cfg.model_dump(), env)
        todo = [c for c in cells if c["cell_id"] not in done]
        if todo and (note := store.unmatched_note(todo)) is not None:
            import warnings

            warnings.warn(f"resuming: {note}", stacklevel=3)
        summary.run_id, summary.total, summary.skipped = run_id, len(cells), len(cells) - len(todo)
        summary.duplicates = {k: v.duplicates for k, v in prepared.items()}
        _run_grid(cfg, store, cells, todo, prepared, device, summary, progress, on_cell, since)
        summary.seconds = time.perf_counter() - t0
    finally:
        with contextlib.suppress(sqlite3.Error):
            store.close()
    return summary


def prepare_all(cfg: ExperimentConfig) -> tuple[dict[str, PreparedData], dict[str, str],
                                                list[tuple[str, list[str], dict]]]:
    """Every data set of the grid at every image size its backbones take, keyed by `data_key`, with
    its `test_datasets`: (prepared data, content fingerprints, the store's data set records)."""
    prepared: dict[str, PreparedData] = {}
    fingerprints: dict[str, str] = {}
    datasets: list[tuple[str, list[str], dict]] = []  # written once the store is opened
    for ds in cfg.datasets:
        for bb in cfg.backbones:
            size = bb.image_size or default_image_size(bb.name)
            key = data_key(ds.display_name(), size)
            if key in prepared:
                continue
            prepared[key] = data = prepare(ds, size, cfg.folds, cfg.subgroups, cfg.cv)
            check_train_sizes(data, cfg)
            fingerprints[key] = data.table.fingerprint()
            datasets.append((ds.display_name(), data.table.class_names, record_of(data, ds.positive)))
            for ext in cfg.test_datasets:
                e = prepare_external(ext, size, data.table.class_names)
                data.external[ext.display_name()] = e.table
                fingerprints[data_key(ext.display_name(), size)] = e.table.fingerprint()
                datasets.append((ext.display_name(), e.table.class_names,
                                 record_of(e, ext.positive or ds.positive, role=f"external to {ds.display_name()}")))
    return prepared, fingerprints, datasets


def check_train_sizes(data: PreparedData, cfg: ExperimentConfig) -> None:
    """Every training-set size of every outer fold drawn now (data/subsets.py: cheap), so a size too
    small for an inner split is refused before any training, not as a failed cell per fold."""
    if len(cfg.train_sizes) == 1:
        return
    for seed in cfg.seeds:
        n_folds = len(data.splits(cfg.folds, seed))
        for fold in range(n_folds):
            for size in cfg.train_sizes:
                data.train_fold(n_folds, seed, fold, size)


def _run_grid(cfg: ExperimentConfig, store: Store, cells: list[Cell], todo: list[Cell], prepared: dict,
              device: torch.device, summary: RunSummary, progress: bool, on_cell, since: float) -> None:
    settings = settings_from(cfg)
    data_of = {c["cell_id"]: prepared[data_key_of(c)] for c in todo}
    if cfg.tracking == "mlflow":  # each done cell goes to MLflow as it finishes
        from medtune.report.tracking import live

        on_cell = live(cfg.tracking_uri, cfg.name, store, on_cell)
    # with keep_best, each cell's model (first seed) is kept so the deployed group needs no retraining
    keep_seed = min(cfg.seeds) if cfg.keep_best else None

    def run_some(some: list[dict], stage: str = "") -> None:
        if cfg.executor == "ray":
            from medtune.grid.distributed import run_ray

            run_ray(cfg, some, data_of, settings, store, summary, progress, on_cell, stage)
        else:
            run_local(some, data_of, settings, device, store, summary, progress, on_cell, keep_seed, stage, since)

    if cfg.racing is None:
        run_some(todo)
    else:  # round by round, the done cells replayed from the store (grid/racing.py)
        from medtune.grid.racing import race

        for c in cells:
            data_of.setdefault(c["cell_id"], prepared[data_key_of(c)])
        started = False
        if cfg.executor == "ray":  # one Ray session for every round
            from medtune.grid.distributed import connect

            started = connect(cfg)
        try:
            with guarded(store.path, "reading the race's rounds"):
                summary.pruned = race(cells, store, run_some, cfg.racing)
        finally:
            if started:
                import ray

                ray.shutdown()
    ids = [c["cell_id"] for c in cells]
    with guarded(store.path, "reading the finished grid"):
        statuses = dict(store.conn.execute("SELECT cell_id, status FROM cells").fetchall())
    # the whole grid's failures, whoever ran them: what a script calling `medtune run` needs to know
    summary.failed = sum(statuses.get(i) == "failed" for i in ids)
    if cfg.keep_best:
        from medtune.deploy.bundle import keep_best

        # one sharing process at a time: the next finds the bundle written and keeps it
        with guarded(store.path, "saving the best model"), store.exclusive("__keep_best__"):
            summary.best_models = [str(p) for p in keep_best(cells, prepared, settings, device, store)]
    if cfg.tracking == "mlflow" and cfg.keep_best:  # the saved models, as artifacts of their cells' runs
        from medtune.report.tracking import track_store

        track_store(store.path, cfg.tracking_uri, cfg.name, report=False)


def check_repeats(cells: list[Cell]) -> None:
    """Two entries that resolve to the same cells (a sweep value that repeats another strategy entry,
    `blocks: [1, 2]` beside `blocks: 1`) would run them twice: refused, naming the cell."""
    from medtune.errors import ConfigError

    seen: set[str] = set()
    for c in cells:
        if c["cell_id"] in seen:
            raise ConfigError(f"the grid holds the cell {labels(c)} twice: two strategy (or backbone) entries resolve "
                              f"to the same {c['strategy']!r}. Delete the repeated value from one of them.")
        seen.add(c["cell_id"])


def check_weights(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict]:
    """Resolve every backbone (medtune.models.weights.check_grid) and pin each local file's sha256 into the
    config, so a cell id changes when the file behind a path does."""
    from medtune.models.backbones import check_name
    from medtune.models.weights import check_grid, label

    resolved = check_grid(cfg.backbones, check_name)
    pinned = [b.model_copy(update={"sha256": resolved[label(b)].sha256})
              if resolved[label(b)].kind == "file" else b for b in cfg.backbones]
    return cfg.model_copy(update={"backbones": pinned}), {k: r.record() for k, r in resolved.items()}


def run_local(todo: list[dict], data_of: dict, settings: TrainSettings, device: torch.device, store: Store,
              summary: RunSummary, progress: bool, on_cell, keep_seed: int | None = None, stage: str = "",
              since: float | None = None) -> None:
    """Run `todo` here, one cell at a time, each claimed in the store first; `stage` prefixes the
    progress title (a racing round). Returns once every cell of `todo` is finished, here or by the
    other processes sharing the store (see the module docstring for why it waits)."""
    cache = shared_cache() if settings.cache else None
    amp = autocast_dtype(device, settings.amp)
    memo: dict = {}
    pending = list(todo)
    with GridProgress(todo, f"{stage}{len(todo)} cells to run ({summary.skipped} already done)", progress) as bar, \
            store.heartbeat():
        while pending:
            ran = False
            for cell in list(pending):
                with guarded(store.path, f"claiming {labels(cell)}"):
                    state = store.claim(cell["cell_id"], since)
                if state == "busy":
                    continue
                pending.remove(cell)
                if state == "finished":  # another process ran it
                    summary.elsewhere += 1
                    bar.elsewhere(cell)
                    continue
                rt = Runtime(device, cache, model_key(cell), amp, memo)
                run_claimed(cell, data_of[cell["cell_id"]], settings, rt, store, summary, bar, on_cell,
                            keep=cell["seed"] == keep_seed)
                ran = True
            if pending and not ran:
                bar.waiting(len(pending), str(store.path))
                time.sleep(POLL_SECONDS)


def run_claimed(cell: dict, data, settings: TrainSettings, rt: Runtime, store: Store, summary: RunSummary,
                bar: GridProgress, on_cell, keep: bool) -> None:
    """Run and record one claimed cell. Whatever stops it before its record (Ctrl-C, a full disk) gives
    its lease back and removes its kept model, so the next run redoes it at once and no file is orphaned."""
    from medtune.deploy.bundle import fold_models_dir, save_fold_model

    bar.starting(cell)
    recorded = False
    try:
        outcome = execute(cell, data, settings, rt, keep_model=keep)
        try:
            if keep and isinstance(outcome, CellResult):
                save_fold_model(store.path, cell["cell_id"], outcome.state_dict, outcome.head_model)
            status = record(store, cell, outcome, summary)
        except (sqlite3.Error, OSError) as exc:
            base = store_error(store.path, exc, f"recording {labels(cell)}")
            raise StoreError(f"{base} {summary.done} cell(s) finished by this run are kept; the cell in flight, "
                             f"{labels(cell)}, was not recorded and runs again next time.") from exc
        recorded = True
    finally:
        if not recorded:
            shutil.rmtree(fold_models_dir(store.path) / cell["cell_id"], ignore_errors=True)
            with contextlib.suppress(sqlite3.Error):
                store.release(cell["cell_id"])
    if on_cell:
        on_cell(cell, status)
    bar.finished(cell, outcome)
