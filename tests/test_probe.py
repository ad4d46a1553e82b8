"""The linear probe is scikit-learn's logistic regression fitted to convergence, folded into the
network's classifier: it matches sklearn's own fit and beats a few epochs of SGD on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

from medtune.models.probe import C_BOUNDS, C_GRID, fit_linear_probe, load_into, search, widen_log


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


def latent(n, seed, d, signal=0.5, noise=0.5):
    """d noisy copies of one latent score: the optimum needs a C far below the old grid (1e-3..10)."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)
    y = (t * signal + rng.logistic(size=n) > 0).astype(int)
    return t[:, None] + noise * rng.normal(size=(n, d)), y


def _test_loss(C, x, y, xt, yt):
    sc = StandardScaler().fit(x)
    return log_loss(yt, LogisticRegression(C=C, max_iter=5000).fit(sc.transform(x), y).predict_proba(sc.transform(xt)))


def test_probe_widens_its_c_grid_to_reach_sklearns_wide_search():
    """The convex optimum lies below the start grid: the probe goes past its end (on the inner
    validation split only) and scores what an outer sklearn search over 1e-6..1e4 scores."""
    x, y = latent(200, 1, 1000)
    xv, yv = latent(400, 2, 1000)
    xt, yt = latent(2000, 3, 1000)
    fit = fit_linear_probe(x, y, xv, yv, 2)
    assert fit.C < min(C_GRID) and fit.edge is None and min(fit.grid) < fit.C
    wide = [10.0 ** k for k in range(-6, 5)]
    val = {C: _test_loss(C, x, y, xv, yv) for C in wide}  # sklearn's search, on the same validation split
    ref = _test_loss(min(val, key=val.get), x, y, xt, yt)
    ours = log_loss(yt, torch.softmax(torch.as_tensor(xt @ fit.weight.T + fit.bias), 1).numpy())
    assert ours <= ref + 1e-4
    old = {C: val[C] if C in val else _test_loss(C, x, y, xv, yv) for C in C_GRID}
    assert ours < _test_loss(min(old, key=old.get), x, y, xt, yt) - 1e-3  # what the unwidened grid picked


def test_probe_flags_a_pick_still_at_a_bound():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = (x[:, 0] > 0).astype(int)  # separable: the loss keeps falling with C
    xv = rng.normal(size=(300, 2))
    fit = fit_linear_probe(x, y, xv, (xv[:, 0] > 0).astype(int), 2)
    assert fit.C == C_BOUNDS[1] and fit.edge == "high" and fit.grid[-1] == C_BOUNDS[1]


def test_search_widens_only_past_a_strictly_winning_end():
    calls = []

    def score(v):
        calls.append(v)
        return -abs(np.log10(v) + 4)  # best at 1e-4

    found = search((1e-2, 1e-1, 1.0), score, widen_log(1e-6, 1e4, 10.0))
    assert found.best == 1e-4 and found.edge is None and found.grid[0] == 1e-5
    plateau = search((1e-2, 1e-1, 1.0), lambda v: 1.0 if v <= 1e-1 else 0.0, widen_log(1e-6, 1e4, 10.0))
    assert plateau.best == 1e-2 and plateau.grid == [1e-2, 1e-1, 1.0]  # a tie with the inner value: no widening
    bound = search((1e-2, 1e-1), lambda v: -v, widen_log(1e-3, 1e4, 10.0))
    assert bound.best == 1e-3 and bound.edge == "low"


def test_probe_decisions_survive_bf16_autocast():
    """The probe's folded weights (standardisation inside) in a bf16 classifier flipped 97 of 2,000
    decisions on a dense toy; the network's classifier runs in fp32, so bf16 inputs decide as the fit."""
    from medtune.models.backbones import create_backbone
    from medtune.training.features import POOLED, Forward
    from medtune.training.precision import autocast

    model = create_backbone("test_efficientnet", False, 3).eval()
    d = model.get_classifier().in_features
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 2000)  # dense: a large common offset, classes 0.005 apart (72 flips before)
    x = 5 + 0.1 * rng.normal(size=(2000, d)) + 0.005 * np.random.default_rng(0).normal(size=(3, d))[y]
    x = torch.as_tensor(x, dtype=torch.bfloat16).float().numpy()  # features as a bf16 cache holds them
    fit = fit_linear_probe(x[:1000], y[:1000], x[1000:1500], y[1000:1500], 3)
    load_into(model.get_classifier(), fit)
    fwd = Forward(model, None)
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        logits = fwd.rest(torch.as_tensor(x, dtype=torch.bfloat16), POOLED)
    ref = x.astype(np.float64) @ fit.weight.T + fit.bias
    assert (logits.float().numpy().argmax(1) != ref.argmax(1)).sum() == 0


def test_the_convex_fits_run_on_one_blas_thread(monkeypatch):
    """OpenBLAS's threads spin-wait beside torch's (a demo probe cell: 57-67 s with two, 2-3 s with one):
    the probe, SVM and kNN fits run with one BLAS thread."""
    from threadpoolctl import threadpool_info

    from medtune.models import heads

    from medtune.models import probe

    seen = []
    real_fit = probe.LogisticRegression.fit

    def spy(self, *a, **k):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real_fit(self, *a, **k)

    monkeypatch.setattr(probe.LogisticRegression, "fit", spy)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), np.arange(60) % 2
    probe.fit_linear_probe(x[:40], y[:40], x[40:], y[40:], 2)
    assert seen and all(s == {1} for s in seen)
    assert heads.SVMHead.fit.__wrapped__ and heads.KNNHead.fit.__wrapped__  # the same wrapper on the heads' fits
