"""The grid end to end on the smoke configuration: store contents, resume, SVM head, auto_depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import medtune
from medtune.config import load_config
from medtune.models.heads import create_head, full_proba
from medtune.grid.cells import expand, prepare, settings_from
from medtune.evaluation.store import Store
from medtune.training.loop import set_seed
from conftest import PROB_ATOL, TINY, smoke_raw


def test_grid_runs_stores_everything_and_resumes_without_redoing(tmp_path):
    raw = smoke_raw(tmp_path)
    first = medtune.run(raw, progress=False)
    assert (first.total, first.done, first.failed, first.skipped) == (6, 6, 0, 0)
    with Store(raw["store"]) as s:
        cells = s.cells()
        preds = s.predictions()
        metrics = s.metrics()
        assert s.integrity_ok()
    assert len(cells) == 6 and set(cells.status) == {"done"}
    # every image is predicted exactly once per strategy (out of fold)
    for strategy, group in cells.groupby("strategy"):
        samples = preds[preds.cell_id.isin(group.cell_id)]["sample"]
        assert sorted(samples) == list(range(24)), strategy
    assert {"accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "auc"} <= set(metrics.columns)
    again = medtune.run(raw, progress=False)
    assert (again.done, again.skipped) == (0, 6)
    with Store(raw["store"]) as s:
        assert len(s.cells()) == 6 and len(s.predictions()) == len(preds)


def test_cell_ids_depend_on_config_and_data_not_on_run():
    cfg = load_config(raw=smoke_raw(__import__("pathlib").Path("/tmp")))
    a = expand(cfg, "run1", {"syn@48": "f1"})
    b = expand(cfg, "run2", {"syn@48": "f1"})
    c = expand(cfg, "run1", {"syn@48": "f2"})
    assert [x["cell_id"] for x in a] == [x["cell_id"] for x in b]
    assert not {x["cell_id"] for x in a} & {x["cell_id"] for x in c}
    assert len({x["cell_id"] for x in a}) == 6


def test_svm_head_predictions_come_from_an_svm_on_network_features(tmp_path):
    """Recompute the SVM by hand from the pretrained network's pre-logits features."""
    raw = smoke_raw(tmp_path, amp="off", val_fraction=0.3)
    raw["strategies"] = ["linear_probe"]
    raw["heads"] = ["svm"]
    raw["datasets"][0]["options"]["n_patients"] = 36  # every class in each calibration fold of the fit part
    cfg = load_config(raw=raw)
    medtune.run(cfg, progress=False)
    with Store(raw["store"]) as s:
        cells = s.cells()
        preds = s.predictions()
    cell = cells[cells.fold == 0].iloc[0]
    stored = np.array(preds[preds.cell_id == cell.cell_id].sort_values("sample")["probs"].tolist())
    data = prepare(cfg.datasets[0], 48, 2)
    tr, te = data.splits(2, 0)[0]
    from medtune.data.splits import inner_split

    fit_idx, val_idx = inner_split(tr, data.table.labels, data.groups, 0.3, 0)
    assert len(val_idx) > 0  # C is chosen on a real inner split
    set_seed(0)
    model = medtune.create_backbone(TINY, pretrained=False, num_classes=3).eval()
    from medtune.models.backbones import preprocessing

    pre = preprocessing(model)
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    x = (data.table.images.float() / 255 - mean) / std
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    y = data.table.labels
    expected = balanced_svm_by_hand(feats[fit_idx], y[fit_idx], feats[val_idx], y[val_idx], feats[np.sort(te)],
                                    groups=data.groups[fit_idx])
    assert np.allclose(stored, expected, atol=PROB_ATOL)


def balanced_svm_by_hand(fit_x, fit_y, val_x, val_y, test_x, groups=None):
    """The head as models/heads.py documents it, written here with scikit-learn alone: C from the grid
    1e-4..1e-2 by inner balanced accuracy (first best wins), then fitted on the fit part alone with
    3-fold sigmoid calibration (folds grouped by patient: `groups` of the fit part), probabilities
    divided by the training class frequencies and renormalised."""
    import warnings

    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    svc = lambda C: LinearSVC(C=C, class_weight="balanced", max_iter=5000, dual="auto")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = {C: balanced_accuracy_score(val_y,
                                             make_pipeline(StandardScaler(), svc(C)).fit(fit_x, fit_y).predict(val_x))
                  for C in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
        best = next(C for C, v in scores.items() if v == max(scores.values()))
        x, y = fit_x, fit_y
        from sklearn.model_selection import StratifiedGroupKFold

        cv = 3 if groups is None else list(StratifiedGroupKFold(3).split(x, y, groups))
        calibrated = make_pipeline(StandardScaler(),
                                   CalibratedClassifierCV(svc(best), method="sigmoid", cv=cv)).fit(x, y)
    p = calibrated.predict_proba(test_x) / (np.bincount(y, minlength=3)[calibrated.classes_] / len(y))
    out = np.zeros((len(test_x), 3))
    out[:, calibrated.classes_] = p / p.sum(1, keepdims=True)
    return out


def test_auto_depth_picks_by_inner_cv_and_records_it(tmp_path):
    raw = smoke_raw(tmp_path)
    raw["strategies"] = [{"name": "auto_depth", "candidates": ["linear_probe", "full_ft"], "inner_folds": 2}]
    summary = medtune.run(raw, progress=False)
    assert summary.done == 2
    with Store(raw["store"]) as s:
        infos = [__import__("json").loads(i) for i in s.cells().info_json]
    for info in infos:
        scores = info["auto_depth"]["scores"]
        assert set(scores) == {"linear_probe", "full_ft"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())  # inner balanced accuracies
        # the pick is the best inner score (ties: the lower inner loss, grid/select.py),
        # and that strategy is what trained
        losses = info["auto_depth"]["losses"]
        assert info["auto_depth"]["picked"] == max(("linear_probe", "full_ft"), key=lambda k: (scores[k], -losses[k]))
        assert info["strategy_label"] == info["auto_depth"]["picked"]


def test_settings_round_trip_from_config(tmp_path):
    cfg = load_config(raw=smoke_raw(tmp_path, lr=0.01))
    s = settings_from(cfg)
    assert s.lr == 0.01 and s.views == 2 and s.augment.hflip is True


def test_heads_share_one_training_run(tmp_path):
    raw = smoke_raw(tmp_path)
    raw["strategies"] = ["full_ft"]
    raw["heads"] = ["softmax", "svm"]
    assert medtune.run(raw, progress=False).done == 4
    with Store(raw["store"]) as s:
        cells = s.cells()
    import json

    shared = {(r.head, r.fold): json.loads(r.info_json).get("shared_training_with_other_head", False)
              for r in cells.itertuples()}
    assert shared == {("softmax", 0): False, ("softmax", 1): False, ("svm", 0): True, ("svm", 1): True}


def test_svm_head_probabilities_follow_the_balanced_svm_not_the_prevalence():
    """Calibration alone brings the training prevalence back (argmax leans to the majority class);
    the head's probabilities use equal priors, so their argmax matches the class-balanced SVM."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    counts, d = (300, 60, 30), 20
    centres = rng.normal(0, 0.6, (3, d))
    x = np.concatenate([rng.normal(centres[k], 1.0, (n, d)) for k, n in enumerate(counts)])
    y = np.repeat(np.arange(3), counts)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    fit_, val_, test_ = slice(0, 200), slice(200, 280), slice(280, None)
    svm = create_head("svm").fit(x[fit_], y[fit_], x[val_], y[val_], 3)
    ours = full_proba(svm, x[test_], 3).argmax(1)
    raw = svm.pipeline_.predict_proba(x[test_]).argmax(1)  # calibrated, prevalence-weighted
    decision = svm.pipeline_.steps[-1][1].calibrated_classifiers_[0].estimator.predict(
        svm.pipeline_.steps[0][1].transform(x[test_]))
    assert np.allclose(full_proba(svm, x[test_], 3).sum(1), 1.0)
    assert (ours == decision).mean() > (raw == decision).mean()
    assert balanced_accuracy_score(y[test_], ours) > balanced_accuracy_score(y[test_], raw) + 0.05


def test_best_model_is_the_grids_own_fold0_model_not_a_retrain(tmp_path, monkeypatch):
    """keep_best saves the fold-0 model the grid trained (no extra cell); a store whose models were not
    kept (resumed from an older run) gets that cell retrained instead, and either way the bundle
    reproduces the stored predictions."""
    import medtune.grid.cells as cells
    from medtune.deploy.bundle import fold_models_dir, load_bundle

    calls = []
    real = cells.run_cell
    monkeypatch.setattr(cells, "run_cell", lambda *a, **k: calls.append(a[0]["cell_id"]) or real(*a, **k))
    raw = {**smoke_raw(tmp_path, amp="off"), "keep_best": True, "heads": ["softmax", "svm"]}
    summary = medtune.run(raw, progress=False)
    assert summary.done == len(calls) == 12  # 3 strategies x 2 heads x 2 folds, and nothing retrained
    best = Path(f"{raw['store']}.models/best")
    assert not fold_models_dir(raw["store"]).exists()  # the other groups' fold-0 models are cleaned up

    def bundle_reproduces_store():
        import json

        meta = json.loads((best / "model.json").read_text())
        with Store(raw["store"]) as s:
            p = s.predictions([meta["cell_id"]])
            table = prepare(load_config(raw=raw).datasets[0], meta["image_size"], 2).table
        probs = load_bundle(best).select(0).predict_proba(table.images[torch.as_tensor(p["sample"].to_numpy().copy())])
        np.testing.assert_allclose(probs, np.array(p["probs"].tolist()), atol=PROB_ATOL)
        return meta["cell_id"], [e["cell_id"] for e in meta["folds"]]

    kept_id, fold_ids = bundle_reproduces_store()
    import shutil

    shutil.rmtree(best)
    calls.clear()
    again = medtune.run(raw, progress=False)  # every cell is done; the best model is gone and was not kept
    assert again.done == 0 and calls == fold_ids  # each fold model of the deployed group, retrained once
    assert bundle_reproduces_store() == (kept_id, fold_ids)
