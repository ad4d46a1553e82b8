"""Learning curves (evaluation/learning.py): the points per size, the recommendation at each size, the
crossover rule, the power-law extrapolation and where they are printed (the verdict, the report).

Stores are planted (tests/planted.py): per strategy and size, every fold's test predictions hit
exactly the chosen balanced accuracy (which images are right is drawn at random per class), and its
inner-validation predictions the same, so each curve is known without training anything."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.evaluation.store import Store
from planted import plant_cell, plant_run

N_FOLD = 80  # test images per fold, 40 per class
FOLDS = 5
SIZES = (0.1, 0.25, 0.5, 1.0)
FULL_PATIENTS = 4 * N_FOLD  # training patients of a fold at the full size (an image is a patient)
SHARES = {"linear_probe": 0.001, "partial_ft": 0.3, "lora": 0.02, "full_ft": 1.0}


def exact(y: np.ndarray, acc: float, rng: np.random.Generator) -> np.ndarray:
    """Binary probabilities whose balanced accuracy is `acc` (to a class's 1/40): round(acc·n) random
    images of each class are right."""
    right = np.zeros(len(y), bool)
    for c in (0, 1):
        mine = np.flatnonzero(y == c)
        right[rng.choice(mine, int(round(acc * len(mine))), replace=False)] = True
    called = np.where(right, y, 1 - y).astype(float)
    return np.stack([1 - called, called], 1) * 0.8 + 0.1


FOLD_SD = 0.02  # fold-to-fold spread of a curve's score around its mean (as trained folds vary)


def plant_curves(path, acc: dict[str, list[float]], sizes=SIZES, seed: int = 0) -> Store:
    """A binary data set of FOLDS folds × N_FOLD test images: strategy s at sizes[i] scores acc[s][i] on
    average over the folds, each fold off by its own zero-sum draw of spread FOLD_SD (so a paired
    difference over folds has a variance, and the pooled score is acc[s][i]), and exactly acc[s][i]
    on its inner-validation split; its cells record n_train_patients growing with the size and seconds
    growing with size and share."""
    store = Store(path)
    n = N_FOLD * FOLDS
    store.add_dataset("syn", ["benign", "malignant"],
                      {"n": n, "positive": "malignant", "clusters": None, "role": "train", "subgroups": {},
                       "grouped": True, "patient_ids": True, "class_counts": {"benign": n // 2, "malignant": n // 2}})
    plant_run(store, train_sizes=list(sizes))
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], N_FOLD // 2)
    for s, accs in acc.items():
        for size, a in zip(sizes, accs):
            change = {"strategy": {"name": s}, "n_folds": FOLDS, **({} if size == 1.0 else {"train_size": size})}
            patients = round(size * FULL_PATIENTS)
            spread = rng.normal(0, FOLD_SD, FOLDS)
            for f, off in enumerate(spread - spread.mean()):
                plant_cell(store, change, f, 0, y, exact(y, a + off, rng),
                           samples=np.arange(f * N_FOLD, (f + 1) * N_FOLD),
                           seconds=1 + 20 * size * SHARES[s],
                           info={"trainable_fraction": SHARES[s], "n_train": patients, "n_train_patients": patients},
                           extra=[("inner_val", "syn", np.arange(N_FOLD), y, exact(y, a, rng))])
    return store


def curves(tmp_path, acc, name="s.sqlite", **kw):
    from medtune.evaluation.verdict import learning_of

    plant_curves(tmp_path / name, acc, **kw).close()
    return learning_of(tmp_path / name, n_boot=500)


BASE = [0.70, 0.74, 0.78, 0.80]
CROSS = {"linear_probe": BASE, "partial_ft": [0.66, 0.70, 0.76, 0.92]}


def test_a_strategy_that_wins_only_at_the_full_size_is_a_crossover_at_the_right_interval(tmp_path):
    """partial_ft trails linear_probe up to 50% and beats it clearly at 100%: the leader changes between
    50% and 100%, the full size's gap excludes 0 and so does its change."""
    lc = curves(tmp_path, CROSS)
    c = lc.crossovers["syn"]
    assert c.kind == "crossover" and (c.full, c.small) == ("partial_ft", "linear_probe")
    assert (c.below, c.above) == ("50% (160 patients)", "100% (320 patients)")
    assert c.at_small[0] == pytest.approx(-0.02, abs=0.01) and c.at_full[1] > 0 and c.change[1] > 0
    line = lc.lines("syn")[1]
    assert line.startswith("crossover between 50% (160 patients) and 100% (320 patients): on the test folds "
                           "linear_probe leads at 50%")


def test_the_crossover_gap_at_the_full_size_is_the_depth_lines_own_interval(tmp_path):
    """One pair, one interval: partial_ft − linear_probe at the full size is printed by the depth line
    (the paired test over folds) and by the crossover line; both give the same numbers (the crossover
    had bootstrapped test patients and printed a second, narrower interval for the same gap)."""
    from medtune.evaluation.verdict import store_verdicts

    lc = curves(tmp_path, CROSS)
    v = store_verdicts(tmp_path / "s.sqlite", n_boot=500)["syn"]
    comp = next(c for c in v.comparisons if c.strategy == "linear_probe")
    assert lc.crossovers["syn"].at_full == pytest.approx((comp.diff, comp.low, comp.high))
    said = next(line for line in v.lines() if "crossover" in line)
    assert f"{comp.diff:+.3f} [{comp.low:+.3f}, {comp.high:+.3f}] at the full size" in said
    assert f"[{comp.low:+.3f}, {comp.high:+.3f}]" in next(line for line in v.lines() if "depth:" in line)


def test_parallel_curves_are_no_crossover_even_when_noise_swaps_a_small_size(tmp_path):
    """A constant gap: one leader at every size. A gap of one image in 40 per class whose sign flips at 10%
    only: the order reverses but neither side nor the change is distinguishable, so the curves cross within
    their noise."""
    lc = curves(tmp_path, {"linear_probe": BASE, "full_ft": [a - 0.08 for a in BASE]})
    assert lc.crossovers["syn"].kind == "none"
    assert lc.lines("syn")[1] == "crossover: none, linear_probe leads on the test folds at every size"
    near = curves(tmp_path, {"linear_probe": BASE, "full_ft": [0.725, 0.725, 0.75, 0.775]}, name="near.sqlite")
    c = near.crossovers["syn"]
    assert c.kind == "noise" and c.below == "10% (32 patients)" and c.above == "25% (80 patients)"
    assert near.lines("syn")[1].startswith("crossover: the curves cross within their noise")


def test_a_tie_at_the_top_is_not_a_change_of_leader():
    """Three curves level at 50%: the full size's leader still leads there (nothing to bootstrap)."""
    import pandas as pd

    from medtune.evaluation.learning import crossover

    est = {"b": [0.75, 0.80, 0.80], "c": [0.70, 0.80, 0.78], "a": [0.80, 0.80, 0.85]}  # a listed last
    pts = pd.DataFrame([{"curve": k, "size": s, "estimate": e, "n_patients": 100 * s, "group": f"{k}{s}"}
                        for k, es in est.items() for s, e in zip((0.25, 0.5, 1.0), es)])
    assert crossover(pts, {}, [0.25, 0.5, 1.0]).kind == "none"


POWER = {"full_ft": [1 - (0.9 * n ** -0.5 + 0.10) for n in (32, 80, 160, 320)],  # 0.741, 0.799, 0.829, 0.850
         "linear_probe": [1 - (0.5 * n ** -0.5 + 0.18) for n in (32, 80, 160, 320)]}


def test_the_extrapolation_is_made_on_a_clean_power_law_and_refused_on_a_poor_fit(tmp_path):
    from medtune.evaluation.learning import fit_power_law

    lc = curves(tmp_path, POWER)
    ex = {e.curve: e for e in lc.extrapolations["syn"]}
    full = ex["full_ft"]
    assert full.made and full.patients == pytest.approx(640)
    assert full.estimate == pytest.approx(1 - (0.9 * 640 ** -0.5 + 0.10), abs=0.02)
    assert full.low < full.estimate < full.high and full.high - full.low < 0.2
    assert "extrapolated to 2x (640 patients; a fitted power law, not a measurement)" in lc.lines("syn")[2]
    noisy = curves(tmp_path, {"full_ft": [0.62, 0.88, 0.62, 0.88], "linear_probe": POWER["linear_probe"]},
                   name="noisy.sqlite")
    bad = {e.curve: e for e in noisy.extrapolations["syn"]}["full_ft"]
    assert not bad.made and bad.why.startswith("poor fit: residual RMSE")
    assert "not made for full_ft (poor fit" in noisy.lines("syn")[2]
    # three sizes for three parameters: refused whatever the points
    n = np.array([32.0, 80, 160])
    assert "fewer than 4" in fit_power_law(n, 1 - 0.9 * n ** -0.5, np.full(3, 0.03))[2]


def test_the_points_are_the_main_tables_numbers_at_the_full_size_and_the_table_lists_every_size(tmp_path):
    from medtune.evaluation.evidence import group_table, read_evidence

    lc = curves(tmp_path, POWER)
    t = group_table(read_evidence(tmp_path / "s.sqlite"), n_boot=500).set_index("strategy")
    full = lc.to_frame().query("size_label == '100% (320 patients)'").set_index("curve")
    for s in POWER:
        assert full.loc[s, "estimate"] == t.loc[s, "pooled_balanced_accuracy"]
        assert (full.loc[s, "ci_low"], full.loc[s, "ci_high"]) == (t.loc[s, "ci_low"], t.loc[s, "ci_high"])
    table = lc.table("syn")
    assert list(table.columns[:5]) == ["trained", "10% (32 patients)", "25% (80 patients)", "50% (160 patients)",
                                       "100% (320 patients)"]
    assert table.loc["full_ft", "trained"] == "100%" and table.loc["linear_probe", "trained"] == "0.1%"
    assert "| full_ft |" in lc.markdown("syn")


def test_the_verdict_prints_the_curve_lines_only_when_the_store_has_several_sizes(tmp_path):
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.verdict import verdicts

    plant_curves(tmp_path / "m.sqlite", CROSS).close()
    v = verdicts(read_evidence(tmp_path / "m.sqlite"), n_boot=300)["syn"]
    lines = v.lines()
    depth = next(i for i, line in enumerate(lines) if line.startswith("  depth:"))
    assert lines[depth + 1].startswith("  learning curve: on each size's inner splits the rule recommends linear_probe "
                                       "at 10% (32 patients), 25% (80 patients), 50% (160 patients); partial_ft at "
                                       "100% (320 patients) (inner splits of 80 images a fold at 10%, 80 at 100%)")
    assert lines[depth + 2].startswith("  crossover between 50% (160 patients) and 100% (320 patients)")
    assert lines[depth + 3].startswith("  extrapolated to 2x (640 patients")
    assert lines[depth + 4].startswith("  cost: ")
    plant_curves(tmp_path / "one.sqlite", POWER, sizes=(1.0,)).close()
    one = verdicts(read_evidence(tmp_path / "one.sqlite"), n_boot=300)["syn"]
    assert one.sizes == () and not any("learning curve" in line or "crossover" in line for line in one.lines())
    assert one.lines()[3].startswith("  depth:") and one.lines()[4].startswith("  cost:")


def test_the_report_has_a_learning_curve_section_with_several_sizes_and_none_with_one(tmp_path):
    from medtune.report.html import build_report

    plant_curves(tmp_path / "m.sqlite", POWER).close()
    paths = build_report(tmp_path / "m.sqlite", tmp_path / "r", n_boot=200)
    page = paths["html"].read_text()
    assert "<h3>Learning curves" in page and "a model, not a measurement" in page
    md = paths["md"].read_text()
    assert "### Learning curves" in md and "![learning curves of syn](learning_curves_syn.png)" in md
    assert (tmp_path / "r" / "learning_curves_syn.png").stat().st_size > 10_000
    assert page.index("<h3>Depth of fine-tuning") < page.index("<h3>Learning curves") < page.index(
        "<h3>Accuracy against training cost")
    plant_curves(tmp_path / "one.sqlite", POWER, sizes=(1.0,)).close()
    paths = build_report(tmp_path / "one.sqlite", tmp_path / "r1", n_boot=200)
    assert "Learning curves" not in paths["html"].read_text() and "Learning curves" not in paths["md"].read_text()


def test_the_figure_draws_each_curve_with_its_share_band_2x_point_and_cost(tmp_path):
    from medtune.report.learning_plot import curve_figure

    lc = curves(tmp_path, POWER)
    fig = curve_figure(lc, "syn")
    ax, cost = fig.axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["full_ft (100% trained)",
                                                                   "linear_probe (0.1% trained)"]
    from matplotlib.collections import PolyCollection

    assert ax.get_xscale() == "log"
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # one CI band per curve
    ticks = [t.get_text() for t in cost.get_xticklabels()]
    assert ticks == ["10%\n32 pts", "25%\n80 pts", "50%\n160 pts", "100%\n320 pts", "2x (model)\n640 pts"]
    made = [c for c in ax.containers]  # the 2x points, each with its interval
    assert len(made) == 2 and all(c.lines[0].get_xdata()[0] > 600 for c in made)
    assert len(cost.lines) == 2 and list(cost.lines[0].get_ydata()) == pytest.approx([3, 6, 11, 21])  # full_ft
