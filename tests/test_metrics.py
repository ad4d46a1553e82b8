import numpy as np
import pytest

from medtune.evaluation.metrics import auc, clinical_metrics, from_counts


def probs_from_pred(pred, k):
    p = np.full((len(pred), k), 0.1 / (k - 1))
    p[np.arange(len(pred)), pred] = 0.9
    return p


def test_cheng_chiang_2023_published_figures():
    """Cheng & Chiang 2023: 44 malignant / 119 benign, TP=36 FN=8 TN=109 FP=10 ->
    accuracy 89.0%, sensitivity 81.8%, specificity 91.6%, PPV 78.3%, NPV 93.2%."""
    m = from_counts(tp=36, fn=8, tn=109, fp=10)
    assert round(m["accuracy"] * 100, 1) == 89.0
    assert round(m["sensitivity"] * 100, 1) == 81.8
    assert round(m["specificity"] * 100, 1) == 91.6
    assert round(m["ppv"] * 100, 1) == 78.3
    assert round(m["npv"] * 100, 1) == 93.2


def test_clinical_metrics_reproduce_cheng_chiang_from_predictions():
    # class 0 benign, class 1 malignant (positive)
    y = np.array([1] * 44 + [0] * 119)
    pred = np.array([1] * 36 + [0] * 8 + [0] * 109 + [1] * 10)
    m = clinical_metrics(y, probs_from_pred(pred, 2), ["benign", "malignant"], positive="malignant")
    assert m["sensitivity"] == pytest.approx(36 / 44)
    assert m["specificity"] == pytest.approx(109 / 119)
    assert m["ppv"] == pytest.approx(36 / 46)
    assert m["npv"] == pytest.approx(109 / 117)
    assert m["accuracy"] == pytest.approx(145 / 163)
    assert m["balanced_accuracy"] == pytest.approx((36 / 44 + 109 / 119) / 2)


def test_positive_class_changes_binary_metrics():
    y = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 0])
    p = probs_from_pred(pred, 2)
    a = clinical_metrics(y, p, ["a", "b"], positive="b")
    b = clinical_metrics(y, p, ["a", "b"], positive="a")
    assert a["sensitivity"] == pytest.approx(0.5) and b["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == b["sensitivity"]


def test_multiclass_macro_and_per_class():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = clinical_metrics(y, probs_from_pred(pred, 3), ["a", "b", "c"])
    assert m["sensitivity[a]"] == pytest.approx(0.5)
    assert m["sensitivity[b]"] == pytest.approx(1.0)
    assert m["sensitivity"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["balanced_accuracy"] == pytest.approx(m["sensitivity"])
    assert m["ppv[b]"] == pytest.approx(2 / 3)
    assert 0 <= m["auc"] <= 1


def test_auc_is_nan_when_a_class_is_absent():
    y = np.array([0, 0, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    assert np.isnan(auc(y, p))


@pytest.mark.parametrize("classes,positive", [(["malignant", "normal"], "malignant"),
                                              (["benign", "malignant"], "malignant"),
                                              (["malignant", "normal"], "normal"), (["benign", "malignant"], "benign")])
def test_binary_auc_scores_the_positive_class_in_either_class_order(classes, positive):
    """A perfect classifier has AUC 1 whether the positive class sorts first or last (the old
    `probs[:, positive or 1]` scored column 1 when positive was class 0, giving 0.0)."""
    pos = classes.index(positive)
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])  # P(class 1): ranks class 1 perfectly
    probs = np.stack([1 - p1, p1], 1)
    m = clinical_metrics(y, probs, classes, positive=positive)
    assert m["auc"] == pytest.approx(1.0)
    assert auc(y, probs, positive=pos) == pytest.approx(1.0)
    # a classifier that ranks the positive class worst scores 0, in both orders too
    assert auc(y, probs[:, ::-1], positive=pos) == pytest.approx(0.0)


# --------------------------------------------------------------------------- one balanced accuracy
def test_balanced_accuracy_is_sklearns_mean_recall_over_the_classes_present():
    import warnings

    from sklearn.metrics import balanced_accuracy_score as sklearn_score

    from medtune.evaluation.metrics import balanced_accuracy, balanced_accuracy_score

    rng = np.random.default_rng(0)
    for n in (3, 7, 40):
        for _ in range(50):
            y = rng.integers(0, 4, n)  # a class can be absent from y, and predicted all the same
            pred = rng.integers(0, 4, n)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns when pred holds a class y lacks
                expected = sklearn_score(y, pred)
            assert balanced_accuracy_score(y, pred) == expected  # exactly: stored numbers must not move
            assert balanced_accuracy(y, probs_from_pred(pred, 4)) == expected


# --------------------------------------------------------------------------- the metric table
def table_rows():
    from medtune.evaluation.metrics import METRICS

    return METRICS


def test_the_metric_table_names_each_metric_once_and_orders_main_metrics():
    from medtune.evaluation.metrics import MAIN_METRICS

    rows = table_rows()
    names, shorts = [m.name for m in rows], [m.short for m in rows]
    assert MAIN_METRICS == names and len(set(names)) == len(names) and len(set(shorts)) == len(shorts)
    assert "balanced_accuracy" in names and all(m.legend for m in rows)


def test_clinical_metrics_computes_every_metric_of_the_table():
    y = np.array([0, 1, 2, 0, 1, 2])
    for k, positive in ((2, "c1"), (3, None), (3, "c2")):
        yk = y % k
        out = clinical_metrics(yk, probs_from_pred(yk[::-1], k), [f"c{i}" for i in range(k)], positive=positive)
        assert {m.name for m in table_rows()} <= set(out)


def test_racing_accepts_exactly_the_raceable_metrics_and_names_the_choices_otherwise():
    from pydantic import ValidationError

    from medtune.config import RacingConfig

    raceable = [m.name for m in table_rows() if m.raceable]
    assert "balanced_accuracy" in raceable and RacingConfig().metric == "balanced_accuracy"
    for m in table_rows():
        if m.raceable:
            assert m.greater_is_better, f"racing keeps the highest score; {m.name} is lower-is-better"
            assert RacingConfig(metric=m.name).metric == m.name
        else:
            with pytest.raises(ValidationError) as err:
                RacingConfig(metric=m.name)
            assert repr(m.name) in str(err.value) and all(r in str(err.value) for r in raceable)


def test_the_report_legend_explains_every_short_label_of_the_table():
    from medtune.report.html import metric_legend

    text = metric_legend(" (malignant)")
    for m in table_rows():
        assert m.short in text and m.legend in text
    one_vs_rest = "/".join(m.short for m in table_rows() if m.needs_positive)
    assert f"{one_vs_rest} = " in text and text.count(" (malignant)") == 1
    assert text.startswith("acc = accuracy, bal_acc = balanced accuracy, sens/spec/PPV/NPV = ")


def test_results_wide_shows_a_column_per_metric_of_the_table_in_its_order(tmp_path):
    from typer.testing import CliRunner

    from medtune.cli import app
    from medtune.evaluation.store import Store
    from planted import plant_cell, plant_dataset, plant_run

    y = np.array([0, 1] * 4)
    p = np.stack([1 - y * 0.8 - 0.1, y * 0.8 + 0.1], 1)
    path = tmp_path / "s.sqlite"
    with Store(path) as s:
        plant_dataset(s), plant_run(s)
        for fold in range(2):
            plant_cell(s, {}, fold, 0, y, p, samples=np.arange(8 * fold, 8 * fold + 8))
    res = CliRunner().invoke(app, ["results", "--store", str(path), "--wide"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    head = next(x for x in res.output.splitlines() if x.startswith("┃"))
    columns = [c.strip() for c in head.strip().strip("┃").split("┃")]
    shorts = [m.short.replace("_", " ") for m in table_rows()]
    assert [c for c in columns if c in shorts] == shorts


def test_a_metric_is_one_row_of_the_table(monkeypatch):
    """Adding a metric is one `Metric` row with its `compute`: clinical_metrics computes every row (here
    Matthews' correlation from scikit-learn, on the argmax decision)."""
    from sklearn.metrics import matthews_corrcoef

    from medtune.evaluation import metrics

    mcc = metrics.Metric("mcc", "MCC", "Matthews correlation",
                         lambda s: float(matthews_corrcoef(s.y_true, s.y_pred)))
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, mcc))
    y = np.array([0, 0, 1, 1, 2, 2, 1, 0])
    p = probs_from_pred(np.array([0, 1, 1, 1, 2, 0, 1, 0]), 3)
    m = metrics.clinical_metrics(y, p, ["a", "b", "c"])
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p.argmax(1)))
    assert m["balanced_accuracy"] == pytest.approx(np.mean([2 / 3, 1.0, 0.5]))
