"""Planted results stores: cells written straight into a Store with predictions we choose, so report
and statistics tests know the right answer without training anything."""

from __future__ import annotations

import copy

import numpy as np

from medtune.grid.cells import cell_id
from medtune.evaluation.store import Store
from medtune.version import RESULTS_VERSION

BASE = {
    "dataset": {"name": "syn", "source": "synthetic", "path": None, "positive": "malignant", "fingerprint": "f0"},
    "backbone": {"name": "tiny_net", "pretrained": True, "checkpoint": None, "image_size": 224},
    "strategy": {"name": "linear_probe"},
    "head": "softmax", "n_folds": 2, "train": {"epochs": 1, "lr": 0.001}, "results_version": RESULTS_VERSION,
}


def merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def plant_cell(store: Store, change: dict, fold: int, seed: int, y: np.ndarray, probs: np.ndarray,
               samples: np.ndarray | None = None, paths: list[str] | None = None, seconds: float = 1.0,
               info: dict | None = None, label: str | None = None, metrics: dict | None = None,
               extra: list | None = None) -> dict:
    """Write one done cell whose config is BASE updated by `change` (nested dicts merge)."""
    from medtune.evaluation.metrics import clinical_metrics

    config = merge(BASE, change)
    config.update(fold=fold, seed=seed)
    if config.get("results_version") is None:
        config.pop("results_version", None)
    cell = {"cell_id": cell_id(config), "run_id": "r", "dataset": config["dataset"]["name"],
            "backbone": config["backbone"]["name"], "strategy": label or config["strategy"]["name"],
            "head": config["head"], "fold": fold, "n_folds": config["n_folds"], "seed": seed, "config": config}
    names = ["benign", "malignant"] if probs.shape[1] == 2 else [f"c{i}" for i in range(probs.shape[1])]
    m = metrics or clinical_metrics(y, probs, names, positive="malignant" if probs.shape[1] == 2 else None)
    samples = np.arange(len(y)) if samples is None else samples
    paths = paths or [f"img{i}.png" for i in samples]
    store.save_cell(cell, "done", m, (samples, paths, y, probs), seconds,
                    info={"n_train": 100, "n_test": len(y), **(info or {})}, extra=extra)
    return cell


def noisy_probs(y: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    """Binary probabilities that rank class 1 above class 0 more often as `skill` grows."""
    score = 1 / (1 + np.exp(-(skill * (2 * y - 1) + rng.normal(0, 1, len(y)))))
    return np.stack([1 - score, score], 1)


def plant_dataset(store: Store, name: str = "syn", class_names=("benign", "malignant"), positive="malignant",
                  clusters=None, subgroups=None, role: str = "train") -> None:
    store.add_dataset(name, list(class_names), {"n": 0, "positive": positive, "clusters": clusters, "role": role,
                                                "subgroups": subgroups or {}, "grouped": clusters is not None})


def plant_run(store: Store, **config) -> None:
    store.add_run("r", {"datasets": [], "backbones": [], **config}, {"medtune": "test"})
