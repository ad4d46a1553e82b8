"""The report's numbers, computed only from the results store: pure tables, no HTML, no model.

Every table states one estimator and its interval. Group rows are whole resolved cell
configurations except fold and seed (`store.group_key`); pooled estimates use each group's
out-of-fold predictions of every seed (each sample once per seed) with a patient-level (cluster)
bootstrap interval where the data set has patient ids or duplicate groups, else one that resamples
images with all their seeds' predictions together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medtune.data.subsets import FULL, check_sizes, is_full, size_label
from medtune.evaluation.headline import choose
from medtune.evaluation.metrics import (MAIN_METRICS, at_threshold, auc, balanced_accuracy, bootstrap_ci, calibration,
                             corrected_interval, corrected_ttest, from_counts, holm, threshold_for, wilcoxon)
from medtune.evaluation.inner import inner_scores
from medtune.evaluation.store import DISPLAY

MAIN = "balanced_accuracy"
GROUP = [*DISPLAY, "variant"]  # how a group is shown; `group` (its key) is what rows are computed by


@dataclass
class Evidence:
    """What the report is computed from, read once from the store."""

    metrics: pd.DataFrame
    cells: pd.DataFrame
    predictions: pd.DataFrame
    extra: pd.DataFrame
    datasets: pd.DataFrame
    runs: pd.DataFrame
    store: Path
    version_note: str | None = None
    inner_leaders: dict = field(default_factory=dict)  # {data set: group}: inner-validation leader (choices)
    inner: dict = field(default_factory=dict)  # {cell id: inner-validation score}: what the recommendation is chosen on
    priors: dict = field(default_factory=dict)  # {cell id: training-fold class frequencies} of class-weighted cells
    memo: dict = field(default_factory=dict, repr=False)  # what is computed once per read (verdict.verdicts)
    train_size: float | int = FULL  # the training-set size this evidence is of (read_evidence)
    sizes: list = field(default_factory=list)  # every size the store holds (distinct_sizes), full size last

    @property
    def config(self) -> dict:
        """The latest run's resolved configuration (primary, operating points, subgroups...)."""
        return json.loads(self.runs.config_json.iloc[-1]) if len(self.runs) else {}

    def info(self, dataset: str) -> dict:
        d = self.datasets.set_index("dataset")
        return d.loc[dataset, "info"] if dataset in d.index else {}

    def class_names(self, dataset: str) -> list[str]:
        d = self.datasets.set_index("dataset")
        return list(d.loc[dataset, "class_names"]) if dataset in d.index else []


def read_evidence(store_path: str | Path, train_size: float | int = FULL) -> Evidence:
    """The evidence of one training-set size (learning curves, data/subsets.py): the full size by
    default, where the verdict, the tables and the paired tests are made; `train_sizes_in` lists
    the sizes a store holds."""
    from medtune.errors import MedtuneError
    from medtune.evaluation.store import at_size, open_store, read_cells, read_datasets

    with open_store(store_path, must_exist=True) as s:
        every = s.metrics()
        m = at_size(every, train_size)
        if every.empty:
            raise MedtuneError(f"{store_path} holds no finished cells yet; run `medtune run CONFIG` first.")
        if m.empty:
            done = ", ".join(size_label(x) for x in dict.fromkeys(every["train_size"]))
            raise MedtuneError(f"{store_path} holds no finished cells at training size {size_label(train_size)} yet "
                               f"(only at {done}); the verdict is made at the full size. Resume the run "
                               "(`medtune run CONFIG`) to finish it.")
        cells = at_size(read_cells(s), train_size)
        extra = s.extra_predictions()
        extra = extra[extra.cell_id.isin(cells.cell_id)]
        preds = s.predictions()
        runs = s.runs()
        racing = json.loads(runs.config_json.iloc[-1]).get("racing") if len(runs) else None
        metric = racing["metric"] if racing else MAIN
        inner = {c: sc.value for c, sc in inner_scores(s, m["cell_id"], metric).items()}
        ev = Evidence(m, cells, preds[preds.cell_id.isin(cells.cell_id)], extra, read_datasets(s), runs,
                      Path(store_path), s.version_warning(), {}, inner, train_size=train_size,
                      sizes=distinct_sizes(every))
    ev.priors = training_priors(ev)
    ev.predictions = with_risk(ev.predictions, ev.priors)
    ev.extra = with_risk(ev.extra, ev.priors)
    ev.metrics = risk_metrics(ev)
    ev.inner_leaders = {ds: c[2] for ds, c in choices(ev).items() if c[2] is not None}
    return ev


def train_sizes_in(store_path: str | Path) -> list[float | int]:
    """The training-set sizes of a store's finished cells, smallest first (patient counts before
    fractions, as `train_sizes` sorts them), the full size last."""
    from medtune.evaluation.store import open_store

    with open_store(store_path, must_exist=True) as s:
        return distinct_sizes(s.metrics())


def distinct_sizes(m: pd.DataFrame) -> list[float | int]:
    """The training-set sizes of a metrics frame (Store.metrics), ordered as `train_sizes_in`."""
    sizes = [] if m.empty else list(dict.fromkeys(m["train_size"]))
    if any(is_full(x) for x in sizes):
        return check_sizes(sizes)
    return sorted(sizes, key=lambda x: (isinstance(x, float), x))


# --------------------------------------------------------------------------- probabilities as risks
RISK_NOTE = ("Brier, ECE, PR-AUC, the reliability diagram, the decision curve and the operating points score "
             "probabilities mapped back to the training folds' class frequencies (Bayes' prior correction) "
             "wherever a cell was trained with class_weight: balanced, whose outputs estimate equal-prior "
             "posteriors; classification metrics keep the decision rule the cells used")


def class_weight_of(info: dict, config: dict) -> str | None:
    """The cell's `train.class_weight` as it applied (info), else as configured; None when unknown."""
    return info.get("class_weight") or (config.get("train") or {}).get("class_weight")


def training_priors(ev: Evidence) -> dict[str, np.ndarray]:
    """{cell id: class frequencies of its training fold} for every cell whose class_weight was balanced:
    the counts the cell recorded of what it trained on (`train_class_counts`: a learning curve's
    subset too), else the data set's class counts (after the duplicate policy) minus the counts of
    the cell's test fold, so stores written before the counts were recorded work too. Cells trained
    without class weights (or whose data set record lacks counts) are absent: their probabilities
    are used as stored."""
    out: dict[str, np.ndarray] = {}
    if ev.cells.empty:
        return out
    counts_y = ev.predictions.groupby("cell_id")["y_true"].agg(list)
    for _, c in ev.cells.iterrows():
        config = json.loads(c["config_json"]) if isinstance(c.get("config_json"), str) else {}
        info = c["info"] if isinstance(c["info"], dict) else {}
        if class_weight_of(info, config) != "balanced":
            continue
        if sum(info.get("train_class_counts") or []) > 0:
            own = np.asarray(info["train_class_counts"], float)
            out[c.cell_id] = own / own.sum()
            continue
        names, counts = ev.class_names(c.dataset), ev.info(c.dataset).get("class_counts") or {}
        if not names or set(counts) != set(names) or c.cell_id not in counts_y.index:
            continue
        train = np.array([counts[n] for n in names], float) - np.bincount(counts_y[c.cell_id], minlength=len(names))
        if (train < 0).any() or train.sum() <= 0:
            continue
        out[c.cell_id] = train / train.sum()
    return out


def to_risk(probs: np.ndarray, priors: np.ndarray | None) -> np.ndarray:
    """Equal-prior posteriors -> posteriors at the training prevalence: p(k) * pi_k, renormalised."""
    probs = np.asarray(probs, dtype=float)
    if priors is None:
        return probs
    q = probs * np.asarray(priors)[None, :]
    s = q.sum(1, keepdims=True)
    return np.divide(q, s, out=probs.copy(), where=s > 0)


def with_risk(p: pd.DataFrame, priors: dict[str, np.ndarray]) -> pd.DataFrame:
    """`p` (predictions or extra predictions) with a `risk` column: each row's probabilities under its
    cell's training prevalence (the stored ones where no correction applies)."""
    p = p.copy()
    if p.empty:
        p["risk"] = pd.Series(dtype=object)
        return p
    risk = list(p["probs"])
    for cid, idx in p.groupby("cell_id").indices.items():
        if cid in priors:
            fixed = to_risk(np.array([risk[i] for i in idx], dtype=float), priors[cid])
            for i, row in zip(idx, fixed):
                risk[i] = row.tolist()
    p["risk"] = risk
    return p


def risk_metrics(ev: Evidence) -> pd.DataFrame:
    """The store's per-cell metrics with Brier, ECE and PR-AUC recomputed at read time from the stored
    predictions, on the prior-corrected probabilities (the stored values were computed at cell time on
    the equal-prior outputs, and by whichever ECE estimator the cell's code had): every cell is scored
    by today's estimator, whatever code wrote it."""
    m = ev.metrics.copy()
    if ev.predictions.empty or not {"brier", "ece"} <= set(m.columns):
        return m
    by_cell = dict(tuple(ev.predictions.groupby("cell_id")))
    for i, r in m.iterrows():
        if r.cell_id not in by_cell:
            continue
        y, p, _ = _stack(by_cell[r.cell_id], "risk")
        for k, v in calibration(y, p, positive_index(ev, r.dataset)).items():
            if k in m.columns:
                m.at[i, k] = v
    return m


def choices(ev: Evidence) -> dict[str, tuple[str, str, str | None]]:
    """{data set: (group, how, inner-validation leader)}: headline.choose over each data set's done
    cells, with their inner-validation scores and trainable shares, under the config's `recommend:`."""
    cfg = ev.config
    share = ev.cells.set_index("cell_id")["info"].map(lambda i: i.get("trainable_fraction", np.nan))
    m = ev.metrics.assign(inner=ev.metrics.cell_id.map(lambda c: ev.inner.get(c, np.nan)),
                          share=ev.metrics.cell_id.map(share))
    return {ds: choose(sub, cfg.get("recommend") or "leader", cfg.get("primary"))
            for ds, sub in m.groupby("dataset", sort=False) if not sub[MAIN].isna().all()}


def short_strategy(label: str) -> str:
    """A strategy label short enough for a table cell or a plot: auto_depth's candidate list (in the
    configuration record) becomes its count."""
    if str(label).startswith("auto_depth("):
        n = str(label).count("'") // 2 or str(label).count('"') // 2
        return f"auto_depth (nested, {n} candidates)" if n else "auto_depth (nested)"
    return str(label)


def label(row) -> str:
    """One readable name per cell group within a data set."""
    name = f"{row['backbone']} · {short_strategy(row['strategy'])}"
    name += "" if row["head"] == "softmax" else f" · {row['head']}"
    return name + (f" [{row['variant']}]" if row.get("variant") else "")


def grouping_text(info: dict) -> str:
    """How the folds were grouped, in a few words, from the data set's record: `patient_ids` says
    whether the loader found patient ids (file-name pattern, manifest column, DICOM header, the
    generator); `grouped` is also true when only identical images were grouped (BUSI)."""
    if "patient_ids" not in info:  # a store written before the record said which
        return ("grouped (by patient ids or by identical images: this store's record does not say which)"
                if info.get("grouped") else "image-level, no patient ids")
    if info["patient_ids"]:
        return "patient-grouped"
    kept = "near-duplicate groups" if near(info.get("duplicates") or {}) else "identical images"
    return "image-level, no patient ids" + (f" (only {kept} kept together)" if info.get("grouped") else "")


def near(dup: dict) -> bool:
    """Whether the duplicate search also grouped perceptual near-copies (`near_duplicates: N` recorded)."""
    return dup.get("near_duplicates") is not None


def duplicates_text(dup: dict) -> str:
    """What the duplicate search grouped, in words that match the record: near-duplicate groups when the
    perceptual search ran (`near_duplicates`), groups of identical images otherwise."""
    kind = "near-duplicate groups" if near(dup) else "groups of identical images"
    return (f"{dup.get('duplicate_groups', 0)} {kind} ({dup.get('duplicate_images', 0)} extra copies), "
            f"policy {dup.get('policy', '?')}")


def positive_index(ev: Evidence, dataset: str) -> int | None:
    """The class whose probability operating points, PR-AUC and decision curves use: the data set's
    `positive`, else class 1 of a binary task; None for multiclass without a positive class."""
    names, pos = ev.class_names(dataset), ev.info(dataset).get("positive")
    if pos in names:
        return names.index(pos)
    return 1 if len(names) == 2 else None


def clusters(ev: Evidence, dataset: str, samples: np.ndarray) -> np.ndarray | None:
    """Patient cluster of each prediction (for the cluster bootstrap). Without patient ids: the
    image itself when it is predicted more than once (one prediction per seed), so its seeds'
    predictions are resampled together; None when every image is predicted once."""
    c = ev.info(dataset).get("clusters")
    samples = np.asarray(samples, dtype=int)
    if c is not None:
        return np.asarray(c)[samples]
    return samples if len(np.unique(samples)) < len(samples) else None


def _stack(p: pd.DataFrame, column: str = "probs") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, probs, sample); `column` "risk": the prior-corrected probabilities (RISK_NOTE). The store
    keeps probabilities to 6 decimals, so a row's sum misses 1 by up to ~1e-6 (and scikit-learn's
    multiclass Brier score and AUC warn); rows are renormalised."""
    probs = np.array(p[column].tolist(), dtype=float).reshape(len(p), -1)
    if probs.size:
        probs = probs / probs.sum(1, keepdims=True)
    return p.y_true.to_numpy(), probs, p["sample"].to_numpy()


def group_cells(ev: Evidence, group: str) -> pd.DataFrame:
    """A group's done cells: every fold of every seed."""
    return ev.cells[ev.cells.group == group]


def pooled(ev: Evidence, group: str, risk: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, probs, sample) of a group's out-of-fold predictions, every seed's: each sample once per
    seed, so the point estimate weighs the seeds equally (the cluster bootstrap keeps a sample's
    seeds together). `risk`: probabilities at the training prevalence (RISK_NOTE), for calibration,
    decision curves and thresholds; else as stored, for the decision rule's metrics."""
    return _stack(ev.predictions[ev.predictions.cell_id.isin(group_cells(ev, group).cell_id)],
                  "risk" if risk else "probs")


def ci(ev: Evidence, dataset: str, y, p, samples, metric, n_boot: int) -> tuple[float, float, float]:
    if not len(y):
        return (np.nan,) * 3
    return bootstrap_ci(y, p, metric, n_boot=n_boot, seed=0, clusters=clusters(ev, dataset, samples))


def fmt_ci(point: float, lo: float, hi: float, digits: int = 3) -> str:
    if np.isnan(point):
        return "–"
    return f"{point:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if not np.isnan(lo) else f"{point:.{digits}f}"


# --------------------------------------------------------------------------- groups and the headline
def summary_table(metrics: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Mean and sd over folds and seeds per cell group (whole configuration except fold and seed).
    A row missing a key (a reference fit from outside the store has no `pruned`) reads it as "": pandas
    would otherwise drop it from the grouping without a word."""
    columns = [c for c in (columns or MAIN_METRICS) if c in metrics.columns]
    keys = ["group", *GROUP] if "group" in metrics.columns else DISPLAY
    keys += ["pruned"] if "pruned" in metrics.columns else []  # racing: why a group stopped early, else ""
    metrics = metrics.assign(**{k: metrics[k].fillna("") for k in keys if k in metrics.columns})
    agg = metrics.groupby(keys, sort=False)
    mean = agg[columns].mean()
    sd = agg[columns].std(ddof=1)
    out = mean.copy()
    for c in columns:
        out[f"{c}_sd"] = sd[c]
    out["n_cells"] = agg.size()
    out["seconds"] = agg["seconds"].sum()
    return out.reset_index()


def choice_table(ev: Evidence) -> pd.DataFrame:
    """Per group: mean ± sd over folds and seeds, whether it is its data set's headline (and how it was
    chosen: `choices`) and whether it has the best mean on the test folds (the optimistic view)."""
    t = summary_table(ev.metrics)
    if "pruned" not in t:
        t["pruned"] = ""
    whole = t[MAIN].where(t.pruned == "")  # a group racing stopped averages fewer folds: never the "best"
    t["best_on_test_folds"] = whole == whole.groupby(t.dataset).transform("max")
    heads = choices(ev)
    t["headline"] = [heads.get(d, (None,))[0] == g for d, g in zip(t.dataset, t.group)]
    t["headline_how"] = [heads[d][1] if h else "" for d, h in zip(t.dataset, t.headline)]
    return t


def group_table(ev: Evidence, n_boot: int = 2000) -> pd.DataFrame:
    """`choice_table` with each group's pooled out-of-fold balanced accuracy and its 95%
    patient-bootstrap CI."""
    t = choice_table(ev)
    pts, los, his = [], [], []
    for _, r in t.iterrows():
        y, p, s = pooled(ev, r.group)
        a = ci(ev, r.dataset, y, p, s, balanced_accuracy, n_boot)
        pts.append(a[0]), los.append(a[1]), his.append(a[2])
    t.insert(t.columns.get_loc("best_on_test_folds"), "pooled_balanced_accuracy", pts)
    t.insert(t.columns.get_loc("best_on_test_folds"), "ci_low", los)
    t.insert(t.columns.get_loc("best_on_test_folds"), "ci_high", his)
    return t


def headline_row(t: pd.DataFrame, dataset: str) -> pd.Series:
    return t[(t.dataset == dataset) & t.headline].iloc[0]


def backbone_column(row) -> str:
    """A group's backbone as a table column: the backbone, its head unless softmax, its variant."""
    return (row["backbone"] + ("" if row["head"] == "softmax" else f" · {row['head']}")
            + (f" [{row['variant']}]" if row.get("variant") else ""))


def main_table(t: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Strategy rows x backbone (head, variant) columns: pooled out-of-fold balanced accuracy [95%
    patient-bootstrap CI]; ★ = the headline, † = best mean on the test folds (optimistic), (pruned) =
    stopped early by racing, on fewer folds."""
    sub = t[t.dataset == dataset].copy()
    sub["column"] = [backbone_column(r) for _, r in sub.iterrows()]
    sub["cell"] = [("★ " if h else "") + fmt_ci(m, lo, hi) + (" †" if b and not h else "") + (" (pruned)" if pr else "")
                   for m, lo, hi, h, b, pr in zip(sub.pooled_balanced_accuracy, sub.ci_low, sub.ci_high, sub.headline,
                                                  sub.best_on_test_folds, sub.pruned)]
    sub["strategy"] = sub.strategy.map(short_strategy)
    out = sub.pivot(index="strategy", columns="column", values="cell").fillna("–")
    return out.loc[list(dict.fromkeys(sub.strategy))]


def efficiency_table(ev: Evidence, t: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Per group: the share of the network's parameters that trained (mean over its cells, the head
    included; for LoRA/SSF the adapter's own tensors), the mean AUC and balanced accuracy over folds,
    and each as a fraction of full fine-tuning's on the same backbone, head and variant: what a
    parameter-efficient method buys at a glance. Empty when no cell recorded its trainable share."""
    frac = ev.cells.set_index("cell_id")["info"].map(lambda i: i.get("trainable_fraction", np.nan))
    m = ev.metrics[ev.metrics.dataset == dataset].assign(trainable=lambda d: d.cell_id.map(frac))
    if m.trainable.isna().all():
        return pd.DataFrame()
    share = m.groupby("group")["trainable"].mean()
    sub = t[t.dataset == dataset].copy()
    sub["trainable"] = sub.group.map(share)
    keys = ["backbone", "head", "variant"]
    full = sub[sub.strategy == "full_ft"].set_index(keys)
    rows = []
    for _, r in sub.iterrows():
        ref = full.loc[tuple(r[k] for k in keys)] if tuple(r[k] for k in keys) in full.index else None
        rows.append({"strategy": short_strategy(r.strategy), "backbone": backbone_column(r),
                     "trainable params": f"{100 * r.trainable:.2f}%" if np.isfinite(r.trainable) else "–",
                     "AUC (mean)": r.get("auc", np.nan), "balanced accuracy (mean)": r[MAIN],
                     "AUC / full_ft": f"{100 * r.auc / ref.auc:.0f}%" if ref is not None and "auc" in r else "–",
                     "bal. acc. / full_ft": f"{100 * r[MAIN] / ref[MAIN]:.0f}%" if ref is not None else "–"})
    return pd.DataFrame(rows).set_index("strategy")


def fold_scores(ev: Evidence, group: str) -> pd.Series:
    """A group's balanced accuracy per (seed, fold): what the paired comparisons pair."""
    m = ev.metrics
    return m[m.group == group].set_index(["seed", "fold"])[MAIN]


def fold_sizes(ev: Evidence, group: str) -> tuple[float, float]:
    """(mean training images, mean test images) of a group's cells: the Nadeau-Bengio correction's ratio."""
    info = group_cells(ev, group)["info"]
    return (float(np.mean([i.get("n_train", np.nan) for i in info])),
            float(np.mean([i.get("n_test", np.nan) for i in info])))


def paired_tests(ev: Evidence, t: pd.DataFrame, dataset: str, others: list[str] | None = None) -> pd.DataFrame:
    """The headline group against every other group of the data set (or the groups `others`) on the
    same (seed, fold) pairs: corrected resampled t-test (Nadeau & Bengio) and Wilcoxon signed-rank on
    balanced accuracy, each with Holm-adjusted p-values over the family of comparisons, and the mean
    difference's 95% interval under the same corrected variance."""
    m = ev.metrics[ev.metrics.dataset == dataset]
    head = headline_row(t, dataset).group
    a_all = fold_scores(ev, head)
    rows = []
    todo = m[m.group != head] if others is None else m[m.group.isin(others) & (m.group != head)]
    for g, sub in todo.groupby("group", sort=False):
        b_all = fold_scores(ev, g)
        common = a_all.index.intersection(b_all.index)
        a, b = a_all.loc[common].to_numpy(), b_all.loc[common].to_numpy()
        n_train, n_test = fold_sizes(ev, g)
        tt, p_t = corrected_ttest(a, b, n_train, n_test)
        _, p_w = wilcoxon(a, b)
        mean, low, high = corrected_interval(a, b, n_train, n_test)
        rows.append({"compared with": label(sub.iloc[0]), "group": g, "pairs": len(common),
                     "mean difference": mean, "95% CI low": low, "95% CI high": high,
                     "corrected t": tt, "p (corrected t)": p_t, "p (Wilcoxon)": p_w})
    out = pd.DataFrame(rows)
    if not out.empty:
        out.insert(out.columns.get_loc("p (corrected t)") + 1, "Holm p (corrected t)", holm(out["p (corrected t)"]))
        out["Holm p (Wilcoxon)"] = holm(out["p (Wilcoxon)"])
    return out


def rank_blocks(ev: Evidence) -> pd.DataFrame:
    """Scores for the Friedman test with data sets as blocks: mean balanced accuracy per (data set,
    method), methods present in every data set. Folds of one data set are not independent blocks."""
    m = ev.metrics.copy()
    m["method"] = [label({**r, "variant": ""}) for _, r in m.iterrows()]
    return m.groupby(["dataset", "method"])[MAIN].mean().unstack().dropna(axis=1)


def fold_ranks(ev: Evidence, dataset: str) -> pd.DataFrame:
    """Descriptive only: each group's mean rank over the (seed, fold) pairs of one data set."""
    from medtune.evaluation.metrics import average_ranks

    sub = ev.metrics[ev.metrics.dataset == dataset].copy()
    sub["method"] = [label(r) for _, r in sub.iterrows()]
    wide = sub.pivot_table(index=["seed", "fold"], columns="method", values=MAIN).dropna(axis=1)
    if wide.empty:
        return pd.DataFrame()
    return pd.DataFrame({"mean rank over folds (1 = best)": average_ranks(wide.to_numpy())},
                        index=wide.columns).sort_values("mean rank over folds (1 = best)")


# --------------------------------------------------------------------------- calibration
def calibration_table(ev: Evidence, t: pd.DataFrame, dataset: str, n_boot: int = 500) -> pd.DataFrame:
    """Per group, pooled out-of-fold: Brier score, ECE (equal-mass bins, monotonic sweep) and PR-AUC with 95%
    patient-bootstrap CIs, for the positive class (or multiclass Brier / top-label ECE / macro AP)."""
    pos = positive_index(ev, dataset)
    rows = []
    for _, r in t[t.dataset == dataset].iterrows():
        y, p, s = pooled(ev, r.group, risk=True)
        row = {"group": label(r)}
        for key in ("brier", "ece", "pr_auc"):
            row[key] = fmt_ci(*ci(ev, dataset, y, p, s, lambda a, b, k=key: calibration(a, b, pos)[k], n_boot))
        rows.append(row)
    return pd.DataFrame(rows).set_index("group") if rows else pd.DataFrame()


# --------------------------------------------------------------------------- operating points
def operating_points(ev: Evidence, group: str, dataset: str, target: str, value: float
                     ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Per outer fold: the threshold reaching `target` >= `value` on that cell's INNER VALIDATION
    predictions, and the fold's test predictions called at it. Returns (per-fold thresholds,
    pooled y_pos, pooled predicted-positive, pooled samples). The test fold never moves a threshold."""
    pos = positive_index(ev, dataset)
    rows, ys, preds, samples = [], [], [], []
    val = ev.extra[ev.extra.kind == "inner_val"]
    for _, c in group_cells(ev, group).iterrows():
        v = val[val.cell_id == c.cell_id]
        if v.empty:
            continue
        yv, pv, _ = _stack(v, "risk")
        thr = threshold_for(yv == pos, pv[:, pos], target, value)
        yt, pt, st = _stack(ev.predictions[ev.predictions.cell_id == c.cell_id], "risk")
        rows.append({"fold": c.fold, "threshold": thr, "n_validation": len(yv)})
        ys.append(yt == pos), preds.append(pt[:, pos] >= thr), samples.append(st)
    if not rows:
        return pd.DataFrame(), np.array([]), np.array([]), np.array([])
    return pd.DataFrame(rows), np.concatenate(ys), np.concatenate(preds), np.concatenate(samples)


def operating_table(ev: Evidence, t: pd.DataFrame, dataset: str, points: list[dict], n_boot: int = 500
                    ) -> pd.DataFrame:
    """Per group and operating point: the outer folds' pooled sensitivity, specificity, PPV and NPV
    at the thresholds chosen on each fold's inner validation split, with 95% patient-bootstrap CIs."""
    if positive_index(ev, dataset) is None:
        return pd.DataFrame()
    rows = []
    for _, r in t[t.dataset == dataset].iterrows():
        for point in points:
            (target, value), = point.items()
            folds, y, pred, s = operating_points(ev, r.group, dataset, target, value)
            if folds.empty:
                continue
            row = {"group": label(r), "chosen for": f"{target} ≥ {value:g} (inner validation)",
                   "thresholds (per fold)": ", ".join(f"{x:.3f}" for x in folds.threshold)}
            both = np.column_stack([y, pred]).astype(float)
            for key in ("sensitivity", "specificity", "ppv", "npv"):
                f = lambda a, b, k=key: from_counts(**at_threshold(b[:, 0] > 0.5, b[:, 1], 0.5))[k]  # noqa: E731
                row[key] = fmt_ci(*ci(ev, dataset, y, both, s, f, n_boot))
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- external validation
def external_table(ev: Evidence, t: pd.DataFrame, dataset: str, n_boot: int = 500) -> pd.DataFrame:
    """Internal (pooled out-of-fold) vs external balanced accuracy and AUC per group: the external
    set scored by each outer fold's model (mean ± sd over fold models) and by the fold models'
    averaged probabilities (with a 95% patient-bootstrap CI). Nothing was refitted on it."""
    ext = ev.extra[ev.extra.kind == "external"]
    if ext.empty:
        return pd.DataFrame()
    pos = positive_index(ev, dataset)
    rows = []
    for _, r in t[t.dataset == dataset].iterrows():
        cells = group_cells(ev, r.group)
        mine = ext[ext.cell_id.isin(cells.cell_id)]
        for name, e in mine.groupby("dataset", sort=False):
            per_fold = []
            for _, sub in e.groupby("cell_id"):
                y, p, _ = _stack(sub)
                per_fold.append((balanced_accuracy(y, p), auc(y, p, pos)))
            per_fold = np.array(per_fold)
            avg = e.groupby("sample").agg(y_true=("y_true", "first"),
                                         probs=("probs", lambda s: np.mean(np.array(s.tolist()), 0).tolist()))
            y, p, s = _stack(avg.reset_index())
            rows.append({"group": label(r), "external set": name,
                         "internal bal. acc. (out-of-fold)": fmt_ci(r.pooled_balanced_accuracy, r.ci_low, r.ci_high),
                         "external bal. acc. (fold models, mean ± sd)":
                             f"{per_fold[:, 0].mean():.3f} ± "
                             f"{per_fold[:, 0].std(ddof=1) if len(per_fold) > 1 else 0:.3f}",
                         "external bal. acc. (fold-average model)":
                             fmt_ci(*ci(ev, name, y, p, s, balanced_accuracy, n_boot)),
                         "internal AUC (out-of-fold)": auc(*pooled(ev, r.group)[:2], pos),
                         "external AUC (fold-average model)": auc(y, p, pos), "external n": len(y)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- subgroups
def subgroup_table(ev: Evidence, t: pd.DataFrame, dataset: str, n_boot: int = 500) -> pd.DataFrame:
    """Per group, subgroup column and value: n, pooled out-of-fold balanced accuracy and AUC with
    95% cluster-bootstrap CIs, from the manifest columns listed under `subgroups:` (a subgroup is
    often small, so its point estimate alone would overstate what is known)."""
    columns = ev.info(dataset).get("subgroups") or {}
    pos = positive_index(ev, dataset)

    def subgroup_auc(y, p):
        return auc(y, p, pos)

    rows = []
    for _, r in t[t.dataset == dataset].iterrows():
        y, p, s = pooled(ev, r.group)
        for col, values in columns.items():
            v = np.asarray(values, dtype=object)[s]
            for value in sorted(set(v)):
                k = v == value
                rows.append({"dataset": dataset, "group": label(r), "subgroup": col, "value": value,
                             "n": len(np.unique(s[k])),
                             "balanced accuracy [95% CI]": fmt_ci(*ci(ev, dataset, y[k], p[k], s[k], balanced_accuracy,
                                                                      n_boot)),
                             "AUC [95% CI]": fmt_ci(*ci(ev, dataset, y[k], p[k], s[k], subgroup_auc, n_boot))})
    return pd.DataFrame(rows)
