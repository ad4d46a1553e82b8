"""Statistics against references: scipy where it has the test, worked examples otherwise."""

import numpy as np
import pytest
from scipy import stats

from medtune.metrics import (
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
    from medtune.report import fig_cd

    fig = fig_cd({"C4.5": 3.143, "C4.5+m": 2.0, "C4.5+cf": 2.893, "C4.5+m+cf": 1.964}, 1.12, "Demšar")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "C4.5+m+cf  (1.96)" in texts and any("CD = 1.12" in t for t in texts)
    bars = [c for c in fig.axes[0].collections if c.get_linewidth()[0] == 5]
    assert len(bars) == 2
