"""Class imbalance: `class_weighted` reweights the loss, `balanced_sampler` evens the classes seen."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import medtune.train as train
from conftest import tiny_config
from medtune.config import load_config
from medtune.runner import settings_from


def test_class_weights_are_inverse_frequency():
    labels = np.array([0] * 90 + [1] * 10)
    w = train.class_weights(labels, 2)
    assert torch.allclose(w, torch.tensor([100 / (2 * 90), 100 / (2 * 10)]))
    # Each class contributes the same total weight: the loss no longer favours the majority.
    assert torch.isclose(w[0] * 90, w[1] * 10)
    # A class absent from the training fold gets a finite weight, not a division by zero.
    w3 = train.class_weights(np.array([0, 0, 1]), 3)
    assert torch.isfinite(w3).all() and w3[0] < w3[1]


def test_class_weights_change_the_loss():
    labels = np.array([0] * 9 + [1])
    w = train.class_weights(labels, 2)
    logits = torch.zeros(10, 2)
    logits[:, 0] = 2.0  # always predicts the majority class
    y = torch.as_tensor(labels)
    plain = F.cross_entropy(logits, y)
    weighted = F.cross_entropy(logits, y, weight=w)
    assert weighted > 2 * plain  # the missed minority case now dominates


def test_balanced_sampler_evens_class_frequencies():
    labels = np.array([0] * 90 + [1] * 10)
    gen = torch.Generator().manual_seed(0)
    draws = np.concatenate([labels[train.epoch_order(labels, True, gen)] for _ in range(50)])
    assert len(draws) == 5000
    assert abs(np.mean(draws == 1) - 0.5) < 0.03
    plain = train.epoch_order(labels, False, gen)
    assert sorted(plain) == list(range(100))  # a permutation: every image once, frequencies unchanged


def test_flags_reach_the_trainer(tmp_path, monkeypatch):
    """The YAML flags arrive in TrainSettings and `fit` asks for weights and balanced orders."""
    from medtune.runner import run

    # partial_ft: a linear probe is a convex fit with no epochs to order (it takes balanced class weights)
    cfg = load_config(tiny_config(tmp_path, strategies=[{"name": "partial_ft", "blocks": 1}]),
                      ["train.class_weighted=true", "train.balanced_sampler=true"])
    s = settings_from(cfg)
    assert s.class_weighted and s.balanced_sampler
    calls = {"weights": 0, "balanced": []}
    real_weights, real_order = train.class_weights, train.epoch_order

    def spy_weights(labels, n):
        calls["weights"] += 1
        return real_weights(labels, n)

    def spy_order(labels, balanced, gen):
        calls["balanced"].append(balanced)
        return real_order(labels, balanced, gen)

    monkeypatch.setattr(train, "class_weights", spy_weights)
    monkeypatch.setattr(train, "epoch_order", spy_order)
    summary = run(cfg, progress=False)
    assert summary.done == 2
    assert calls["weights"] == 2 and calls["balanced"] and all(calls["balanced"])
