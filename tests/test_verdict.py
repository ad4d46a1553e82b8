"""The verdict (evaluation/verdict.py): one recommendation per data set, chosen without the test folds, printed
in the same words by `medtune run`, `medtune results` (table and JSON), the report, MODEL_CARD.md
and the TRIPOD appendix; the one-standard-error rule; whether depth matters; caveats.

Stores are planted (tests/planted.py): each cell's inner-validation and test-fold predictions are
chosen, so the right recommendation is known without training anything."""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medtune.cli import app
from medtune.evaluation.store import Store
from planted import noisy_probs, plant_cell, plant_run

N_FOLD = 40  # test images per fold
N_VAL = 40  # inner-validation images per fold
SHARES = {"linear_probe": 0.001, "partial_ft": 0.3, "full_ft": 1.0}


def plant_grid(path, inner: dict[str, list[float]], test: dict[str, list[float]], folds: int = 5,
               run: dict | None = None, dataset_info: dict | None = None, cell_info: dict | None = None,
               n_folds: int | None = None) -> Store:
    """A store of one data set (`syn`, 50:50 benign/malignant, 40 test images per fold): per strategy
    and fold, inner-validation balanced accuracy exactly `inner[s][f]` and test-fold probabilities of
    skill `test[s][f]` (planted.noisy_probs)."""
    store = Store(path)
    n = N_FOLD * folds
    store.add_dataset("syn", ["benign", "malignant"],
                      {"n": n, "positive": "malignant", "clusters": None, "role": "train", "subgroups": {},
                       "grouped": True, "patient_ids": True, "class_counts": {"benign": n // 2, "malignant": n // 2},
                       "duplicates": {"policy": "group", "duplicate_groups": 0, "duplicate_images": 0,
                                      "label_conflicts": 0, "near_duplicates": None}, **(dataset_info or {})})
    plant_run(store, **(run or {}))
    rng = np.random.default_rng(0)
    for s in inner:
        for f in range(folds):
            y = np.tile([0, 1], N_FOLD // 2)
            probs = noisy_probs(y, test[s][f], rng)
            yv = np.tile([0, 1], N_VAL // 2)
            right = np.arange(N_VAL) < round(inner[s][f] * N_VAL)
            pv = np.where(right, yv, 1 - yv)
            val = np.stack([1.0 - pv, pv.astype(float)], 1) * 0.8 + 0.1
            plant_cell(store, {"strategy": {"name": s}, "n_folds": n_folds or folds}, f, 0, y, probs,
                       samples=np.arange(f * N_FOLD, (f + 1) * N_FOLD), seconds=10 * SHARES[s] + 1,
                       info={"trainable_fraction": SHARES[s], "class_weight": "balanced", "n_train": 4 * N_FOLD,
                             **(cell_info or {})},
                       extra=[("inner_val", "syn", np.arange(N_VAL), yv, val)])
    return store


# the inner splits favour full_ft; the test folds favour linear_probe
INNER = {"linear_probe": [0.70, 0.725, 0.70, 0.675, 0.70], "partial_ft": [0.75] * 5,
         "full_ft": [0.85, 0.875, 0.85, 0.825, 0.85]}
TEST = {"linear_probe": [3.0] * 5, "partial_ft": [1.5] * 5, "full_ft": [2.0] * 5}


@pytest.fixture
def leader_store(tmp_path):
    store = plant_grid(tmp_path / "v.sqlite", INNER, TEST)
    store.close()
    return tmp_path / "v.sqlite"


def test_the_verdict_is_the_inner_leader_not_the_best_test_fold_row(leader_store):
    from medtune.evaluation.evidence import group_table, read_evidence
    from medtune.evaluation.verdict import verdicts

    ev = read_evidence(leader_store)
    t = group_table(ev, n_boot=50).set_index("strategy")
    assert t.loc["linear_probe", "best_on_test_folds"] and not t.loc["full_ft", "best_on_test_folds"]
    v = verdicts(ev)["syn"]
    assert v.group == t.loc["full_ft", "group"] and v.how == "inner" and v.rule == "leader"
    assert v.lines()[0] == "verdict for syn: tiny_net · full_ft"
    assert "rule `recommend: leader`" in v.text()
    assert 0 < v.share == pytest.approx(1.0) and v.seconds == pytest.approx(11.0)


def test_the_same_verdict_text_in_run_results_json_report_card_and_appendix(leader_store, tmp_path, capsys):
    """Planted so that the inner-validation leader (full_ft) is not the best row on the test folds
    (linear_probe): every place a person reads the answer gives the same lines."""
    from medtune.report.card import model_card
    from medtune.cli import print_run_summary
    from medtune.evaluation.evidence import read_evidence
    from medtune.report.html import build_report, tripod_appendix
    from medtune.evaluation.verdict import store_verdicts

    v = store_verdicts(leader_store)["syn"]
    lines = v.lines()
    assert "full_ft" in lines[0]

    # medtune run: the summary's last lines, and what was deployed
    best = tmp_path / "best"
    best.mkdir()
    (best / "model.json").write_text(json.dumps({"dataset": "syn", "group": v.group, "backbone": "tiny_net",
                                                 "strategy": "full_ft", "head": "softmax", "folds": [{}] * 5}))
    summary = SimpleNamespace(total=15, done=15, skipped=0, pruned={}, failed=0, elsewhere=0, seconds=1.0,
                              store=str(leader_store), duplicates={}, best_models=[str(best)])
    capsys.readouterr()
    print_run_summary(summary, "medtune run planted.yaml")
    out = capsys.readouterr().out.splitlines()
    assert out[-len(lines) - 1:-1] == lines
    assert out[-1].startswith("deployed: tiny_net · full_ft (syn, its 5 fold models) to ")

    # medtune results: the verdict on top, the recommended row marked
    res = CliRunner().invoke(app, ["results", "--store", str(leader_store)])
    assert res.exit_code == 0, res.output
    got = res.output.splitlines()
    assert got[:len(lines)] == lines
    marked = [row for row in got if row.startswith("│")]
    assert [r.split("│")[1].strip() for r in marked if "full_ft" in r] == ["*"]
    assert all(r.split("│")[1].strip() == "" for r in marked if "full_ft" not in r)

    js = CliRunner().invoke(app, ["results", "--store", str(leader_store), "--format", "json"])
    doc = json.loads(js.output)
    assert doc["verdict"]["syn"]["text"] == lines and doc["verdict"]["syn"]["group"] == v.group
    assert [r["strategy"] for r in doc["results"] if r["recommended"]] == ["full_ft"]

    # the report's first box and its TRIPOD appendix
    page = html.unescape(build_report(leader_store, tmp_path / "report", n_boot=2000)["html"].read_text())
    text = re.sub(r"<[^>]+>", "\n", page)
    box = page.index("verdict for syn")
    assert box < page.index("Balanced accuracy: strategy × backbone")  # first, above the table
    for line in lines:
        assert line.strip() in text.splitlines(), line
    appendix = tripod_appendix(read_evidence(leader_store))
    selection = appendix.loc["Model selection (TRIPOD 10d; CLAIM 26)"].iloc[0]
    assert "best row on the test folds" not in selection
    for line in lines:
        assert line.strip() in selection

    # the model card of the deployed bundle
    card = model_card(leader_store, {"dataset": "syn", "group": v.group, "backbone": "tiny_net",
                                     "strategy": "full_ft", "head": "softmax", "folds": [{"fold": 0}], "n_folds": 5,
                                     "seed": 0, "class_names": ["benign", "malignant"], "image_size": 32,
                                     "mean": [0, 0, 0], "std": [1, 1, 1], "chosen_by": v.how})
    block = card.split("```")[1].strip("\n").splitlines()
    assert block == lines
    assert "not the verdict's recommendation" not in card


def test_one_se_prefers_the_fewest_parameters_within_one_standard_error(tmp_path):
    """linear_probe's inner mean (0.85) is within one SE of full_ft's (0.86 ± 0.045 sd over 5 folds, SE
    0.020); partial_ft (0.80) is not. `recommend: leader` keeps full_ft, `recommend: one_se` takes the
    probe; a probe 1.7 SEs below stays out. Planted scores are whole steps of 1/N_VAL (0.025): a 0.84
    was read as 0.85, an exact tie with the leader that the group keys' hashes broke."""
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.verdict import verdicts

    inner = {"linear_probe": [0.85] * 5, "partial_ft": [0.80] * 5, "full_ft": [0.825, 0.90, 0.875, 0.80, 0.90]}
    test = {s: [2.0] * 5 for s in inner}
    plant_grid(tmp_path / "a.sqlite", inner, test).close()
    plant_grid(tmp_path / "b.sqlite", inner, test, run={"recommend": "one_se"}).close()
    a, b = verdicts(read_evidence(tmp_path / "a.sqlite"))["syn"], verdicts(read_evidence(tmp_path / "b.sqlite"))["syn"]
    assert a.strategy == "full_ft" and a.how == "inner"
    assert b.strategy == "linear_probe" and b.how == "one_se" and b.rule == "one_se"
    assert "rule `recommend: one_se`" in b.text() and "leader, tiny_net · full_ft" in b.text()
    far = {**inner, "linear_probe": [0.825] * 5}
    plant_grid(tmp_path / "c.sqlite", far, test, run={"recommend": "one_se"}).close()
    assert verdicts(read_evidence(tmp_path / "c.sqlite"))["syn"].strategy == "full_ft"


def test_one_se_on_a_frame_without_spread_keeps_the_leader():
    from medtune.evaluation.headline import choose

    cells = pd.DataFrame({"group": ["a", "b"], "strategy": ["full_ft", "linear_probe"], "backbone": "x",
                          "head": "softmax", "variant": "", "pruned": "", "inner": [0.9, 0.89],
                          "share": [1.0, 0.01], "balanced_accuracy": [0.8, 0.8]})
    assert choose(cells, "one_se") == ("a", "one_se", "a")  # one fold each: no standard error to allow
    with pytest.raises(ValueError):
        choose(cells, "best")


def test_an_exact_tie_on_the_inner_splits_goes_to_fewer_parameters_then_to_the_name():
    """Inner scores move in steps of 1/n on n validation images, so two groups can tie exactly; their
    means may then differ in the last bit only by the order the folds were summed in. Such a tie went
    to the larger group key, a hash of the configuration that changes with every results version. It
    goes to the group training the fewer parameters (as the one-SE rule would), then to the first by
    backbone, variant, strategy and head."""
    from medtune.evaluation.headline import choose

    base = dict(head="softmax", variant="", pruned="", balanced_accuracy=0.8, backbone="x")
    rows = [{**base, "group": "zzz", "strategy": "full_ft", "inner": v, "share": 1.0} for v in (0.3, 0.2, 0.1)]
    rows += [{**base, "group": "aaa", "strategy": "linear_probe", "inner": v, "share": 0.01} for v in (0.1, 0.2, 0.3)]
    cells = pd.DataFrame(rows)  # zzz's mean is 0.20000000000000004, aaa's 0.19999999999999998: a tie
    assert choose(cells)[2] == "aaa"
    assert choose(cells.assign(inner=0.85))[2] == "aaa"  # a bit-exact tie: the fewer parameters
    same = cells.assign(inner=0.85, share=0.5, backbone=["b_net"] * 3 + ["a_net"] * 3)
    assert choose(same)[2] == "aaa"  # equal shares too: the name, a_net before b_net
    assert choose(same.assign(backbone=["a_net"] * 3 + ["b_net"] * 3))[2] == "zzz"


def test_depth_said_in_words_both_ways(tmp_path):
    """Equal test-fold skill: no detectable difference. full_ft far better on every fold: fine-tuning
    beyond the probe gains, with its interval."""
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.verdict import verdicts

    inner = {"linear_probe": [0.70] * 5, "full_ft": [0.85] * 5}
    same = plant_grid(tmp_path / "same.sqlite", inner, {"linear_probe": [2.0] * 5, "full_ft": [2.0] * 5})
    same.close()
    v = verdicts(read_evidence(tmp_path / "same.sqlite"))["syn"]
    assert v.depth.startswith("no detectable difference between the depths tried (linear_probe … full_ft: ")
    assert v.comparisons[0].holm_p > 0.05 and v.comparisons[0].low < 0 < v.comparisons[0].high
    better = plant_grid(tmp_path / "better.sqlite", inner, {"linear_probe": [0.0] * 5, "full_ft": [6.0] * 5})
    better.close()
    v = verdicts(read_evidence(tmp_path / "better.sqlite"))["syn"]
    c = v.comparisons[0]
    assert c.holm_p < 0.05 and c.low > 0
    assert v.depth.startswith(f"fine-tuning beyond linear_probe gains {c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}]")


def test_caveats_that_apply_and_none_that_do_not(tmp_path):
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.verdict import verdicts

    inner = {"linear_probe": [0.70] * 5, "full_ft": [0.85] * 5}
    plant_grid(tmp_path / "ok.sqlite", inner, {"linear_probe": [2.0] * 5, "full_ft": [2.0] * 5}).close()
    assert verdicts(read_evidence(tmp_path / "ok.sqlite"))["syn"].caveats == ()
    plant_grid(tmp_path / "bad.sqlite", inner, {"linear_probe": [0.0] * 5, "full_ft": [0.0] * 5},
               dataset_info={"patient_ids": False, "duplicates": {"policy": "group", "duplicate_groups": 3,
                                                                   "duplicate_images": 4, "near_duplicates": 6}},
               cell_info={"best_epoch": 4, "epochs_run": 5}).close()
    v = verdicts(read_evidence(tmp_path / "bad.sqlite"))["syn"]
    text = v.text()
    assert "caveat: the 95% CI includes chance (0.500)" in text
    assert "caveat: no patient ids" in text
    assert "caveat: folds kept 3 near-duplicate groups together (perceptual hash within 6 bits)" in text
    assert ("caveat: budget-limited: tiny_net full_ft (5 of 5 folds), tiny_net linear_probe (5 of 5 folds) had their "
            "best epoch at the last one; more epochs might change the ranking") in text


def test_an_official_split_is_a_held_out_test_set_scored_once(tmp_path, capsys):
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.verdict import verdicts

    inner = {"linear_probe": [0.70], "full_ft": [0.85]}
    plant_grid(tmp_path / "o.sqlite", inner, {"linear_probe": [2.0], "full_ft": [2.0]}, folds=1).close()
    v = verdicts(read_evidence(tmp_path / "o.sqlite"))["syn"]
    assert "a held-out test set scored once, not cross-validated" in v.lines()[1]
    assert "1-fold" not in v.text()
    assert "caveat: one held-out split: no spread over folds and no paired test between strategies" in v.text()


def test_a_group_has_one_colour_in_the_calibration_decision_and_cost_plots(leader_store):
    """The decision curve draws the verdict first and the best test-fold row second; before, it
    coloured them by that order (C0, C1) while the other plots coloured by table order."""
    from matplotlib.colors import to_hex

    from medtune.evaluation.evidence import group_table, label, read_evidence
    from medtune.report.html import fig_cost, fig_decision, fig_reliability, colours

    ev = read_evidence(leader_store)
    t = group_table(ev, n_boot=20)
    head = t[t.headline].iloc[0]
    best = t[t.best_on_test_folds].iloc[0]
    ax = fig_reliability(ev, t, "syn").axes[0]
    calib = {lab.lstrip("★† "): to_hex(h.lines[0].get_color()) for h, lab in zip(*ax.get_legend_handles_labels())
             if lab != "perfectly calibrated"}
    ax = fig_decision(ev, [head, best], "syn", colours(t, "syn")).axes[0]
    decision = {ln.get_label().lstrip("★ "): to_hex(ln.get_color()) for ln in ax.lines[:2]}
    cost = {tx.get_text(): to_hex(tx.get_color()) for tx in fig_cost(t, "syn").axes[0].texts}
    for r in (head, best):
        assert calib[label(r)] == decision[label(r)] == cost[label(r).split(" · ", 1)[-1]]
    assert decision[label(head)] != decision[label(best)]


FIGURE = re.compile(r"^(\d+\.\d{3}(±\d+\.\d{3})?|\d+\.\d{2}%|\d+(\.\d)?|–|\*?)$")


@pytest.mark.parametrize("wide", [False, True])
def test_results_fit_100_columns_and_no_number_wraps(leader_store, wide):
    res = CliRunner().invoke(app, ["results", "--store", str(leader_store), *(["--wide"] if wide else [])],
                             env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    tables = [line for line in res.output.splitlines() if line[:1] in "┏┃┡│└"]
    assert tables and all(len(line) <= 100 for line in tables), max(map(len, tables))
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in tables if line.startswith("│")]
    assert len(rows) % 3 == 0 and all(r[1] in INNER for r in rows)  # one line per row: nothing folded
    for r in rows:
        assert all(FIGURE.match(c) for c in [r[0], *r[2:]]), r
    if not wide:
        assert len(rows) == 3  # the compact table fits in one


def test_keep_best_deploys_the_verdict_and_records_the_rule_and_priors(tiny_run):
    from pathlib import Path

    from medtune.evaluation.verdict import store_verdicts

    store, _ = tiny_run
    meta = json.loads((Path(f"{store}.models/best") / "model.json").read_text())
    v = store_verdicts(store)[meta["dataset"]]
    assert meta["group"] == v.group and meta["chosen_by"] == v.how and meta["recommend"] == v.rule == "leader"
    assert meta["verdict"] == v.lines()
    assert all(len(e["priors"]) == len(meta["class_names"]) for e in meta["folds"])
    card = (Path(f"{store}.models/best") / "MODEL_CARD.md").read_text()
    assert card.split("```")[1].strip("\n").splitlines() == v.lines()


def test_an_unfinished_group_is_left_out_of_the_choice_and_named(tmp_path):
    """An interrupted run (BUSI, 2026-12-07: auto_depth had 1 of 5 folds done and was recommended on it): a
    group that has not finished the folds the others have is left out of the recommendation, whichever
    rule would pick it, and the verdict names it."""
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.verdict import verdicts

    inner = {"linear_probe": [0.80] * 5, "partial_ft": [0.95] * 5, "full_ft": [0.85] * 5}
    store = plant_grid(tmp_path / "a.sqlite", inner, {s: [2.0] * 5 for s in inner})
    store.conn.execute("UPDATE cells SET status='failed' WHERE strategy='partial_ft' AND fold > 0")
    store.conn.commit()
    store.close()
    v = verdicts(read_evidence(tmp_path / "a.sqlite"))["syn"]
    assert v.strategy == "full_ft" and v.how == "inner"
    assert any("unfinished" in c and "partial_ft (1 of 5 folds)" in c for c in v.caveats), v.caveats


def test_the_nested_choice_waits_for_its_folds():
    from medtune.evaluation.headline import choose

    rows = [{"group": g, "strategy": s, "seed": 0, "fold": f, "inner": i, "share": 1.0, "balanced_accuracy": 0.8}
            for g, s, folds, i in (("a", "auto_depth(candidates=('x', 'y'))", 1, 0.9), ("b", "full_ft", 5, 0.85))
            for f in range(folds)]
    cells = pd.DataFrame(rows).assign(backbone="x", head="softmax", variant="", pruned="")
    assert choose(cells) == ("b", "inner", "b")
    finished = pd.concat([cells] + [cells[cells.group == "a"].assign(fold=f) for f in range(1, 5)], ignore_index=True)
    assert choose(finished) == ("a", "nested", "a")
