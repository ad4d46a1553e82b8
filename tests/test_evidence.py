"""The report's numbers from planted stores: group keys, the headline, operating points, external
validation and subgroups, each against a value known from how the store was planted."""

import numpy as np
import pandas as pd
import pytest
from planted import noisy_probs, plant_cell, plant_dataset, plant_run

from medtune.errors import MedtuneError
from medtune.evaluation.evidence import (external_table, group_table, operating_points, operating_table, read_evidence,
                              subgroup_table, summary_table)
from medtune.evaluation.headline import NESTED, OPTIMISTIC, PRIMARY, headline_group
from medtune.evaluation.store import Store, add_groups


def _grid(store, groups, n_folds=2, n=40, seed=0, extra=None):
    """Each entry of `groups`: (config change, label, skill). Fold f holds samples f*n..(f+1)*n."""
    rng = np.random.default_rng(seed)
    for change, label, skill in groups:
        for fold in range(n_folds):
            y = np.array([0, 1] * (n // 2))
            p = noisy_probs(y, skill, rng)
            plant_cell(store, {**change, "n_folds": n_folds}, fold, 0, y, p,
                       samples=np.arange(fold * n, (fold + 1) * n), label=label,
                       extra=extra(fold, y, p) if extra else None)


def test_two_image_sizes_of_one_backbone_are_two_rows(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s), plant_run(s)
        _grid(s, [({"backbone": {"image_size": 224}}, "linear_probe", 1.0),
                  ({"backbone": {"image_size": 384}}, "linear_probe", 3.0)])
    ev = read_evidence(tmp_path / "s.sqlite")
    t = group_table(ev, n_boot=100)
    assert len(t) == 2 and (t.n_cells == 2).all()
    assert sorted(t.variant) == ["backbone.image_size=224", "backbone.image_size=384"]
    # and the better size is not averaged away
    assert t.set_index("variant").balanced_accuracy["backbone.image_size=384"] > t.balanced_accuracy.min()


def test_summary_table_keeps_rows_whose_keys_are_missing_in_part(tmp_path):
    """Rows from outside the store (a benchmark's reference fit) have no `pruned`; they are a group,
    not silently dropped by the grouping (pandas drops NaN keys by default)."""
    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s), plant_run(s)
        _grid(s, [({}, "linear_probe", 1.0)])
        stored = s.metrics()
    outside = stored.drop(columns=["pruned", "variant"]).assign(group="reference", strategy="reference")
    t = summary_table(pd.concat([stored, outside], ignore_index=True))
    assert sorted(t.strategy) == ["linear_probe", "reference"]
    assert (t.n_cells == 2).all()


def test_a_group_holding_one_seed_and_fold_twice_is_refused():
    config = '{"a": 1, "fold": 0, "seed": 0}'
    df = pd.DataFrame({"cell_id": ["x", "y"], "dataset": "d", "backbone": "b", "strategy": "s", "head": "softmax",
                       "fold": 0, "seed": 0, "config_json": [config, config]})
    with pytest.raises(MedtuneError, match="more than once"):
        add_groups(df)


def _metrics(rows):
    return pd.DataFrame(rows,
                        columns=["dataset", "group", "strategy", "backbone", "head", "variant", "balanced_accuracy"])


def test_headline_prefers_primary_then_nested_and_labels_the_fallback_optimistic():
    rows = [("d", "g1", "full_ft", "b", "softmax", "", 0.9), ("d", "g1", "full_ft", "b", "softmax", "", 0.8),
            ("d", "g2", "auto_depth(candidates=...)", "b", "softmax", "", 0.6),
            ("d", "g3", "partial_ft(blocks=2)", "b", "softmax", "", 0.7)]
    m = _metrics(rows)
    assert headline_group(m, None) == ("g2", NESTED)
    assert headline_group(m, "partial_ft") == ("g3", PRIMARY)
    assert headline_group(m, "partial_ft(blocks=2)") == ("g3", PRIMARY)
    no_nested = m[m.group != "g2"]
    assert headline_group(no_nested, None) == ("g1", OPTIMISTIC)
    assert headline_group(no_nested, "not_in_grid") == ("g1", OPTIMISTIC)


def test_operating_point_threshold_comes_from_inner_validation_not_the_test_fold(tmp_path):
    """Inner validation: positives score 0.6-0.9, so sensitivity >= 0.95 gives a threshold near 0.6.
    The test fold is planted with every score shifted down by 0.5: a threshold chosen on it would be
    ~0.1 and reach sensitivity 1. Used unseen, the validation threshold calls almost nothing positive."""
    rng = np.random.default_rng(1)

    def val(fold, y, p):
        yv = np.array([0, 1] * 20)
        pv = np.where(yv == 1, rng.uniform(0.6, 0.9, 40), rng.uniform(0.1, 0.4, 40))
        return [("inner_val", "syn", np.arange(1000 + 40 * fold, 1040 + 40 * fold), yv, np.stack([1 - pv, pv], 1))]

    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s), plant_run(s, operating_points=[{"sensitivity": 0.95}])
        for fold in range(2):
            y = np.array([0, 1] * 20)
            pt = np.where(y == 1, rng.uniform(0.1, 0.4, 40), rng.uniform(0.0, 0.05, 40))  # shifted down
            plant_cell(s, {}, fold, 0, y, np.stack([1 - pt, pt], 1), samples=np.arange(40 * fold, 40 * fold + 40),
                       extra=val(fold, y, None))
    ev = read_evidence(tmp_path / "s.sqlite")
    t = group_table(ev, n_boot=50)
    folds, y, pred, _ = operating_points(ev, t.group.iloc[0], "syn", "sensitivity", 0.95)
    assert (folds.threshold > 0.55).all()  # from validation (positives >= 0.6), not the test fold (<= 0.4)
    assert pred[y].mean() == 0.0  # the shifted test positives all fall below it: the test fold was not used
    table = operating_table(ev, t, "syn", [{"sensitivity": 0.95}], n_boot=50)
    assert table.sensitivity.iloc[0].startswith("0.000")


def test_external_table_scores_each_fold_model_and_their_average(tmp_path):
    ext_y = np.array([0, 1] * 10)

    def ext(fold, y, p):
        # fold 0 perfect, fold 1 inverted: each fold model's bal. acc. is 1 and 0, their average is 0.5
        q = np.where(ext_y == 1, 0.8, 0.2) if fold == 0 else np.where(ext_y == 1, 0.3, 0.7)
        return [("external", "site_b", np.arange(20), ext_y, np.stack([1 - q, q], 1))]

    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s), plant_dataset(s, "site_b", role="external to syn"), plant_run(s)
        _grid(s, [({}, "linear_probe", 2.0)], extra=ext)
    ev = read_evidence(tmp_path / "s.sqlite")
    tab = external_table(ev, group_table(ev, n_boot=50), "syn", n_boot=50)
    row = tab.iloc[0]
    assert row["external set"] == "site_b" and row["external n"] == 20
    assert row["external bal. acc. (fold models, mean ± sd)"].startswith("0.500 ± 0.707")
    # averaged probabilities: 0.55 for positives, 0.45 for negatives -> all correct
    assert row["external bal. acc. (fold-average model)"].startswith("1.000")


def test_subgroup_table_splits_the_pooled_predictions_by_manifest_column(tmp_path):
    n = 40
    sex = ["F" if i % 4 < 2 else "M" for i in range(2 * n)]
    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s, subgroups={"sex": sex}), plant_run(s)
        _grid(s, [({}, "linear_probe", 2.0)], n=n)
    ev = read_evidence(tmp_path / "s.sqlite")
    sg = subgroup_table(ev, group_table(ev, n_boot=50), "syn", n_boot=50)
    assert list(sg.value) == ["F", "M"] and list(sg.n) == [40, 40]
    for col in ("balanced accuracy [95% CI]", "AUC [95% CI]"):  # "0.812 [0.700, 0.905]": point inside its CI
        point, lo, hi = (float(v) for v in sg[col].iloc[0].replace("[", "").replace("]", "").replace(",", "").split())
        assert lo <= point <= hi and lo < hi, (col, sg[col].iloc[0])


def test_primary_declared_in_the_config_is_the_headline_of_the_report_table(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s), plant_run(s, primary="partial_ft")
        _grid(s, [({"strategy": {"name": "full_ft"}}, "full_ft", 3.0),
                  ({"strategy": {"name": "partial_ft", "blocks": 1}}, "partial_ft(blocks=1)", 0.5)])
    ev = read_evidence(tmp_path / "s.sqlite")
    t = group_table(ev, n_boot=50).set_index("strategy")
    assert t.loc["partial_ft(blocks=1)", "headline"] and t.loc["partial_ft(blocks=1)", "headline_how"] == PRIMARY
    assert t.loc["full_ft", "best_on_test_folds"] and not t.loc["full_ft", "headline"]


def test_without_patient_ids_an_images_seed_predictions_are_resampled_together(tmp_path):
    """Two seeds predict each image twice: the bootstrap must draw an image with both its
    predictions (else the interval narrows as if there were twice the images); one seed needs no
    clusters at all."""
    from medtune.evaluation.evidence import clusters

    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s), plant_run(s)
        _grid(s, [({}, "linear_probe", 1.0)])
    ev = read_evidence(tmp_path / "s.sqlite")
    assert ev.info("syn").get("clusters") is None
    assert clusters(ev, "syn", np.arange(6)) is None
    twice = np.array([0, 1, 2, 0, 1, 2])
    assert list(clusters(ev, "syn", twice)) == list(twice)


def test_stored_probabilities_rounded_to_6_decimals_are_read_back_summing_to_one(tmp_path):
    """The store rounds probabilities to 6 decimals (a row sums to 1 +- ~1e-6); the report reads them
    back renormalised, so every figure and metric sees probabilities, and scikit-learn raises no
    'do not sum to one' warning on any calibration bootstrap."""
    import warnings

    from medtune.evaluation.evidence import calibration_table, pooled

    with Store(tmp_path / "s.sqlite") as s:
        plant_dataset(s, class_names=("c0", "c1", "c2"), positive=None), plant_run(s)
        rng = np.random.default_rng(0)
        for fold in range(2):
            y = np.arange(30) % 3
            p = np.full((30, 3), 1 / 3)
            p[np.arange(30), y] += rng.uniform(0, 0.2, 30)
            plant_cell(s, {"n_folds": 2}, fold, 0, y, p / p.sum(1, keepdims=True),
                       samples=np.arange(fold * 30, (fold + 1) * 30))
    ev = read_evidence(tmp_path / "s.sqlite")
    stored = np.array(ev.predictions.probs.tolist())
    assert np.abs(stored.sum(1) - 1).max() > 0  # the store did round
    t = group_table(ev, n_boot=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = calibration_table(ev, t, "syn", n_boot=20)
    assert np.abs(pooled(ev, t.group.iloc[0])[1].sum(1) - 1).max() < 1e-12 and len(table) == 1


def test_grouping_text_says_no_patient_ids_when_only_identical_images_are_grouped():
    """BUSI has no patient ids; `duplicates: group` groups its copies, which sets `grouped` in the data
    record. The report's TRIPOD table and the model card said 'patient-grouped' there. The record now
    says whether the loader found patient ids (a DICOM folder has them without any pattern)."""
    import torch

    from medtune.grid.cells import PreparedData, record_of
    from medtune.data.loaders import ImageTable
    from medtune.evaluation.evidence import grouping_text

    images = torch.zeros((4, 3, 8, 8), dtype=torch.uint8)
    labels = np.array([0, 0, 1, 1])
    dup_groups = np.array(["d0", "d0", "d1", "d2"], dtype=object)
    no_ids = ImageTable(images, labels, ["a", "b"], [f"mem://{i}" for i in range(4)], groups=None, name="busi_like")
    with_ids = ImageTable(images, labels, ["a", "b"], [f"mem://{i}" for i in range(4)],
                          groups=np.array(["P1", "P1", "P2", "P3"], dtype=object), name="dicom_like")
    busi = record_of(PreparedData(no_ids, dup_groups, {"policy": "group"}, None), None)
    dicom = record_of(PreparedData(with_ids, with_ids.groups, {"policy": "group"}, None), None)
    plain = record_of(PreparedData(no_ids, None, {"policy": "ignore"}, None), None)
    assert (busi["grouped"], busi["patient_ids"], dicom["patient_ids"], plain["grouped"]) == (True, False, True, False)
    assert grouping_text(busi) == "image-level, no patient ids (only identical images kept together)"
    assert grouping_text(dicom) == "patient-grouped"
    assert grouping_text(plain) == "image-level, no patient ids"
    assert "does not say which" in grouping_text({"grouped": True})  # a store from before the key
