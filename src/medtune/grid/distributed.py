"""The Ray executor: one grid over many GPUs and machines, with the store written by the driver alone.

Each cell is one Ray task that calls the same `runner.execute` as the local loop, so a cell
computes the same thing wherever it runs. The data tables go into Ray's object store once and
tasks get them by reference. A worker process that dies (OOM-killed, node lost, segfault) is
retried by Ray up to `max_retries` times; a cell that dies on every attempt is recorded as
failed with the reason and the grid goes on. Results come back to the driver as tasks finish and
only the driver writes SQLite (one transaction per cell, via `runner.record`), so there is never
a concurrent writer and a killed driver loses at most the cells still in flight: the next
`medtune run` skips every cell the store already holds as done.

Feature-cache reuse: each worker process keeps one module-level `FeatureCache` alive across the
tasks it runs, and the driver submits cells sorted by `runner.model_key`, so the cells that share
pretrained weights queue next to each other and mostly land on workers that have already cached
that backbone's frozen-prefix outputs. Ray does not pin tasks to workers, so this is a locality
hint, not a guarantee: a cache miss only costs recomputing the prefix, never a wrong result.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path

import torch

from medtune.config import ExperimentConfig
from medtune.errors import ConfigError
from medtune.grid.cells import CellResult, GridProgress, PreparedData, RunSummary, execute, model_key, record
from medtune.evaluation.store import Store
from medtune.training.loop import FeatureCache, Runtime, TrainSettings, autocast_dtype

# Test-only, read by the workers (set it before Ray starts): a directory. While it holds a file `armed`,
# the first task to claim the marker `crashed` there SIGKILLs its own worker process, so Ray's retry
# path is exercised for real.
CRASH_ONCE_ENV = "MEDTUNE_TEST_CRASH_ONCE"

_CACHE: FeatureCache | None = None  # one per worker process, reused by every task it runs


def worker_device(requested: str) -> torch.device:
    """The GPU Ray assigned to this task (Ray sets CUDA_VISIBLE_DEVICES, so it is `cuda:0`), else the CPU."""
    import ray

    if requested != "cpu" and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda:0")
    return torch.device("cpu")


def cell_task(cell: dict, data: PreparedData, settings: TrainSettings, requested_device: str,
              threads: int) -> CellResult | str:
    """Body of one Ray task: train and evaluate `cell` on the worker's device; never touches the store."""
    global _CACHE
    import ray

    torch.set_num_threads(threads)
    device = worker_device(requested_device)
    if settings.cache and _CACHE is None:
        _CACHE = FeatureCache()
    rt = Runtime(device, _CACHE if settings.cache else None, model_key(cell), autocast_dtype(device, settings.amp))
    outcome = execute(cell, data, settings, rt)
    if device.type == "cuda":  # give back cached blocks: with gpus_per_cell < 1 another worker shares this GPU
        torch.cuda.empty_cache()
    if isinstance(outcome, CellResult):
        ctx = ray.get_runtime_context()
        outcome.info["worker"] = {"pid": os.getpid(), "node": ctx.get_node_id(), "device": str(device),
                                  "cache_hits": _CACHE.hits if _CACHE else 0,
                                  "cache_misses": _CACHE.misses if _CACHE else 0}
    if os.environ.get(CRASH_ONCE_ENV) and (Path(os.environ[CRASH_ONCE_ENV]) / "armed").exists():
        crash_once(Path(os.environ[CRASH_ONCE_ENV]), cell["cell_id"])
    return outcome


def crash_once(folder: Path, cell_id: str) -> None:
    """Test-only: the first task to get here (O_EXCL marker, so exactly one) records its cell id and pid, then
    SIGKILLs its own worker after the result is computed but before it is returned."""
    try:
        fd = os.open(folder / "crashed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{cell_id} {os.getpid()}".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def check_devices(cfg: ExperimentConfig) -> None:
    """Under Ray, Ray chooses the GPU; `device` only says whether a cell may use one."""
    if cfg.device.startswith("cuda:"):
        raise ConfigError(f"device {cfg.device!r} with executor: ray: Ray assigns each cell its GPU. "
                          "Use `device: cuda` (or auto) and `gpus_per_cell: 1`.")
    if cfg.device == "cuda" and cfg.gpus_per_cell <= 0:
        raise ConfigError("device: cuda with executor: ray needs `gpus_per_cell` > 0 (e.g. 1, or 0.5 to "
                          "share a GPU between two cells); with 0 Ray gives the cells no GPU.")


def connect(cfg: ExperimentConfig) -> bool:
    """Connect to `ray_address` (`auto`, `host:port` or `ray://head:10001`) or start a local Ray
    instance with every core. Returns True when this call connected, i.e. the caller must shut down.
    An already initialised Ray (a notebook, the tests) is used as it is and left running."""
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **quiet)
    else:
        # address="local": never attach by accident to a cluster someone else started on this machine.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    return True


def run_ray(cfg: ExperimentConfig, todo: list[dict], data_of: dict[str, PreparedData], settings: TrainSettings,
            store: Store, summary: RunSummary, progress: bool, on_cell, stage: str = "") -> None:
    """Run `todo` as Ray tasks; record each cell in `store` as its task finishes. `stage` prefixes
    the progress title (a racing round)."""
    import ray

    check_devices(cfg)
    if not todo:
        return
    started = connect(cfg)
    try:
        if cfg.gpus_per_cell > 0 and ray.cluster_resources().get("GPU", 0) < cfg.gpus_per_cell:
            warnings.warn(f"gpus_per_cell={cfg.gpus_per_cell} but the Ray cluster has "
                          f"{ray.cluster_resources().get('GPU', 0)} GPUs now; cells wait until an autoscaler "
                          "adds GPU nodes.", stacklevel=2)
        # Each distinct data table goes into the object store once; every task gets a reference.
        refs: dict[int, ray.ObjectRef] = {}
        for data in {id(d): d for d in data_of.values()}.values():
            for seed in cfg.seeds:
                data.splits(cfg.folds, seed)  # folds computed once here, not in every task
            refs[id(data)] = ray.put(data)
        options: dict = dict(num_cpus=cfg.cpus_per_cell, num_gpus=cfg.gpus_per_cell, max_retries=cfg.max_retries,
                             retry_exceptions=False)
        task = ray.remote(cell_task).options(**options)
        threads = max(1, int(cfg.cpus_per_cell))
        pending = {}
        for cell in sorted(todo, key=lambda c: tuple(str(k) for k in model_key(c))):  # stable: grid order within a key
            ref = task.remote(cell, refs[id(data_of[cell["cell_id"]])], settings, cfg.device, threads)
            pending[ref] = cell
        with GridProgress(todo, f"{stage}{len(todo)} cells on Ray ({summary.skipped} already done)", progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell = pending.pop(ref)
                    outcome = outcome_of(ref, cfg.max_retries)
                    status = record(store, cell, outcome, summary)
                    if on_cell:
                        on_cell(cell, status)
                    bar.finished(cell, outcome)
    finally:
        if started:
            ray.shutdown()


def outcome_of(ref, max_retries: int) -> CellResult | str:
    """The task's result, or the error to record: a bug raised in the task, or a worker that died
    on every one of its 1 + max_retries attempts."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # an exception `execute` does not turn into a message
        return f"{type(exc.cause).__name__ if exc.cause else 'error'} in the Ray task: {exc}"
    except ray.exceptions.RayError as exc:  # worker crashed / killed / node lost, retries exhausted
        return (f"the Ray worker died on each of {1 + max_retries} attempts ({type(exc).__name__}): {exc}. "
                "Often out of host or GPU memory; lower train.batch_size or raise max_retries.")
