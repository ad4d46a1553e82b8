"""Probabilities scored as risks are at the training prevalence (evidence.RISK_NOTE): a class-weighted
(balanced) cell's outputs estimate equal-prior posteriors, and calibration, Brier, ECE, the decision
curve, operating points and `predict` map them back with the training fold's class frequencies
(Bayes' prior correction); classification metrics keep the stored decision rule.

The toy: true risks from a logistic model, 1 positive in 5; the stored probabilities are what a
perfectly class-weighted model outputs, the true risks divided by the priors and renormalised."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medtune.evaluation.metrics import calibration, net_benefit
from medtune.evaluation.store import Store
from planted import plant_cell, plant_run


def toy(n: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.8, 1.3, n)
    risk = 1 / (1 + np.exp(-z))
    y = (rng.random(n) < risk).astype(int)
    return y, np.stack([1 - risk, risk], 1)


def equal_prior(true: np.ndarray, priors: np.ndarray) -> np.ndarray:
    q = true / priors
    return q / q.sum(1, keepdims=True)


def toy_store(path, class_weight: str = "balanced"):
    """Two folds of the toy; each cell's stored probabilities are equal-prior under its training fold."""
    y, true = toy()
    half = len(y) // 2
    folds = [np.arange(half), np.arange(half, len(y))]
    store = Store(path)
    counts = np.bincount(y, minlength=2)
    store.add_dataset("syn", ["benign", "malignant"], {"n": len(y), "positive": "malignant", "clusters": None,
                                                       "role": "train", "subgroups": {}, "grouped": False,
                                                       "class_counts": {"benign": int(counts[0]),
                                                                        "malignant": int(counts[1])}})
    plant_run(store)
    for f, test in enumerate(folds):
        train = folds[1 - f]
        priors = np.bincount(y[train], minlength=2) / len(train)
        stored = equal_prior(true[test], priors) if class_weight == "balanced" else true[test]
        plant_cell(store, {"n_folds": 2, "train": {"class_weight": class_weight}}, f, 0, y[test], stored,
                   samples=test, info={"class_weight": class_weight})
    store.close()
    return y, true


def test_the_decision_curve_draws_true_risks_above_treat_none(tmp_path):
    """At a threshold of 0.4 the model's net benefit on its true risks is positive; read as risks,
    the equal-prior outputs would put it below treat-none. The drawn curve is the true one."""
    from medtune.evaluation.evidence import group_table, pooled, read_evidence
    from medtune.report.html import fig_decision

    y, true = toy_store(tmp_path / "t.sqlite")
    ev = read_evidence(tmp_path / "t.sqlite")
    t = group_table(ev, n_boot=20)
    row = t.iloc[0]
    fig = fig_decision(ev, [row], "syn", {row.group: "C0"})
    line = fig.axes[0].lines[0]
    pt = np.round(line.get_xdata(), 2)
    drawn = line.get_ydata()[list(pt).index(0.4)]
    _, stored, _ = pooled(ev, row.group)
    yp, _, s = pooled(ev, row.group, risk=True)
    as_stored = net_benefit(yp == 1, stored[:, 1], np.array([0.4]))[0][0]
    truth = net_benefit(y[s] == 1, true[s][:, 1], np.array([0.4]))[0][0]
    assert as_stored < 0 < drawn
    assert drawn == pytest.approx(truth, abs=0.01)


def test_ece_and_brier_are_read_at_the_training_prevalence(tmp_path):
    """The store's ECE (computed at cell time on the equal-prior outputs) is replaced at read time; the
    classification metrics and the stored rows are left alone."""
    from medtune.evaluation.evidence import read_evidence

    toy_store(tmp_path / "t.sqlite")
    with Store(tmp_path / "t.sqlite") as s:
        stored = s.metrics().set_index("cell_id")
    ev = read_evidence(tmp_path / "t.sqlite")
    m = ev.metrics.set_index("cell_id")
    for cid, r in m.iterrows():
        p = ev.predictions[ev.predictions.cell_id == cid]
        y = p.y_true.to_numpy()
        risk = np.array(p.risk.tolist())
        assert r.ece == pytest.approx(calibration(y, risk, 1)["ece"])
        assert r.ece < 0.1 < stored.loc[cid, "ece"]
        assert r.brier < stored.loc[cid, "brier"]
        assert r.balanced_accuracy == stored.loc[cid, "balanced_accuracy"] and r.auc == stored.loc[cid, "auc"]


def test_unweighted_cells_are_not_corrected(tmp_path):
    from medtune.evaluation.evidence import read_evidence

    toy_store(tmp_path / "n.sqlite", class_weight="none")
    ev = read_evidence(tmp_path / "n.sqlite")
    assert ev.priors == {}
    assert (ev.predictions.risk.map(tuple) == ev.predictions.probs.map(tuple)).all()


def test_the_training_priors_are_the_dataset_counts_minus_the_test_fold(tmp_path):
    from medtune.evaluation.evidence import read_evidence

    y, _ = toy_store(tmp_path / "t.sqlite")
    ev = read_evidence(tmp_path / "t.sqlite")
    by_fold = {int(ev.cells.set_index("cell_id").loc[c, "fold"]): p for c, p in ev.priors.items()}
    half = len(y) // 2
    np.testing.assert_allclose(by_fold[0], np.bincount(y[half:], minlength=2) / half)
    np.testing.assert_allclose(by_fold[1], np.bincount(y[:half], minlength=2) / half)


class FakeBundle:
    """What predict.fold_probabilities reads of a Bundle: meta, select(fold), predict_proba."""

    def __init__(self, meta, outputs):
        self.meta, self.outputs = meta, outputs

    def select(self, fold):
        return SimpleNamespace(predict_proba=lambda images, tta=None: self.outputs[fold])

    def predict_proba(self, images, tta=None):
        return np.mean(list(self.outputs.values()), 0)


def test_predict_maps_each_fold_model_back_with_its_own_priors_or_says_it_cannot():
    from medtune.evaluation.evidence import to_risk
    from medtune.deploy.predict import EQUAL_PRIORS, PREVALENCE, fold_probabilities

    out = {0: np.array([[0.5, 0.5], [0.2, 0.8]]), 1: np.array([[0.6, 0.4], [0.3, 0.7]])}
    priors = {0: [0.8, 0.2], 1: [0.75, 0.25]}
    meta = {"class_weight": "balanced", "folds": [{"fold": f, "priors": priors[f]} for f in (0, 1)]}
    raw, risk, scale = fold_probabilities(FakeBundle(meta, out), None, None)
    assert scale == PREVALENCE
    np.testing.assert_allclose(raw, (out[0] + out[1]) / 2)
    np.testing.assert_allclose(risk, (to_risk(out[0], np.array(priors[0])) + to_risk(out[1], np.array(priors[1]))) / 2)
    assert risk[0, 1] < 0.4  # an even equal-prior call is a 1-in-5 risk here
    old = {"class_weight": "balanced", "folds": [{"fold": 0}, {"fold": 1}]}
    raw, risk, scale = fold_probabilities(FakeBundle(old, out), None, None)
    assert scale == EQUAL_PRIORS and "records no training priors" in scale
    np.testing.assert_allclose(risk, raw)
