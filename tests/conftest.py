"""Shared fixtures: tiny synthetic tables, tiny folders of real image files and tiny grid configs,
with a tiny random-init timm model: every test runs in seconds."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
import torch
from hypothesis import HealthCheck, settings

from medtune.data.synthetic import make_ultrasound

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli_env() -> dict:
    """Environment for `python -m medtune` subprocesses: this checkout's source first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable

# The suite runs on the CPU (CI has no GPU); MEDTUNE_TEST_DEVICE=cuda runs its grids and training
# contracts on a GPU instead, to check the CUDA paths (device placement, AMP) on a machine that has one.
DEVICE = os.environ.get("MEDTUNE_TEST_DEVICE", "cpu")
# Probabilities recomputed outside the grid match the store to this: on a GPU, TF32 convolutions and
# batch-size-dependent bf16 kernels move them by about 1e-3.
PROB_ATOL = 1e-4 if DEVICE == "cpu" else 5e-3


def write_png(path: Path, seed: int, size: int = 24) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes x 6 distinct random PNGs."""
    root = tmp_path / "data"
    for c, cls in enumerate(("benign", "malignant")):
        for i in range(6):
            write_png(root / cls / f"{cls}_{i}.png", seed=100 * c + i)
    return root


def tiny_config(tmp_path: Path, **overrides) -> Path:
    """A synthetic grid that runs in seconds; `overrides` replace top-level keys."""
    cfg = {
        "name": "tiny",
        "datasets": [{"name": "syn", "source": "synthetic",
                      "options": {"n_patients": 8, "images_per_patient": 2, "seed": 0}}],
        "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
        "strategies": ["linear_probe"],
        "folds": 2,
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1},
        "store": str(tmp_path / "store.sqlite"),
        "device": DEVICE,
        "keep_best": False,
    }
    cfg.update(overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TEST_THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(TEST_THREADS)

TINY = "test_efficientnet"

# Hypothesis: the same examples on every run (derandomised, no example database), a bounded number of
# them and no per-example deadline (a loaded CI runner is slow, not wrong). HYPOTHESIS_PROFILE=explore
# searches afresh with more examples, for a local bug hunt.
settings.register_profile("medtune", derandomize=True, database=None, deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, database=None, deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "medtune"))


@pytest.fixture(autouse=True)
def fresh_global_state():
    """Each test starts from the same process-wide state, whatever ran before it: an empty shared
    feature cache (a warm cache would hide a wrong key and make results depend on test order), no
    memoised feature chains, and the suite's torch thread count."""

    def reset() -> None:
        for name in ("medtune.training.features", "medtune.training.loop", "medtune.grid.distributed"):
            module = sys.modules.get(name)
            for attr in ("_SHARED_CACHE", "_CACHE"):
                if module is not None and hasattr(module, attr):
                    setattr(module, attr, None)
        backbones = sys.modules.get("medtune.models.backbones")
        chain = getattr(backbones, "_feature_chain_cached", None)
        if chain is not None and hasattr(chain, "cache_clear"):
            chain.cache_clear()
        torch.set_num_threads(TEST_THREADS)

    reset()
    yield
    reset()


# --------------------------------------------------------------------------- no silent skips in CI
def _optional_extras() -> set[str]:
    """Extras of pyproject.toml that the `dev` extra (what `make test` installs) does not cover."""
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]
    dev = set(extras.get("dev", []))
    return {name for name, reqs in extras.items() if name != "dev" and not set(reqs) <= dev}


OPTIONAL_EXTRAS = _optional_extras()
STRICT_SKIPS = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("MEDTUNE_STRICT_SKIPS") == "1"


def skip_is_allowed(reason: str) -> bool:
    """A skip is honest in CI only when it names an optional extra `make test` does not install,
    as `medtune[extra]`: everything else it skips over is installed, so a skip means a broken install."""
    return any(extra in OPTIONAL_EXTRAS for extra in re.findall(r"medtune\[(\w+)\]", reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if STRICT_SKIPS and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not skip_is_allowed(reason):
            rep.outcome = "failed"
            rep.longrepr = (f"unexpected skip under CI/MEDTUNE_STRICT_SKIPS: {reason}\n"
                            "Only a skip naming an optional extra outside `dev` "
                            f"({', '.join(sorted(OPTIONAL_EXTRAS))}) as medtune[extra] is allowed; install what is "
                            "missing (make setup-dev).")


@pytest.fixture(scope="session")
def tiny_table():
    return make_ultrasound(n_patients=12, images_per_patient=2, size=48, seed=1)


def smoke_raw(tmp_path, **train) -> dict:
    """The smoke grid as a dict, with its store under tmp_path."""
    return {
        "name": "t",
        "datasets": [{"name": "syn", "source": "synthetic",
                      "options": {"n_patients": 12, "images_per_patient": 2, "seed": 0}}],
        "backbones": [{"name": TINY, "pretrained": False, "image_size": 48}],
        "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 1}, "full_ft"],
        "folds": 2,
        "train": {"epochs": 1, "batch_size": 8, "views": 2, "patience": 1, **train},
        "store": str(tmp_path / "store.sqlite"),
        "device": DEVICE,
        "keep_best": False,
    }



def write_pngs(root: Path, n_patients: int = 12, images_per_patient: int = 2, size: int = 32) -> Path:
    """Synthetic ultrasound as a folder-per-class data set with patient ids in the file names."""
    t = make_ultrasound(n_patients=n_patients, images_per_patient=images_per_patient, size=size, seed=0)
    for img, y, p in zip(t.images, t.labels, t.paths):
        patient, stem = p.split("/")[-2:]
        f = root / t.class_names[y] / f"{patient}_{stem}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(f)
    return root


def tiny_png_config(data: Path, store: Path, heads=("softmax",)) -> dict:
    """The grid behind `tiny_run`: a PNG folder with patient ids in file names."""
    return {
        "name": "tiny",
        "datasets": [{"name": "tiny_us", "path": str(data), "group_pattern": r"^(P\d+)_", "positive": "malignant"}],
        "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
        "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 1}],
        "heads": list(heads), "folds": 2, "seeds": [0],
        "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1, "amp": "off"},
        "store": str(store),
        "device": DEVICE,
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(store path, data folder) of a finished 2-strategy x 2-fold grid with its best models.
    Shared by the session, so read-only: a test that writes to the store uses `tiny_run_copy`."""
    import medtune

    root = tmp_path_factory.mktemp("tiny")
    data = write_pngs(root / "data")
    store = root / "tiny.sqlite"
    summary = medtune.run(tiny_png_config(data, store), progress=False)
    assert summary.failed == 0, summary
    return store, data


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A private copy of `tiny_run`'s store and saved models (the data folder stays shared, read-only)."""
    store, data = tiny_run
    copy = tmp_path / store.name
    shutil.copy2(store, copy)
    models = Path(f"{store}.models")
    if models.exists():
        shutil.copytree(models, Path(f"{copy}.models"))
    return copy, data
