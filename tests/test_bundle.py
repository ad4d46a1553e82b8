"""The deployed bundle: every fold model of the headline group, averaged by predict, exported as one
graph, with a model card whose figures are the store's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from medtune.deploy.bundle import load_bundle
from medtune.evaluation.evidence import to_risk
from medtune.deploy.predict import predict, read_inputs
from medtune.evaluation.store import Store
from tests.conftest import PROB_ATOL, tiny_png_config


def stored(store: Path, cell_id: str):
    with Store(store) as s:
        return s.predictions([cell_id])


def test_bundle_holds_every_fold_of_the_group_and_predict_averages_them(tiny_run):
    store, data = tiny_run
    best = Path(f"{store}.models/best")
    meta = json.loads((best / "model.json").read_text())
    assert [e["fold"] for e in meta["folds"]] == [0, 1]
    with Store(store) as s:
        m = s.metrics()
    group = m[m.cell_id.isin([e["cell_id"] for e in meta["folds"]])]
    assert group.group.nunique() == 1 and len(group) == 2  # the two folds of one group
    per_fold = {}
    for e in meta["folds"]:
        p = stored(store, e["cell_id"])
        # each fold's network reproduces its own cell's stored out-of-fold predictions
        df = predict(best, list(p.path), fold=e["fold"])
        names = meta["class_names"]
        # ... mapped back to its training fold's prevalence, as predict reports them (predict.fold_probabilities)
        np.testing.assert_allclose(df[[f"p_{n}" for n in names]].to_numpy(),
                                   to_risk(np.array(p.probs.tolist()), np.array(e["priors"])), atol=PROB_ATOL)
        per_fold[e["fold"]] = predict(best, [data], fold=e["fold"])
    ensemble = predict(best, [data])
    cols = [f"p_{n}" for n in meta["class_names"]]
    expected = (per_fold[0][cols].to_numpy() + per_fold[1][cols].to_numpy()) / 2
    np.testing.assert_allclose(ensemble[cols].to_numpy(), expected, atol=1e-6)
    # on the out-of-fold images: the mean of the stored prediction and the other fold model's
    for e in meta["folds"]:
        p = stored(store, e["cell_id"]).set_index("path")
        other = per_fold[1 - e["fold"]].set_index("path").loc[p.index, cols].to_numpy()
        ours = ensemble.set_index("path").loc[p.index, cols].to_numpy()
        np.testing.assert_allclose(ours, (to_risk(np.array(p.probs.tolist()), np.array(e["priors"])) + other) / 2,
                                   atol=PROB_ATOL)


def test_flip_tta_averages_each_image_and_its_mirror(tiny_run):
    store, data = tiny_run
    best = Path(f"{store}.models/best")
    b = load_bundle(best)
    images, _, _ = read_inputs([data], b.image_size)
    images = images[:6]
    plain = b.predict_proba(images)
    mirrored = b.predict_proba(torch.flip(images, dims=[3]))
    np.testing.assert_allclose(b.predict_proba(images, tta="flip"), (plain + mirrored) / 2, atol=1e-6)
    assert not np.allclose(plain, mirrored)  # the flip is a real change for this network


def test_onnx_ensemble_matches_the_torch_ensemble(tiny_run_copy):
    ort = pytest.importorskip("onnxruntime")
    from medtune.deploy.bundle import export

    store, _ = tiny_run_copy
    best = Path(f"{store}.models/best")
    out = export(best, "onnx")
    b = load_bundle(best)
    images = torch.randint(0, 256, (5, 3, b.image_size, b.image_size), dtype=torch.uint8)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": (images.float() / 255).numpy()})[0]
    # the graph gives what `medtune predict` reports: each fold's output at its training prevalence, averaged
    from medtune.deploy.predict import fold_probabilities

    np.testing.assert_allclose(got, fold_probabilities(b, images, None)[1], atol=1e-4)
    single = fold_probabilities(b.select(0), images, None)[1]
    assert not np.allclose(got, single, atol=1e-4)  # it is the ensemble, not fold 0 alone
    assert json.loads((best / "preprocessing.json").read_text())["folds"] == [0, 1]


def test_model_card_figures_are_the_stores(tiny_run):
    store, _ = tiny_run
    best = Path(f"{store}.models/best")
    card = (best / "MODEL_CARD.md").read_text()
    meta = json.loads((best / "model.json").read_text())
    ids = [e["cell_id"] for e in meta["folds"]]
    with Store(store) as s:
        m = s.metrics()
        preds = s.predictions(ids)
    group = m[m.cell_id.isin(ids)]
    for metric in ("balanced_accuracy", "auc", "sensitivity"):
        mean, sd = group[metric].mean(), group[metric].std(ddof=1)
        assert f"| {metric} | {mean:.3f} | {sd:.3f} |" in card
    y = preds.y_true.to_numpy()
    pooled = balanced_accuracy_score(y, np.array(preds.probs.tolist()).argmax(1))
    assert f"pooled out-of-fold: {pooled:.3f} [" in card
    counts = {c: len(list((Path(tiny_run[1]) / c).glob("*.png"))) for c in meta["class_names"]}
    assert "classes " + ", ".join(f"{c} {n}" for c, n in counts.items()) in card
    assert "Positive class: malignant" in card and "patient-grouped" in card
    assert "mean of the probabilities of its 2 fold models" in card
    for section in ("## Data", "## Preprocessing", "## Calibration", "## Intended use", "## Limitations"):
        assert section in card


def test_the_deployed_group_follows_the_declared_primary_not_the_test_folds(tiny_run_copy):
    """Declaring the strategy with the lower test-fold mean as primary deploys it: the test folds do
    not pick the model."""
    import medtune

    store, data = tiny_run_copy
    with Store(store) as s:
        means = s.metrics().groupby("strategy")["balanced_accuracy"].mean()
    worse = means.idxmin()
    raw = {**tiny_png_config(data, store), "primary": worse}
    summary = medtune.run(raw, progress=False)
    assert summary.done == 0
    meta = json.loads((Path(f"{store}.models/best") / "model.json").read_text())
    assert meta["strategy"] == worse and meta["chosen_by"] == "primary"


def test_onnx_with_the_documented_preprocessing_reproduces_predict(tiny_run_copy, tmp_path):
    """A consumer that follows preprocessing.json (bicubic resize, [0, 1]) gets `predict`'s probabilities
    from the ONNX file; a bilinear resize does not, so the filter must be stated."""
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    from tests.conftest import write_png
    from medtune.deploy.bundle import export
    from medtune.deploy.predict import predict

    store, _ = tiny_run_copy
    best = Path(f"{store}.models/best")
    sess = ort.InferenceSession(str(export(best, "onnx")), providers=["CPUExecutionProvider"])
    pre = json.loads((best / "preprocessing.json").read_text())
    assert pre["resize"].startswith("bicubic") and "(x - mean) / std" in pre["normalisation"]
    assert "bicubic" in (best / "MODEL_CARD.md").read_text()
    files = [write_png(tmp_path / f"in{i}.png", seed=i, size=57 + 9 * i) for i in range(4)]  # resizing matters
    expected = predict(best, files)[[f"p_{c}" for c in pre["class_names"]]].to_numpy()
    s = pre["image_size"]

    def onnx_probs(resample) -> np.ndarray:
        x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((s, s), resample), dtype=np.float32)
                      .transpose(2, 0, 1) / 255 for f in files])
        return sess.run(None, {"image": x})[0]

    np.testing.assert_allclose(onnx_probs(Image.BICUBIC), expected, atol=1e-4)
    assert not np.allclose(onnx_probs(Image.BILINEAR), expected, atol=1e-4)
