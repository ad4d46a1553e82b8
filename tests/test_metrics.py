import numpy as np
import pytest

from medtune.metrics import auc, clinical_metrics, from_counts


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


@pytest.mark.parametrize("classes,positive", [(["malignant", "normal"], "malignant"), (["benign", "malignant"], "malignant"),
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
