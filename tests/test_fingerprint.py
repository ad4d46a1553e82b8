"""No silent reuse of old numbers: a tiny deterministic fp32 grid over every registered strategy and
every head is fingerprinted, and the fingerprint is recorded per RESULTS_VERSION. Code that moves
the predictions without bumping the version (so a resumed store would mix old and new numbers
under one id) fails here. After a deliberate change: bump version.py and record the new one with

    PYTHONPATH=src python tests/test_fingerprint.py --record
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import medtune
from medtune.grid.cells import expand, precision_of
from medtune.config import load_config
from medtune.models.heads import HEADS
from medtune.evaluation.store import Store
from medtune.training.strategies import list_strategies
from medtune.version import RESULTS_VERSION

RECORD = Path(__file__).with_name("fingerprints.json")
COMMAND = "PYTHONPATH=src python tests/test_fingerprint.py --record"
DECIMALS = 4
# what the same code may move a probability by on another CPU or thread count (reduction order);
# a real change of numbers moves them far more
ATOL = 2e-3


def grid(store: Path) -> dict:
    """Every registered strategy x every head, 2 folds of 32 images at 32 px, 1 epoch, fp32 on the CPU;
    an inner validation split large enough that the probe, SVM and kNN choose on it."""
    return {
        "name": "fingerprint",
        "datasets": [{"name": "syn", "source": "synthetic",
                      "options": {"n_patients": 16, "images_per_patient": 2, "seed": 0}}],
        "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
        "strategies": list_strategies(), "heads": list(HEADS), "folds": 2, "seeds": [0],
        "train": {"epochs": 1, "batch_size": 8, "views": 2, "patience": 1, "amp": "off", "val_fraction": 0.3},
        "store": str(store), "device": "cpu", "keep_best": False,
    }


# The grid runs in a child process with the CPU kernels pinned to AVX2 (oneDNN's convolutions and ATen's
# vectorised loops): the same code gives the same digest on an AVX2-only CPU and on an AVX-512 one, where
# the default kernels had moved two full_ft cells past ATOL (measured: 0.003 and a kNN vote of 0.27) with
# no change in the code. The environment must be set before torch starts, hence the child.
PINNED_KERNELS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def predictions() -> dict[str, list]:
    """{strategy head fold: test-fold probabilities rounded to DECIMALS}, from a fresh run in a child
    process with PINNED_KERNELS."""
    import os
    import subprocess

    env = {**os.environ, **PINNED_KERNELS, "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--emit"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def predictions_here() -> dict[str, list]:
    """The grid run in this process (the child's work)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw = grid(Path(tmp) / "store.sqlite")
        summary = medtune.run(raw, progress=False)
        assert summary.failed == 0, summary
        with Store(raw["store"]) as s:
            cells = s.cells()
            preds = s.predictions()
    out = {}
    for _, c in cells.iterrows():
        p = preds[preds["cell_id"] == c["cell_id"]].sort_values("sample")
        out[f"{c['strategy']} {c['head']} {c['fold']}"] = np.round(np.stack(p["probs"].to_numpy()), DECIMALS).tolist()
    return dict(sorted(out.items()))


def digest(preds: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(preds, sort_keys=True).encode()).hexdigest()[:16]


def changed(recorded: dict[str, list], now: dict[str, list]) -> list[str]:
    """The cells whose predictions moved by more than ATOL (or appeared, or went)."""
    out = sorted(set(recorded) ^ set(now))
    for key in sorted(set(recorded) & set(now)):
        a, b = np.asarray(recorded[key]), np.asarray(now[key])
        if a.shape != b.shape or np.abs(a - b).max() > ATOL:
            out.append(key)
    return out


def test_the_grid_covers_every_strategy_and_head(tmp_path):
    cells = expand(load_config(raw=grid(tmp_path / "s.sqlite")), "r", {"syn@32": "fp"})
    assert {c["config"]["strategy"]["name"] for c in cells} == set(list_strategies())
    assert {c["head"] for c in cells} == set(HEADS)


def test_predictions_match_the_fingerprint_of_this_results_version():
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    entry = record.get(str(RESULTS_VERSION))
    assert entry is not None, (f"no fingerprint recorded for RESULTS_VERSION {RESULTS_VERSION}: record it with "
                               f"`{COMMAND}`")
    now = predictions()
    if digest(now) == entry["digest"]:
        return
    moved = changed(entry["predictions"], now)
    assert not moved, (f"predictions changed without a RESULTS_VERSION bump ({len(moved)} cells, e.g. {moved[:3]}): "
                       f"bump version.py (with a history line) and record the new fingerprint with `{COMMAND}`")


def test_settings_that_change_numbers_change_the_cell_id(tmp_path, monkeypatch):
    """amp is in the id after it is resolved on the device, and so are the searched grids: a CPU-fp32
    cell and a GPU-bf16 cell, or cells before and after a grid change, never share an id."""
    import medtune.models.probe

    cfg = load_config(raw={**grid(tmp_path / "s.sqlite"), "strategies": ["linear_probe"], "heads": ["softmax"]})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": "auto"})})
    ids = lambda **kw: [c["cell_id"] for c in expand(cfg, "r", {"syn@32": "fp"}, **kw)]  # noqa: E731
    fp32, bf16 = ids(precision="float32"), ids(precision="bfloat16")
    assert set(fp32).isdisjoint(bf16)
    assert ids() == ids(precision=precision_of(cfg, torch.device("cpu")))
    monkeypatch.setattr(medtune.models.probe, "C_GRID", (1e-2, 1e-1, 1.0))
    assert set(ids(precision="float32")).isdisjoint(fp32)


if __name__ == "__main__":
    if sys.argv[1:] == ["--emit"]:  # the child of predictions()
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(predictions_here()))
        sys.exit(0)
    if sys.argv[1:] != ["--record"]:
        sys.exit(f"usage: {COMMAND}")
    preds = predictions()
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    record[str(RESULTS_VERSION)] = {"digest": digest(preds), "predictions": preds}
    RECORD.write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
    print(f"recorded RESULTS_VERSION {RESULTS_VERSION}: {digest(preds)} ({len(preds)} cells) in {RECORD}")
