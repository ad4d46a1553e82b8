"""Shared fixtures: tiny folders of real image files and a tiny grid config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli_env() -> dict:
    """Environment for `python -m medtune` subprocesses: this checkout's source first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable


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
        "device": "cpu",
    }
    cfg.update(overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
