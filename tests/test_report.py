"""The report, best-model bundle, predict and export, on a tiny finished grid (see conftest.py)."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medtune.deploy.bundle import load_bundle, save_bundle
from medtune.cli import app
from medtune.evaluation.evidence import to_risk
from medtune.evaluation.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    store, _ = tiny_run
    out = tmp_path_factory.mktemp("report")
    res = CliRunner().invoke(app, ["report", "--store", str(store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_report_writes_tables_with_cis_and_one_best(report):
    df = pd.read_csv(report / "results.csv")
    assert set(df.strategy) == {"linear_probe", "partial_ft(blocks=1)"}
    assert df.best_on_test_folds.sum() == 1 and df.headline.sum() == 1
    assert df.loc[df.best_on_test_folds, "balanced_accuracy"].item() == df.balanced_accuracy.max()
    # no primary and no auto_depth: the headline falls back to the optimistic view and says so
    assert df.loc[df.headline, "headline_how"].item() == "optimistic"
    assert {"ece", "brier", "pr_auc", "ece_sd"} <= set(df.columns) and df.brier.between(0, 2).all()
    assert (df.ci_low <= df.pooled_balanced_accuracy).all() and (df.pooled_balanced_accuracy <= df.ci_high).all()
    assert (df.ci_high - df.ci_low > 0).any()
    md = (report / "results.md").read_text()
    assert "| strategy | test_efficientnet |" in md and md.count("| ★") == 1
    tex = (report / "results.tex").read_text()
    assert r"\begin{tabular}" in tex and r"partial\_ft(blocks=1)" in tex and r"$\star$" in tex


def test_report_html_is_self_contained(report):
    page = (report / "report.html").read_text()
    assert "src=\"data:image/png;base64," in page
    assert "file://" not in page and "<script" not in page
    for section in ("Balanced accuracy: strategy × backbone", "Depth of fine-tuning", "ROC and confusion matrix",
                    "Training curves", "Grad-CAM gallery", "Duplicates and leakage", "Configuration and environment",
                    "Paired tests", "Calibration and PR-AUC", "Decision curve", "Accuracy against training cost",
                    "TRIPOD+AI / CLAIM", "optimistic view"):
        assert section in page, section


def test_report_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make setup-dev installs it with apt-get where it can)")
    url = (report / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *HEADLESS, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    # main table, trainable share against full_ft, the probe's C chosen on inner splits, all metrics,
    # paired tests, descriptive ranks, calibration, TRIPOD+AI appendix
    assert dom.count("<table") == 8
    assert "★" in dom
    # depth, ROC, confusion, curves and the Grad-CAM overlays are all decoded images
    assert dom.count("data:image/png;base64,") >= 4 + 2
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *HEADLESS, f"--screenshot={shot}", "--window-size=1300,2400", url],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (2400, 1300)
    assert img.std() > 20  # not a blank page


def test_report_on_empty_store_says_what_to_do(tmp_path):
    Store(tmp_path / "empty.sqlite").close()
    res = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "empty.sqlite")])
    assert res.exit_code == 2 and "medtune run" in res.output


def _best_cell_predictions(store: Path, model_dir: Path) -> pd.DataFrame:
    cell_id = json.loads((model_dir / "model.json").read_text())["cell_id"]
    with Store(store) as s:
        p = s.predictions([cell_id])
    assert len(p) > 0
    return p


def test_predict_reproduces_the_stores_predictions(tiny_run, tmp_path):
    store, data = tiny_run
    model_dir = Path(f"{store}.models/best")
    stored = _best_cell_predictions(store, model_dir)
    res = CliRunner().invoke(app, ["predict", str(model_dir), str(data), "--out", str(tmp_path), "--cam",
                                   "--fold", "0"])  # the fold-0 network alone: the stored cell's own model
    assert res.exit_code == 0, res.output
    pred = pd.read_csv(tmp_path / "predictions.csv")
    names = json.loads((model_dir / "model.json").read_text())["class_names"]
    assert len(pred) == len(list(data.rglob("*.png")))
    merged = stored.merge(pred, on="path")
    assert len(merged) == len(stored)
    ours = merged[[f"p_{n}" for n in names]].to_numpy()
    # the stored equal-prior outputs, mapped back to the fold's training prevalence (predict.fold_probabilities)
    priors = json.loads((model_dir / "model.json").read_text())["folds"][0]["priors"]
    np.testing.assert_allclose(ours, to_risk(np.array(merged.probs.tolist()), np.array(priors)), atol=1e-4)
    assert (pred.probabilities == "at the training prevalence").all()
    assert (merged.true == [names[y] for y in merged.y_true]).all()
    assert all(Path(c).is_file() for c in pred.cam)


def test_predict_single_files_and_manifest(tiny_run, tmp_path):
    store, data = tiny_run
    from medtune.deploy.predict import predict

    files = sorted(data.rglob("*.png"))[:3]
    manifest = data / "few.csv"
    manifest.write_text("path,label\n" + "".join(f"{f.relative_to(data)},{f.parent.name}\n" for f in files))
    by_file = predict(f"{store}.models/best", files)
    by_csv = predict(f"{store}.models/best", [manifest])
    manifest.unlink()
    assert by_file["true"].isna().all() and list(by_csv["true"]) == [f.parent.name for f in files]
    np.testing.assert_allclose(by_file.filter(like="p_").to_numpy(), by_csv.filter(like="p_").to_numpy(), atol=1e-6)
    np.testing.assert_allclose(by_file.filter(like="p_").sum(1), 1.0, atol=1e-5)


def test_predict_on_a_folder_that_is_not_a_model(tmp_path):
    res = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path)])
    assert res.exit_code == 2 and "keep_best" in res.output


def test_export_torchscript_and_onnx_match_the_model(tiny_run_copy):
    store, _ = tiny_run_copy
    model_dir = Path(f"{store}.models/best")
    res = CliRunner().invoke(app, ["export", str(model_dir), "--format", "torchscript", "--format", "onnx"])
    assert res.exit_code == 0, res.output
    b = load_bundle(model_dir)
    pre = json.loads((model_dir / "preprocessing.json").read_text())
    assert pre["image_size"] == b.image_size and pre["class_names"] == b.meta["class_names"]
    images = torch.randint(0, 256, (3, 3, b.image_size, b.image_size), dtype=torch.uint8)
    from medtune.deploy.predict import fold_probabilities

    ref = fold_probabilities(b, images, None)[1]  # what `medtune predict` reports: each fold at its prevalence
    x = images.float() / 255.0
    ts = torch.jit.load(str(model_dir / "model.torchscript.pt"))
    np.testing.assert_allclose(ts(x).detach().numpy(), ref, atol=1e-5)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], ref, atol=1e-4)


def _svm_on_a_tiny_network():
    """(network, images, their features, an SVM head fitted on them, model.json without folds)."""
    import timm

    from medtune.report.explain import normalise
    from medtune.models.heads import create_head

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2).eval()
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = np.array([0, 1] * 6)
    mean, std = [0.5] * 3, [0.25] * 3
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(normalise(images, mean, std)), pre_logits=True).numpy()
    svm = create_head("svm").fit(feats[:8], labels[:8], feats[8:], labels[8:], 2)
    meta = {"backbone": "test_efficientnet", "class_names": ["a", "b"], "image_size": 32, "mean": mean, "std": std,
            "strategy": "linear_probe", "head": "svm"}
    return model, images, feats, svm, meta


def test_svm_bundle_round_trips_its_sklearn_head(tmp_path):
    from medtune.models.heads import full_proba

    model, images, feats, svm, meta = _svm_on_a_tiny_network()
    save_bundle(tmp_path, [(model.state_dict(), svm)], {**meta, "folds": [{"fold": 0, "cell_id": "c", "dir": "fold0"}]})
    assert sorted(p.name for p in (tmp_path / "fold0").iterdir()) == ["head.joblib", "weights.pt"]
    b = load_bundle(tmp_path)
    np.testing.assert_allclose(b.predict_proba(images), full_proba(svm, feats, 2), atol=1e-5)


def test_a_bundle_written_before_the_head_registry_still_loads_and_predicts(tmp_path):
    """Older bundles hold the head as `svm.joblib`, pickled with `pipeline`, `C`, `priors`, `grid`,
    `edge`: predict and export read them as before."""
    import joblib

    from medtune.deploy.bundle import export
    from medtune.models.heads import SVMHead, full_proba

    model, images, feats, svm, meta = _svm_on_a_tiny_network()
    (tmp_path / "fold0").mkdir()
    torch.save(model.state_dict(), tmp_path / "fold0" / "weights.pt")
    old = object.__new__(SVMHead)
    old.__dict__.update({"pipeline": svm.pipeline_, "C": svm.chosen_, "priors": svm.priors_, "grid": svm.grid_,
                         "edge": svm.edge_})
    joblib.dump(old, tmp_path / "fold0" / "svm.joblib")
    (tmp_path / "model.json").write_text(json.dumps({**meta, "folds": [{"fold": 0, "cell_id": "c", "dir": "fold0"}]}))
    b = load_bundle(tmp_path)
    np.testing.assert_allclose(b.predict_proba(images), full_proba(svm, feats, 2), atol=1e-5)
    export(tmp_path, "torchscript")
    assert "svm.joblib" in json.loads((tmp_path / "preprocessing.json").read_text())["output"]


def test_rerun_keeps_the_saved_model(tiny_run_copy):
    """Resuming a finished grid must not retrain the best model (its cell is already saved)."""
    import medtune
    from conftest import tiny_png_config

    store, data = tiny_run_copy
    weights = Path(f"{store}.models/best/fold0/weights.pt")
    before = weights.stat().st_mtime_ns
    summary = medtune.run(tiny_png_config(data, store), progress=False)
    assert summary.skipped == summary.total and summary.best_models
    assert weights.stat().st_mtime_ns == before


def test_minimal_install_without_grad_cam_keeps_the_model_and_says_how_to_get_cams(tmp_path, monkeypatch):
    """`pip install medtune` leaves out the report extra: the best model is still saved (no gallery),
    and `predict --cam` refuses up front with the install line instead of a ModuleNotFoundError."""
    import sys

    import medtune
    from conftest import tiny_png_config, write_pngs

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import now raises ImportError
    data = write_pngs(tmp_path / "data")
    store = tmp_path / "s.sqlite"
    summary = medtune.run(tiny_png_config(data, store), progress=False)
    model_dir = Path(f"{store}.models/best")
    assert summary.failed == 0 and (model_dir / "fold0" / "weights.pt").is_file()
    assert not (model_dir / "gallery").exists()
    res = CliRunner().invoke(app, ["predict", str(model_dir), str(data), "--cam", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "pip install 'medtune[report]'" in res.output
    assert not (tmp_path / "p" / "predictions.csv").exists()


def _depth_inputs():
    """A group table and its cells for one data set: three depth settings, two other methods, two heads."""
    from types import SimpleNamespace

    from medtune.evaluation.evidence import MAIN

    share = {"linear_probe": 0.001, "partial_ft(fraction=0.15)": 0.5, "full_ft": 1.0, "lp_ft": 1.0, "l2_sp": 1.0}
    rows, cells = [], []
    for head in ("softmax", "svm"):
        for k, (strategy, f) in enumerate(share.items()):
            group = f"{strategy} {head}"
            rows.append({"dataset": "d", "group": group, "backbone": "resnet50", "head": head, "variant": "",
                         "strategy": strategy, MAIN: 0.80 + 0.01 * k, f"{MAIN}_sd": 0.02})
            cells.append({"dataset": "d", "group": group, "info": {"trainable_fraction": f}})
    return SimpleNamespace(cells=pd.DataFrame(cells)), pd.DataFrame(rows)


def test_depth_plot_joins_only_the_depth_settings_into_the_curve():
    from medtune.report.html import fig_depth

    ev, t = _depth_inputs()
    fig = fig_depth(ev, t, "d")
    ax = fig.axes[0]
    by_label = {c.get_label(): c for c in ax.containers}
    curve = by_label["resnet50: depth curve"].lines[0].get_xdata()
    others = by_label["resnet50 · svm: other methods"].lines[0].get_xdata()
    assert list(curve) == [0.1, 50.0, 100.0]  # linear_probe, partial_ft, full_ft in order of share (%)
    assert list(others) == [100.0, 100.0]  # lp_ft and l2_sp: points at their share, not on the curve
    texts = sorted(a.get_text() for a in ax.texts)
    assert texts == sorted(["linear_probe", "partial_ft(fraction=0.15)", "full_ft", "lp_ft", "l2_sp"] * 2)


def test_figure_labels_do_not_overlap_each_other():
    """Twelve points on top of each other, a few beside them and a row of long labels side by side: the
    rendered labels are disjoint."""
    from medtune.report.html import _plt, place_labels

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(1.0, 0.8, f"strategy_{i}(blocks={i})", "C0") for i in range(12)]
    points += [(1.1, 0.8 + 0.002 * i, f"near_{i}", "C1") for i in range(4)] + [(5.0, 0.5, "far", "C2")]
    points += [(4.0 + 1.5 * i, 0.9, f"a_long_label_in_a_row_{i}", "C3") for i in range(3)]  # side by side
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    ax.set_xlim(0, 10)
    ax.set_ylim(0.4, 1.0)
    place_labels(ax, points, 9)
    fig.canvas.draw()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(a) for a in ax.texts]  # the text alone (an Annotation's adds its leader line)
    assert len(boxes) == len(points)
    overlaps = [(ax.texts[i].get_text(), ax.texts[j].get_text()) for i in range(len(boxes))
                for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    assert not overlaps
    far = next(a for a in ax.texts if a.get_text() == "far")
    assert far.arrow_patch is None  # a label with room stays beside its point, without a leader line
    plt.close(fig)


def test_reliability_diagram_of_a_large_grid_shows_the_headline_and_the_test_folds_best(tmp_path):
    """Eight overlaid calibration curves were one tangle with repeating colours (a 16-group BUSI store):
    past six groups the diagram shows the headline and the † group; a small grid shows every group."""
    from planted import noisy_probs, plant_cell, plant_dataset, plant_run

    from medtune.evaluation.evidence import group_table, read_evidence
    from medtune.report.html import fig_reliability

    def figure_labels(n_groups):
        path = tmp_path / f"s{n_groups}.sqlite"
        rng = np.random.default_rng(0)
        with Store(path) as s:
            plant_dataset(s), plant_run(s, primary="full_ft")
            for k in range(n_groups):
                for fold in range(2):
                    y = np.array([0, 1] * 20)
                    name = "full_ft" if k == 0 else f"partial_ft{k}"
                    plant_cell(s, {"strategy": {"name": name}}, fold, 0, y, noisy_probs(y, 0.3 + 0.1 * k, rng),
                               samples=np.arange(fold * 40, (fold + 1) * 40), label=name)
        ev = read_evidence(path)
        t = group_table(ev, n_boot=50)
        fig = fig_reliability(ev, t, t.dataset.iloc[0])
        best = {f"† tiny_net · {name}" for name in t[t.best_on_test_folds].strategy}
        return [txt.get_text() for txt in fig.axes[0].get_legend().get_texts()], best

    many, best = figure_labels(8)
    assert many[0] == "perfectly calibrated" and many[1] == "★ tiny_net · full_ft"  # the primary, though weakest
    assert set(many[2:]) == best and 1 <= len(best) < 7  # the best mean(s) on the test folds, not all eight
    assert len(figure_labels(4)[0]) == 5


def test_a_section_that_does_not_apply_is_left_out_of_the_page(tmp_path):
    """One data set, no racing, no external set, subgroups, operating points or saved model: those
    sections give "" (build_report joins what each section returns), and add nothing to results.md."""
    from planted import noisy_probs, plant_cell, plant_dataset, plant_run

    from medtune.report import html as report
    from medtune.evaluation.evidence import group_table, read_evidence
    from medtune.evaluation.verdict import verdicts

    rng = np.random.default_rng(0)
    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s), plant_run(s)
        for name in ("linear_probe", "full_ft"):
            for fold in range(2):
                y = np.array([0, 1] * 20)
                plant_cell(s, {"strategy": {"name": name}}, fold, 0, y, noisy_probs(y, 1.0, rng),
                           samples=np.arange(fold * 40, (fold + 1) * 40), label=name)
    ev = read_evidence(tmp_path / "s.sqlite")
    t = group_table(ev, n_boot=50)
    pg = report.Page(ev, t, verdicts(ev, t, 50), small=200, models={})
    d = report.data_of(pg, "syn")
    for section in (report.section_racing, report.section_external, report.section_subgroups,
                    report.section_operating_points, report.section_gallery):
        assert section(pg, d) == "", section.__name__
    assert report.section_across_datasets(pg) == "" and not pg.md and not pg.subgroups
    assert report.section_main_table(pg, d).startswith("<h3>Balanced accuracy: strategy × backbone")
    assert pg.md[0] == "## syn\n" and len(pg.tex) == 1  # the sections add their text tables as they go
