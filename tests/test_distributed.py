"""The Ray executor: same results as the local loop, survives dead workers and a killed driver.

One local Ray instance (CPU only) is shared by the whole module; the grids are tiny
(test_efficientnet at 32 px, 2 folds, 1 epoch).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray  # in the `dev` extra: these tests must run, not skip
import torch
import yaml

from medtune.config import load_config
from medtune.grid.distributed import CRASH_ONCE_ENV, check_devices
from medtune.errors import ConfigError
from medtune.grid.runner import run
from medtune.evaluation.store import Store

SRC = str(Path(__file__).resolve().parents[1] / "src")


def grid(store: Path, strategies=("linear_probe", "full_ft"), seeds=(0,), **extra) -> dict:
    return {
        "name": "ray-test",
        "datasets": [{"name": "synthetic", "source": "synthetic",
                      "options": {"n_patients": 12, "images_per_patient": 2, "seed": 0}}],
        "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
        "strategies": list(strategies),
        "folds": 2,
        "seeds": list(seeds),
        "train": {"epochs": 1, "batch_size": 8, "views": 2, "patience": 1, "amp": "off"},
        "device": "cpu",
        "store": str(store),
        "keep_best": False,  # the best-model retrain runs on the driver; this file compares executors
        **extra,
    }


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance for the module. Workers inherit this environment: PYTHONPATH (so they import
    this medtune) and the test-only crash switch, which stays inert until a test arms it."""
    crash_dir = tmp_path_factory.mktemp("crash")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", CRASH_ONCE_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, saved["PYTHONPATH"]) if p)
    os.environ[CRASH_ONCE_ENV] = str(crash_dir)
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                   logging_level="WARNING", log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


def store_rows(path: Path) -> dict[str, dict]:
    with Store(path) as s:
        cells = s.cells()
        m = s.metrics().set_index("cell_id")
        preds = s.predictions()
    out = {}
    for _, c in cells.iterrows():
        p = preds[preds.cell_id == c.cell_id]
        metrics = m.loc[c.cell_id].drop(["dataset", "backbone", "strategy", "head", "fold", "seed", "seconds",
                                              "group", "variant", "pruned", "train_size"]) \
            if c.cell_id in m.index else None
        out[c.cell_id] = {"status": c.status, "error": c.error, "info": json.loads(c.info_json),
                          "metrics": metrics, "samples": list(p["sample"]), "probs": np.array(list(p["probs"]))}
    return out


def test_ray_gives_the_same_store_as_local(ray_cluster, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use cpus_per_cell = 1 thread
    try:
        local = run(load_config(raw=grid(tmp_path / "local.sqlite")), progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = run(load_config(raw=grid(tmp_path / "ray.sqlite", executor="ray")), progress=False)
    assert (local.done, local.failed, remote.done, remote.failed) == (4, 0, 4, 0)
    a, b = store_rows(tmp_path / "local.sqlite"), store_rows(tmp_path / "ray.sqlite")
    assert set(a) == set(b) and len(a) == 4
    worst_metric = worst_prob = 0.0
    for cid in a:
        assert a[cid]["samples"] == b[cid]["samples"]
        assert list(a[cid]["metrics"].index) == list(b[cid]["metrics"].index)
        ma, mb = a[cid]["metrics"].astype(float).to_numpy(), b[cid]["metrics"].astype(float).to_numpy()
        assert np.array_equal(np.isnan(ma), np.isnan(mb))
        worst_metric = max(worst_metric, float(np.nanmax(np.abs(ma - mb))))
        worst_prob = max(worst_prob, float(np.abs(a[cid]["probs"] - b[cid]["probs"]).max()))
        assert b[cid]["info"]["worker"]["device"] == "cpu" and "worker" not in a[cid]["info"]
    print(f"max |metric diff| = {worst_metric:.3g}, max |prob diff| = {worst_prob:.3g}")
    assert worst_metric <= 1e-6 and worst_prob <= 1e-5


def test_ray_runs_each_training_set_size_as_the_local_loop(ray_cluster, tmp_path):
    """`train_sizes` under Ray: the workers draw the same subsets (same patients, same test folds)."""
    raw = dict(strategies=("linear_probe",), train_sizes=[0.5, 1.0])
    local = grid(tmp_path / "local.sqlite", **raw)
    local["datasets"][0]["options"]["n_patients"] = 60
    remote = {**grid(tmp_path / "ray.sqlite", executor="ray", **raw), "datasets": local["datasets"]}
    assert run(load_config(raw=local), progress=False).done == run(load_config(raw=remote), progress=False).done == 4
    a, b = store_rows(tmp_path / "local.sqlite"), store_rows(tmp_path / "ray.sqlite")
    assert set(a) == set(b) and len(a) == 4
    for cid in a:
        assert a[cid]["samples"] == b[cid]["samples"]
        assert a[cid]["info"]["n_train_patients"] == b[cid]["info"]["n_train_patients"]
        assert a[cid]["info"]["train_class_counts"] == b[cid]["info"]["train_class_counts"]
    n = sorted(r["info"]["n_train_patients"] for r in a.values())
    assert n[:2] == [round(n[2] / 2), round(n[3] / 2)] or n[:2] == [round(n[3] / 2), round(n[2] / 2)]


def test_ray_races_round_by_round_like_the_local_loop(ray_cluster, tmp_path):
    """`racing: on` under Ray: the rounds run in order (every cell of a round lands before the next
    round's first), and the race ends as the local loop's does."""
    raw = dict(seeds=(0, 1), racing="on")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(raw=grid(tmp_path / "local.sqlite", **raw)), progress=False)
    finally:
        torch.set_num_threads(threads)
    run(load_config(raw=grid(tmp_path / "ray.sqlite", executor="ray", **raw)), progress=False)
    with Store(tmp_path / "local.sqlite") as a, Store(tmp_path / "ray.sqlite") as b:
        local, remote = a.cells(), b.cells()
    assert len(remote) == 8 and set(remote.status) <= {"done", "pruned"}
    assert dict(zip(local.cell_id, local.status)) == dict(zip(remote.cell_id, remote.status))
    done = remote[remote.status == "done"]
    ends = done.groupby(["seed", "fold"]).finished.agg(["min", "max"]).sort_index()
    assert (ends["max"].to_numpy()[:-1] < ends["min"].to_numpy()[1:]).all()


@pytest.fixture()
def crash_once(ray_cluster):
    """Arms the crash switch: the first cell attempt to finish kills its worker. Yields the marker it writes."""
    folder = Path(os.environ[CRASH_ONCE_ENV])
    (folder / "crashed").unlink(missing_ok=True)
    (folder / "armed").touch()
    yield folder / "crashed"
    (folder / "armed").unlink()
    (folder / "crashed").unlink(missing_ok=True)


def test_killed_worker_is_retried_and_every_cell_lands_once(crash_once, tmp_path):
    summary = run(load_config(raw=grid(tmp_path / "s.sqlite", executor="ray", max_retries=2)), progress=False)
    assert (summary.done, summary.failed) == (4, 0)
    crashed_cell, crashed_pid = crash_once.read_text().split()  # a worker really died mid-grid
    rows = store_rows(tmp_path / "s.sqlite")
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows.values())
    assert rows[crashed_cell]["info"]["worker"]["pid"] != int(crashed_pid)  # its result came from the retry
    for r in rows.values():
        assert len(r["samples"]) == len(set(r["samples"])) == 12
    with Store(tmp_path / "s.sqlite") as s:
        assert s.cells().cell_id.is_unique and len(s.predictions()) == 4 * 12


def test_cell_whose_worker_always_dies_is_failed_and_the_grid_goes_on(crash_once, tmp_path):
    cfg = grid(tmp_path / "s.sqlite", executor="ray", max_retries=0)
    summary = run(load_config(raw=cfg), progress=False)
    assert (summary.done, summary.failed) == (3, 1)
    crashed_cell = crash_once.read_text().split()[0]
    rows = store_rows(tmp_path / "s.sqlite")
    assert (rows[crashed_cell]["status"] == "failed"
            and "worker died on each of 1 attempts" in rows[crashed_cell]["error"])
    assert all(r["status"] == "done" for cid, r in rows.items() if cid != crashed_cell)
    again = run(load_config(raw=cfg), progress=False)  # a failed cell is not "done": the rerun retries it alone
    assert (again.skipped, again.done, again.failed) == (3, 1, 0)
    assert {r["status"] for r in store_rows(tmp_path / "s.sqlite").values()} == {"done"}


def test_driver_killed_and_restarted_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    store = tmp_path / "s.sqlite"
    raw = grid(store, executor="ray", ray_address=ray_cluster)
    cfg_path = tmp_path / "grid.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    log = tmp_path / "driver.log"

    def n_done() -> int:
        if not store.exists():
            return 0
        with sqlite3.connect(store, timeout=30) as conn:
            try:
                return conn.execute("SELECT COUNT(*) FROM cells WHERE status='done'").fetchone()[0]
            except sqlite3.OperationalError:  # schema not created yet
                return 0

    # The driver's output goes to a file, so it can never block on a full pipe however much Ray logs.
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medtune", "run", str(cfg_path), "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while n_done() == 0:  # kill right after the first stored cell
            if proc.poll() is not None:
                pytest.fail(f"the driver exited (rc {proc.returncode}) before any cell:\n{log.read_text()[-3000:]}")
            if time.monotonic() - t0 > 600:
                proc.kill()
                pytest.fail(f"no cell stored after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = n_done()
    assert before >= 1

    # The restarted driver: whatever the killed one had finished is reused, the rest runs now.
    again = run(load_config(raw=raw), progress=False)
    assert (again.total, again.skipped, again.done, again.failed) == (4, before, 4 - before, 0)
    rows = store_rows(store)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows.values())
    for r in rows.values():
        assert len(r["samples"]) == len(set(r["samples"])) == 12  # each cell's predictions exactly once
    with Store(store) as s:
        assert s.integrity_ok()
        cells = s.cells()
        assert cells.cell_id.is_unique
        # cells of both runs are kept (the killed run's cells are not redone under the new run id)
        assert cells.run_id.nunique() == (2 if before < 4 else 1)
        assert len(s.predictions()) == 4 * 12


def test_device_rules_under_ray():
    base = grid(Path("unused.sqlite"), executor="ray")
    with pytest.raises(ConfigError, match="gpus_per_cell"):
        check_devices(load_config(raw={**base, "device": "cuda"}))
    with pytest.raises(ConfigError, match="Ray assigns"):
        check_devices(load_config(raw={**base, "device": "cuda:1", "gpus_per_cell": 1}))
    check_devices(load_config(raw={**base, "device": "cuda", "gpus_per_cell": 0.5}))
