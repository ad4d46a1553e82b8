"""The heads on equal terms: one class weighting, one decision rule, patient-grouped calibration;
the kNN head as scikit-learn computes it and as a deployed bundle reproduces it."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch.nn.functional as F
import yaml
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from sklearn.utils.class_weight import compute_class_weight

import medtune
from conftest import smoke_raw
from medtune.errors import ConfigError
from medtune.models.heads import (C_GRID, HEADS, Head, SVMHead, calibration_folds, create_head, full_proba, head_class,
                            list_heads)
from medtune.evaluation.store import Store


def _imbalanced(n=(200, 40), d=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(2), n)
    x = rng.normal(0, 1, (len(y), d)) + 0.8 * y[:, None]
    order = rng.permutation(len(y))
    return x[order], y[order]


@pytest.mark.parametrize("class_weight", ["balanced", "none"])
def test_both_heads_apply_the_configured_class_weighting(tmp_path, monkeypatch, class_weight):
    """The softmax head's loss and the SVM get the same weighting: fails if either ignores the setting."""
    seen = {"ce": [], "svm": []}
    real_ce, real_fit = F.cross_entropy, LinearSVC.fit

    def ce(logits, y, *a, weight=None, **k):
        seen["ce"].append((None if weight is None else weight.detach().cpu().numpy(), y.detach().cpu().numpy()))
        return real_ce(logits, y, *a, weight=weight, **k)

    def svm_fit(self, x, y, *a, **k):
        seen["svm"].append((self.class_weight, np.asarray(y)))
        return real_fit(self, x, y, *a, **k)

    monkeypatch.setattr(F, "cross_entropy", ce)
    monkeypatch.setattr(LinearSVC, "fit", svm_fit)
    raw = smoke_raw(tmp_path, class_weight=class_weight)
    raw["datasets"][0]["options"]["proportions"] = [5, 2, 1]  # imbalanced: balanced weights differ from 1
    raw["strategies"] = [{"name": "partial_ft", "blocks": 1}]
    raw["heads"] = ["softmax", "svm"]
    summary = medtune.run(raw, progress=False)
    assert summary.failed == 0 and summary.done == 4
    assert seen["ce"] and seen["svm"]
    for weight, _ in seen["ce"]:
        if class_weight == "none":
            assert weight is None
        else:  # the whole training fit part's frequencies: unequal on this data
            assert weight is not None and weight.max() > 1.3 * weight.min()
    assert {cw for cw, _ in seen["svm"]} == ({"balanced"} if class_weight == "balanced" else {None})
    if class_weight == "balanced":  # the loop's weights are scikit-learn's `balanced` ones, as the SVM's
        from medtune.training.loop import class_weights

        ys = [y for _, y in seen["svm"] if len(np.unique(y)) == 3]
        assert ys
        for y in ys:
            assert np.allclose(class_weights(y, 3).numpy(), compute_class_weight("balanced", classes=np.arange(3), y=y))
    with Store(raw["store"]) as s:
        infos = [json.loads(i) for i in s.cells().info_json]
    assert {i["class_weight"] for i in infos} == {class_weight}
    assert len({i["decision_rule"] for i in infos}) == 1


def test_balanced_svm_probabilities_are_on_equal_priors_and_none_keeps_the_prevalence():
    x, y = _imbalanced()
    fit_, val_, test_ = slice(0, 140), slice(140, 190), slice(190, None)
    bal = create_head("svm", class_weight="balanced").fit(x[fit_], y[fit_], x[val_], y[val_], 2)
    plain = create_head("svm", class_weight="none").fit(x[fit_], y[fit_], x[val_], y[val_], 2)
    p_bal, p_plain = full_proba(bal, x[test_], 2), full_proba(plain, x[test_], 2)
    assert np.allclose(p_bal.sum(1), 1) and np.allclose(p_plain.sum(1), 1)
    # equal priors predict the minority class far more often than the prevalence-weighted rule
    assert (p_bal.argmax(1) == 1).mean() > (p_plain.argmax(1) == 1).mean() + 0.1
    assert bal.priors_ is not None and plain.priors_ is None
    # reference: the balanced SVM's own decision on the standardised features (scikit-learn alone)
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xy = np.concatenate([x[fit_], x[val_]]), np.concatenate([y[fit_], y[val_]])
    ref = make_pipeline(StandardScaler(), LinearSVC(C=bal.chosen_, class_weight="balanced")).fit(*xy).predict(x[test_])
    assert (p_bal.argmax(1) == ref).mean() > 0.85


def test_calibration_folds_keep_patients_whole():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 3)
    y = (groups % 4 == 0).astype(int)
    order = rng.permutation(len(y))
    y, groups = y[order], groups[order]
    folds = calibration_folds(y, groups)
    assert len(folds) >= 2
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert set(y[tr]) == {0, 1}
    x = rng.normal(size=(len(y), 4)) + y[:, None]
    head = create_head("svm").fit(x[:60], y[:60], x[60:], y[60:], 2, groups=groups[:60])
    assert full_proba(head, x, 2).shape == (len(y), 2)
    with pytest.raises(ValueError, match="groups"):
        create_head("svm").fit(x[:60], y[:60], x[60:], y[60:], 2, groups=groups[:10])


@pytest.mark.parametrize("head", ["svm", "knn"])
def test_a_feature_heads_validation_predictions_come_from_a_model_that_never_saw_them(head):
    """Racing, the recommended strategy and operating points read each cell's inner-validation
    predictions. Labels here are noise, so only a head fitted on the validation images themselves
    (an SVM on 600 points in 200 dimensions, a kNN index holding each query among its k neighbours)
    scores them above chance; a head fitted on the fit part alone scores them near 0.5 (sd 0.025
    over 400 images), as on a test fold."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1000, 200)), np.tile([0, 1], 500)
    fit_, val_, test_ = slice(0, 200), slice(200, 600), slice(600, None)
    fitted = create_head(head).fit(x[fit_], y[fit_], x[val_], y[val_], 2)
    val = balanced_accuracy_score(y[val_], full_proba(fitted, x[val_], 2).argmax(1))
    test = balanced_accuracy_score(y[test_], full_proba(fitted, x[test_], 2).argmax(1))
    assert val < 0.55 and abs(val - test) < 0.1, (val, test)


def knn_by_hand(fit_x, fit_y, val_x, val_y, test_x, n_classes=2):
    """The kNN head as models/heads.py documents it, with scikit-learn alone: cosine neighbours, vote shares
    divided by the training class frequencies, k in (5, 11, 21) by inner balanced accuracy (first
    best wins), the index on the fit part only."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    def shares(k, x, y, q):
        p = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x, y).predict_proba(q)
        p = p / (np.bincount(y, minlength=n_classes) / len(y))
        return p / p.sum(1, keepdims=True)

    scores = {k: balanced_accuracy_score(val_y, shares(k, fit_x, fit_y, val_x).argmax(1)) for k in (5, 11, 21)}
    best = next(k for k, v in scores.items() if v == max(scores.values()))
    return best, shares(best, fit_x, fit_y, test_x)


def test_knn_head_is_a_cosine_vote_with_k_from_the_inner_split_and_equal_priors():
    x, y = _imbalanced(d=6, seed=3)
    fit_, val_, test_ = slice(0, 140), slice(140, 190), slice(190, None)
    head = create_head("knn").fit(x[fit_], y[fit_], x[val_], y[val_], 2)
    k, expected = knn_by_hand(x[fit_], y[fit_], x[val_], y[val_], x[test_])
    assert head.chosen_ == k
    np.testing.assert_allclose(full_proba(head, x[test_], 2), expected, atol=1e-12)
    # equal priors call the minority class more often than the raw vote shares do
    plain = create_head("knn", class_weight="none").fit(x[fit_], y[fit_], x[val_], y[val_], 2)
    assert plain.priors_ is None
    p_bal, p_plain = full_proba(head, x[test_], 2), full_proba(plain, x[test_], 2)
    assert (p_bal.argmax(1) == 1).mean() > (p_plain.argmax(1) == 1).mean()
    # a fit part smaller than every k in the grid still works, with one neighbour per training image
    tiny = create_head("knn").fit(x[:4], y[:4], x[4:8], y[4:8], 2)
    assert np.isfinite(full_proba(tiny, x[8:12], 2)).all()


def test_knn_cells_are_stored_and_their_bundle_reproduces_the_stored_predictions(tmp_path):
    import torch

    from medtune.deploy.bundle import load_bundle
    from medtune.grid.cells import prepare
    from medtune.config import load_config
    from conftest import PROB_ATOL

    raw = {**smoke_raw(tmp_path, amp="off", val_fraction=0.3), "keep_best": True, "heads": ["knn"],
           "strategies": [{"name": "partial_ft", "blocks": 1}]}
    summary = medtune.run(raw, progress=False)
    assert summary.failed == 0 and summary.done == 2
    best = summary.best_models[0]
    from pathlib import Path

    meta = json.loads((Path(best) / "model.json").read_text())
    with Store(raw["store"]) as s:
        infos = [json.loads(i) for i in s.cells().info_json]
        p = s.predictions([meta["cell_id"]])
    assert all(i["knn_k"] in (5, 11, 21) for i in infos)
    table = prepare(load_config(raw=raw).datasets[0], meta["image_size"], 2).table
    probs = load_bundle(best).select(0).predict_proba(table.images[torch.as_tensor(p["sample"].to_numpy().copy())])
    np.testing.assert_allclose(probs, np.array(p["probs"].tolist()), atol=PROB_ATOL)


def _pairs(seed: int, n_pairs: int = 150, d: int = 10):
    """Tight same-class pairs at random places, class at random: only the nearest neighbours know."""
    rng = np.random.default_rng(seed)
    centres, cls = rng.normal(size=(n_pairs, d)), rng.integers(0, 2, n_pairs)
    x = np.repeat(centres, 2, axis=0) + 0.01 * rng.normal(size=(2 * n_pairs, d))
    return x, np.repeat(cls, 2), centres, cls


def test_knn_widens_its_k_grid_below_its_start():
    """k = 5 (the start grid's low end) is strictly best of (5, 11, 21): the search goes on to 3 and 1,
    which see only the pair, and records the grid it searched."""
    x, y, centres, cls = _pairs(0)
    rng = np.random.default_rng(1)
    xv, yv = centres + 0.01 * rng.normal(size=centres.shape), cls
    head = create_head("knn").fit(x, y, xv, yv, 2)
    assert head.chosen_ < 5 and head.grid_[0] < 5 and head.edge_ is None
    assert balanced_accuracy_score(yv, full_proba(head, xv, 2).argmax(1)) == 1.0


def test_svm_records_the_c_grid_it_searched():
    x, y = _imbalanced()
    head = create_head("svm").fit(x[:160], y[:160], x[160:], y[160:], 2)
    assert head.chosen_ in head.grid_ and set(C_GRID) <= set(head.grid_)
    assert head.edge_ in (None, "low", "high")


# --------------------------------------------------------------------------- the registry
class CentroidHead(Head):
    """A head added the way the registry asks: one class (nearest class centroid, metric chosen on
    the inner split), registered by the test alone."""

    name: ClassVar[str] = "centroid"
    description: ClassVar[str] = "nearest class centroid of the pooled features (a test head)"
    info_key: ClassVar[str] = "centroid_metric"
    grid: ClassVar[tuple] = ("euclidean", "manhattan")

    def fit(self, X, y, X_val, y_val, n_classes, groups=None) -> "CentroidHead":
        fits = {m: make_pipeline(NearestCentroid(metric=m)).fit(X, y) for m in self.grid}
        score = {m: balanced_accuracy_score(y_val, p.predict(X_val)) if len(y_val) else 0.0 for m, p in fits.items()}
        self.chosen_ = max(self.grid, key=score.get)
        self.pipeline_, self.priors_, self.grid_, self.edge_ = fits[self.chosen_], None, list(self.grid), None
        return self


def test_adding_a_head_is_one_registered_class(tmp_path, monkeypatch):
    """Registered, the class is a valid `heads:` entry, its cells run and are stored with its chosen
    value under its info key; nothing else in medtune needed to learn its name."""
    from conftest import tiny_config

    monkeypatch.setitem(HEADS, CentroidHead.name, CentroidHead)  # unregistered when the test ends
    raw = yaml.safe_load(tiny_config(tmp_path, heads=["softmax", "centroid"]).read_text())
    raw["train"]["amp"] = "off"
    summary = medtune.run(raw, progress=False)
    assert summary.failed == 0 and summary.done == 4, summary
    with Store(raw["store"]) as s:
        cells = s.cells()
        rows = cells[cells["head"] == "centroid"]
        assert sorted(rows["fold"]) == [0, 1] and set(rows["status"]) == {"done"}
        for _, row in rows.iterrows():
            info = json.loads(row["info_json"])
            assert info["centroid_metric"] in CentroidHead.grid
            assert info["grids"]["centroid_metric"] == list(CentroidHead.grid)
            probs = np.stack(s.predictions([row["cell_id"]])["probs"].to_numpy())
            assert probs.shape[1] == 3 and np.allclose(probs.sum(1), 1.0)  # the synthetic set's three classes


def test_an_unregistered_head_name_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match=r"unknown head 'svn'\. Did you mean svm\? Known: softmax, svm, knn"):
        create_head("svn")
    assert list_heads()[:3] == ["softmax", "svm", "knn"] and "centroid" not in list_heads()


def test_the_softmax_head_is_registered_and_fits_nothing_on_features():
    softmax = head_class("softmax")
    assert not softmax.on_features and softmax.info_key is None
    assert all(HEADS[n].on_features and HEADS[n].info_key for n in ("svm", "knn"))
    with pytest.raises(NotImplementedError):
        softmax().fit(np.zeros((2, 2)), np.array([0, 1]), np.zeros((0, 2)), np.array([]), 2)


def test_a_head_pickled_before_the_registry_still_predicts(tmp_path):
    """Bundles written before the registry pickled the head with `pipeline`, `C`, `priors`, `grid`,
    `edge` (no trailing underscore): loading such a pickle gives a head that predicts as it did."""
    import joblib

    x, y = _imbalanced()
    head = create_head("svm").fit(x[:160], y[:160], x[160:200], y[160:200], 2)
    old = object.__new__(SVMHead)
    old.__dict__.update({"pipeline": head.pipeline_, "C": head.chosen_, "priors": head.priors_,
                         "grid": head.grid_, "edge": head.edge_})
    joblib.dump(old, tmp_path / "svm.joblib")
    loaded = joblib.load(tmp_path / "svm.joblib")
    assert loaded.chosen_ == head.chosen_ and list(loaded.classes_) == [0, 1]
    np.testing.assert_array_equal(full_proba(loaded, x[200:], 2), full_proba(head, x[200:], 2))


def test_a_head_pickled_under_the_flat_layout_loads_from_a_bundle(tmp_path, monkeypatch):
    """Before the package was split by stage, a head pickled as `medtune.heads.SVMHead`: a bundle's
    fold directory with such a file still loads (bundle.old_module_names), and the alias is gone after."""
    import sys

    import joblib
    import torch

    from medtune.deploy.bundle import _read_model

    x, y = _imbalanced()
    head = create_head("svm").fit(x[:160], y[:160], x[160:200], y[160:200], 2)
    monkeypatch.setattr(SVMHead, "__module__", "medtune.heads")
    monkeypatch.setitem(sys.modules, "medtune.heads", sys.modules["medtune.models.heads"])
    joblib.dump(head, tmp_path / "svm.joblib")
    assert b"medtune.heads" in (tmp_path / "svm.joblib").read_bytes()
    monkeypatch.undo()
    torch.save({}, tmp_path / "weights.pt")
    assert "medtune.heads" not in sys.modules
    _, loaded = _read_model(tmp_path)
    assert "medtune.heads" not in sys.modules
    np.testing.assert_array_equal(full_proba(loaded, x[200:], 2), full_proba(head, x[200:], 2))
