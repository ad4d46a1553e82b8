"""Statistics against references: scipy where it has the test, worked examples otherwise."""

import numpy as np
import pytest
from scipy import stats

from medtune.evaluation.metrics import (
    average_ranks,
    balanced_accuracy,
    bootstrap_ci,
    cd_cliques,
    corrected_ttest,
    friedman,
    nemenyi_cd,
    wilcoxon,
)

# Five data sets x three methods, ranked by hand (rank 1 = best; ties share the mean rank).
SCORES = np.array([[0.90, 0.85, 0.80], [0.70, 0.75, 0.60], [0.88, 0.88, 0.70], [0.95, 0.90, 0.91],
                   [0.60, 0.65, 0.55]])
HAND_RANKS = np.array([[1, 2, 3], [2, 1, 3], [1.5, 1.5, 3], [1, 3, 2], [2, 1, 3]]).mean(0)  # 1.5, 1.7, 2.8


def test_friedman_ranks_by_hand_and_statistic_from_scipy():
    chi2, p, ranks = friedman(SCORES)
    np.testing.assert_allclose(ranks, HAND_RANKS)
    assert (chi2, p) == pytest.approx(tuple(stats.friedmanchisquare(*SCORES.T)))
    # no ties in a column pair -> Friedman's formula 12N/(k(k+1)) (sum R^2 - k(k+1)^2/4), tie-corrected by scipy
    plain = 12 * 5 / (3 * 4) * (np.sum(HAND_RANKS ** 2) - 3 * 16 / 4)
    assert chi2 >= plain - 1e-9


def test_nemenyi_cd_matches_demsar():
    # Demšar: k = 4, N = 14, q_0.05 = 2.569 -> CD = 1.25; q_0.10 = 2.291 -> CD = 1.12
    assert nemenyi_cd(4, 14, 0.05) == pytest.approx(1.25, abs=0.005)
    assert nemenyi_cd(4, 14, 0.10) == pytest.approx(1.12, abs=0.005)
    assert nemenyi_cd(2, 10) == pytest.approx(1.960 * np.sqrt(6 / 60), abs=1e-3)
    # Demšar's conclusion from the published average ranks: C4.5+m+cf (1.964) vs C4.5 (3.143)
    # differ by 1.179, not significant at 0.05 (CD 1.25) but significant at 0.10 (CD 1.12).
    assert nemenyi_cd(4, 14, 0.10) < 3.143 - 1.964 < nemenyi_cd(4, 14, 0.05)


def test_corrected_ttest_reduces_to_paired_t_and_inflates_variance():
    rng = np.random.default_rng(0)
    a = rng.normal(0.80, 0.03, 10)
    b = a - rng.normal(0.02, 0.02, 10)
    t0, p0 = corrected_ttest(a, b, n_train=1.0, n_test=0.0)
    ref = stats.ttest_rel(a, b)
    assert (t0, p0) == pytest.approx((ref.statistic, ref.pvalue))
    # 10-fold CV: n_test/n_train = 1/9, so the variance factor is 1/10 + 1/9 instead of 1/10.
    t, p = corrected_ttest(a, b, n_train=90, n_test=10)
    assert t == pytest.approx(ref.statistic * np.sqrt(0.1 / (0.1 + 1 / 9)))
    assert p > p0


def test_corrected_ttest_hand_case():
    # d = [0.1, 0.2, 0.3]: mean 0.2, var 0.01, J = 3, n_test/n_train = 0.5 -> t = 0.2 / sqrt((1/3 + 1/2) * 0.01)
    t, p = corrected_ttest([0.6, 0.7, 0.8], [0.5, 0.5, 0.5], n_train=2, n_test=1)
    assert t == pytest.approx(0.2 / np.sqrt((1 / 3 + 0.5) * 0.01))
    assert p == pytest.approx(2 * stats.t.sf(t, 2))
    assert corrected_ttest([0.5, 0.5], [0.5, 0.5], 2, 1) == (0.0, 1.0)


def test_wilcoxon_matches_scipy_and_handles_ties():
    a = np.array([0.81, 0.79, 0.85, 0.77, 0.90, 0.83, 0.80, 0.86])
    b = np.array([0.78, 0.80, 0.80, 0.70, 0.84, 0.82, 0.71, 0.80])
    ref = stats.wilcoxon(a - b)
    assert wilcoxon(a, b) == pytest.approx((ref.statistic, ref.pvalue))
    assert wilcoxon(a, a)[1] == 1.0


def test_average_ranks_shares_ties():
    np.testing.assert_allclose(average_ranks([[0.9, 0.9, 0.1]]), [1.5, 1.5, 3.0])


def test_bootstrap_ci_contains_point_narrows_with_n_and_is_seeded():
    rng = np.random.default_rng(1)

    def sample(n):
        y = rng.integers(0, 2, n)
        correct = rng.random(n) < 0.8
        pred = np.where(correct, y, 1 - y)
        return y, np.eye(2)[pred]

    y, p = sample(200)
    point, lo, hi = bootstrap_ci(y, p, n_boot=500, seed=3)
    assert point == pytest.approx(balanced_accuracy(y, p))
    assert lo < point < hi
    assert bootstrap_ci(y, p, n_boot=500, seed=3) == (point, lo, hi)
    y2, p2 = sample(5000)
    _, lo2, hi2 = bootstrap_ci(y2, p2, n_boot=500, seed=3)
    assert hi2 - lo2 < (hi - lo) / 2  # 25x the samples: about 1/5 of the width
    # the normal approximation of a proportion's 95% interval: about 2 * 1.96 * sqrt(.16/200) = 0.11
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.16 / 200), rel=0.25)


def test_cd_cliques_on_demsars_ranks():
    ranks = sorted([3.143, 2.000, 2.893, 1.964])  # m+cf, m, cf, C4.5
    assert cd_cliques(ranks, 1.25) == [(0, 3)]  # alpha 0.05: no pair differs significantly
    # alpha 0.10 (CD 1.12): C4.5 (3.143) is significantly worse than C4.5+m+cf and C4.5+m
    assert cd_cliques(ranks, 1.12) == [(0, 2), (2, 3)]
    assert cd_cliques([1.0, 2.0, 3.0], 0.5) == []


def test_cd_diagram_draws_one_bar_per_clique():
    from medtune.report.html import fig_cd

    fig = fig_cd({"C4.5": 3.143, "C4.5+m": 2.0, "C4.5+cf": 2.893, "C4.5+m+cf": 1.964}, 1.12, "Demšar")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "C4.5+m+cf  (1.96)" in texts and any("CD = 1.12" in t for t in texts)
    bars = [c for c in fig.axes[0].collections if c.get_linewidth()[0] == 5]
    assert len(bars) == 2


# --------------------------------------------------------------------------- issue 16: evidence
from medtune.evaluation.metrics import (at_threshold, bootstrap_ci as _boot, calibration, clinical_metrics, ece, holm,  # noqa: E402
                             net_benefit,
                             threshold_for)


def test_holm_matches_hand_computed_adjusted_p_values():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 -> max(0.06, 0.04) = 0.06)
    p = [0.03, 0.01, 0.04, 0.02]
    assert holm(p) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    # capped at 1, NaN left out of the family: m = 2
    out = holm([0.6, float("nan"), 0.5])
    assert out[0] == pytest.approx(1.0) and out[2] == pytest.approx(1.0) and np.isnan(out[1])
    assert holm([0.01, 0.04]) == pytest.approx([0.02, 0.04])


def test_cluster_bootstrap_widens_the_interval_when_patients_repeat_images():
    """40 patients, each imaged 10 times identically: the information is that of 40 cases, so the
    patient-level interval must be much wider than the image-level one (about sqrt(10) times)."""
    rng = np.random.default_rng(0)
    y_pat = np.array([0, 1] * 20)
    correct = rng.random(40) < 0.75
    pred = np.where(correct, y_pat, 1 - y_pat)
    y, p = np.repeat(y_pat, 10), np.eye(2)[np.repeat(pred, 10)]
    patients = np.repeat(np.arange(40), 10)
    _, lo_i, hi_i = _boot(y, p, n_boot=500, seed=0)
    _, lo_c, hi_c = _boot(y, p, n_boot=500, seed=0, clusters=patients)
    assert (hi_c - lo_c) > 2.0 * (hi_i - lo_i)
    # the patient-level interval is that of the 40 distinct cases
    _, lo_d, hi_d = _boot(y_pat, np.eye(2)[pred], n_boot=500, seed=0)
    assert (hi_c - lo_c) == pytest.approx(hi_d - lo_d, rel=0.35)


def test_ece_brier_pr_auc_against_hand_values():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], 1)
    m = calibration(y, probs, positive=1, n_bins=2)
    # Brier: mean((p - y)^2) = (0.01 + 0.16 + 0.4225 + 0.04) / 4
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # equal-mass bins of 2 (sorted p: 0.1, 0.35 | 0.4, 0.8): |0.225 - 0.5| / 2 + |0.6 - 0.5| / 2
    assert m["ece"] == pytest.approx(0.5 * 0.275 + 0.5 * 0.1)
    # average precision: ranks 0.8(+), 0.4(-), 0.35(+), 0.1(-): AP = 0.5 * 1 + 0.5 * 2/3
    assert m["pr_auc"] == pytest.approx(0.5 + 1 / 3)
    # positive = class 0 scores the other column, in either class order
    m0 = calibration(1 - y, probs[:, ::-1], positive=0, n_bins=2)
    assert m0["pr_auc"] == pytest.approx(m["pr_auc"]) and m0["brier"] == pytest.approx(m["brier"])
    assert ece(np.ones(5), np.ones(5)) == 0.0


def test_macro_ppv_counts_an_undefined_class_as_sklearn_zero_division():
    """An always-majority model on 3 classes: PPV of the never-predicted classes is 0/0. Counted as
    0 (as precision_score(zero_division=0)) and flagged, not skipped (which gave 0.60 here)."""
    from sklearn.metrics import precision_score

    y = np.array([0] * 6 + [1] * 2 + [2] * 2)
    probs = np.tile([0.8, 0.1, 0.1], (10, 1))
    m = clinical_metrics(y, probs, ["a", "b", "c"])
    assert m["ppv"] == pytest.approx(precision_score(y, probs.argmax(1), average="macro", zero_division=0))
    assert m["ppv"] == pytest.approx(0.2)
    assert m["ppv_undefined"] == 2


def test_threshold_for_reaches_the_target_on_the_predictions_it_is_given():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.5, 0.4, 0.2, 0.1])
    t = threshold_for(y, p, "sensitivity", 0.75)  # 3 of 4 positives: threshold 0.6
    assert t == pytest.approx(0.6)
    c = at_threshold(y, p, t)
    assert c == {"tp": 3, "fn": 1, "tn": 4, "fp": 0}
    t = threshold_for(y, p, "specificity", 0.5)  # 2 of 4 negatives below it: just above 0.2
    c = at_threshold(y, p, t)
    assert c["tn"] == 2 and t > 0.2 and t < 0.3


def test_net_benefit_against_hand_values():
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    model, all_ = net_benefit(y, p, np.array([0.5]))
    # at 0.5: TP = 1, FP = 1 of n = 5, weight 1 -> 0; treat all: 0.4 - 0.6 = -0.2
    assert model[0] == pytest.approx(0.0) and all_[0] == pytest.approx(-0.2)
    model, all_ = net_benefit(y, p, np.array([0.25]))
    # at 0.25: TP = 2, FP = 1, weight 1/3 -> 2/5 - 1/15; treat all 0.4 - 0.6/3
    assert model[0] == pytest.approx(0.4 - 1 / 15) and all_[0] == pytest.approx(0.2)


def test_ece_sweep_is_less_biased_than_ten_bins_on_a_small_fold():
    """A perfectly calibrated model (y ~ Bernoulli(p)) on test folds of 16 images: ten fixed bins hold
    1-2 images each and report their noise as miscalibration; the monotonic sweep (the default) much
    less. Measured over 2,000 draws: 0.139 vs 0.084 at 10% prevalence, 0.278 vs 0.127 at 30%."""
    rng = np.random.default_rng(0)
    for prev in (0.1, 0.3):
        fixed, sweep = [], []
        for _ in range(400):
            p = rng.beta(prev * 4, (1 - prev) * 4, 16)
            y = (rng.random(16) < p).astype(float)
            fixed.append(ece(y, p, 10))
            sweep.append(ece(y, p))
        assert np.mean(sweep) < 0.65 * np.mean(fixed)
    # on a large sample both estimate the same (near zero) error
    p = rng.beta(1.2, 2.8, 4000)
    y = (rng.random(4000) < p).astype(float)
    assert ece(y, p) < 0.03 and ece(y, p, 10) < 0.03


def test_ece_sweep_bins_stop_at_the_first_non_monotone_count():
    from medtune.evaluation.metrics import sweep_bins

    p = np.arange(8) / 8
    assert sweep_bins(np.array([0, 0, 0, 0, 1, 1, 1, 1.0]), p) == 8  # perfectly ordered: every count
    # 2 bins (4, 4): rates 0.25, 0.75 rise; 3 bins (3, 3, 2): 1/3, 2/3, 1/2 fall
    assert sweep_bins(np.array([0, 0, 1, 0, 1, 1, 1, 0.0]), p) == 2
