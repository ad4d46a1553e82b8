"""Shared fixtures: a tiny synthetic table and a tiny random-init timm model keep tests in seconds."""

from __future__ import annotations

import os

import pytest
import torch

from medtune.synthetic import make_ultrasound

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = "test_efficientnet"


@pytest.fixture(scope="session")
def tiny_table():
    return make_ultrasound(n_patients=12, images_per_patient=2, size=48, seed=1)


def smoke_raw(tmp_path, **train) -> dict:
    """The smoke grid as a dict, with its store under tmp_path."""
    return {
        "name": "t",
        "datasets": [{"name": "syn", "source": "synthetic", "options": {"n_patients": 12, "images_per_patient": 2, "seed": 0}}],
        "backbones": [{"name": TINY, "pretrained": False, "image_size": 48}],
        "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 1}, "full_ft"],
        "folds": 2,
        "train": {"epochs": 1, "batch_size": 8, "views": 2, "patience": 1, **train},
        "store": str(tmp_path / "store.sqlite"),
    }
