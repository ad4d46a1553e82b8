"""The linear probe is scikit-learn's logistic regression fitted to convergence, folded into the
network's classifier: it matches sklearn's own fit and beats a few epochs of SGD on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

from medtune.probe import C_GRID, fit_linear_probe, load_into


def blobs(n, seed, k=3, d=20):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(k, d)) * 1.5
    y = rng.integers(0, k, n)
    return rng.normal(size=(n, d)) * rng.uniform(0.5, 5, d) + centres[y] * 3 + 10, y


@pytest.mark.parametrize("k", [2, 3])
def test_probe_matches_sklearns_own_fit_with_c_from_the_validation_split(k):
    x, y = blobs(200, 1, k)
    xv, yv = blobs(100, 2, k)
    fit = fit_linear_probe(x, y, xv, yv, k, class_weight="balanced")
    # the C sklearn's own pipeline picks by validation log loss over the same grid
    sc = StandardScaler().fit(x)
    losses = {C: log_loss(yv, LogisticRegression(C=C, class_weight="balanced", max_iter=5000).fit(sc.transform(x), y)
                          .predict_proba(sc.transform(xv)), sample_weight=len(yv) / (k * np.bincount(yv)[yv]))
              for C in C_GRID}
    assert fit.C == min(losses, key=losses.get)
    ref = LogisticRegression(C=fit.C, class_weight="balanced", max_iter=5000).fit(sc.transform(x), y)
    clf = torch.nn.Linear(x.shape[1], k).double()
    load_into(clf, fit)
    with torch.no_grad():
        ours = torch.softmax(clf(torch.as_tensor(xv)), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(sc.transform(xv)), atol=1e-4)


def test_probe_beats_sgd_on_the_same_features():
    x, y = blobs(300, 3)
    xv, yv = blobs(100, 4)
    xt, yt = blobs(300, 5)
    fit = fit_linear_probe(x, y, xv, yv, 3)
    probe = balanced_accuracy_score(yt, (xt @ fit.weight.T + fit.bias).argmax(1))
    torch.manual_seed(0)
    clf = torch.nn.Linear(x.shape[1], 3)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    xs, ys = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(8):  # the demo's 8 epochs in batches of 32
        for s in range(0, len(x), 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(clf(xs[s:s + 32]), ys[s:s + 32]).backward()
            opt.step()
    with torch.no_grad():
        sgd = balanced_accuracy_score(yt, clf(torch.as_tensor(xt, dtype=torch.float32)).argmax(1).numpy())
    assert probe >= sgd and probe > 0.9
