"""The verdict: what a grid recommends, computed once per data set from the store alone.

A new user asked for the answer and got a headline box, a table whose best row was another
strategy, and paired tests further down that found no difference, with nothing at the top saying
so (issue 37). The verdict puts the answer in one place: the recommended configuration (by the
rule fixed before the run, `headline.choose`: `primary:`, auto_depth, else the inner-validation
leader or, under `recommend: one_se`, the fewest trained parameters within one standard error of
it), its outer estimate with the cluster-bootstrap CI, whether depth matters here (the
recommendation against the shallowest and the deepest candidate of its backbone and head, paired
over folds, Holm-adjusted), its cost, and the caveats that apply; where the store holds several
training-set sizes, three learning-curve lines (evaluation/learning.py: the recommendation at each
size, the crossover, the extrapolation to twice the data). `Verdict.lines()` is the one renderer:
`medtune run`, `medtune results`, the report, MODEL_CARD.md and the TRIPOD appendix print
the same lines, and `bundle.keep_best` deploys `Verdict.group`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from medtune.data.subsets import is_full
from medtune.evaluation.diagnose import budget_limited, chosen_values, collapsed_cells, edge_choices, head_choices
from medtune.evaluation.evidence import (MAIN, Evidence, choice_table, ci, fmt_ci, label, near, paired_tests, pooled,
                              read_evidence, short_strategy)
from medtune.evaluation.learning import LearningCurves, learning_curves
from medtune.evaluation.headline import INNER, NESTED, ONE_SE, OPTIMISTIC, PRIMARY, unfinished
from medtune.evaluation.metrics import balanced_accuracy

N_BOOT = 2000  # as the report's main table: the verdict's interval is the table's
ALPHA = 0.05

CHOSEN = {
    PRIMARY: "declared `primary:` in the config before the run",
    NESTED: "auto_depth's nested choice (the depth picked on inner folds of each outer training fold)",
    INNER: "rule `recommend: leader`: the best mean score on the inner validation splits (no test fold)",
    ONE_SE: "rule `recommend: one_se`: the fewest trained parameters within one standard error of the "
            "inner-validation leader{leader} (no test fold)",
    OPTIMISTIC: "the best mean on the test folds, since no cell has an inner validation split: optimistic",
}


@dataclass(frozen=True)
class Comparison:
    """The recommendation minus another depth, balanced accuracy over paired test folds."""
    strategy: str
    share: float
    diff: float
    low: float
    high: float
    holm_p: float
    pairs: int


@dataclass(frozen=True)
class Verdict:
    """One data set's answer; `lines()` is how everyone prints it."""
    dataset: str
    group: str
    name: str
    strategy: str
    how: str
    rule: str
    leader: str | None
    estimate: float
    ci_low: float
    ci_high: float
    chance: float
    evaluation: str
    depth: str
    seconds: float
    share: float
    comparisons: tuple[Comparison, ...] = ()
    caveats: tuple[str, ...] = field(default_factory=tuple)
    sizes: tuple[str, ...] = ()  # the learning curve's lines (evaluation/learning.py) where the store has sizes

    def lines(self) -> list[str]:
        chosen = CHOSEN[self.how].format(leader=f", {self.leader}" if self.leader and self.leader != self.name else "")
        share = (f"{100 * self.share:.2f}% of the parameters trained" if np.isfinite(self.share)
                 else "trained share not recorded")
        out = [f"verdict for {self.dataset}: {self.name}",
               f"  balanced accuracy {fmt_ci(self.estimate, self.ci_low, self.ci_high)} (pooled out-of-fold, 95% "
               f"bootstrap CI; {self.evaluation}; chance {self.chance:.3f})",
               f"  chosen by {chosen}",
               f"  depth: {self.depth}",
               *[f"  {line}" for line in self.sizes],
               f"  cost: {share}, {self.seconds:.1f} s of training per fold"]
        out += [f"  caveat: {c}" for c in self.caveats]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["comparisons"] = [asdict(c) for c in self.comparisons]
        d["caveats"] = list(self.caveats)
        d["sizes"] = list(self.sizes)
        d["text"] = self.lines()
        return d


def evaluation_text(n_folds: int, info: dict) -> str:
    """How the estimate was obtained: an official split is one held-out test set scored once."""
    if n_folds <= 1:
        return "a held-out test set scored once, not cross-validated"
    return f"{n_folds}-fold cross-validation"


def _depth(ev: Evidence, t: pd.DataFrame, ds: str, rec: pd.Series, shares: pd.Series
           ) -> tuple[str, tuple[Comparison, ...]]:
    """The recommendation against the shallowest and deepest candidate of its backbone and head."""
    sub = t[(t.dataset == ds) & (t.backbone == rec.backbone) & (t["head"] == rec["head"])
            & ~t.strategy.astype(str).str.startswith("auto_depth")].copy()
    sub["share"] = sub.group.map(shares)
    sub = sub[np.isfinite(sub.share.astype(float))]
    if sub.group.nunique() < 2:
        return f"only one depth was tried ({short_strategy(rec.strategy)})", ()
    ends = [sub.sort_values(["share", MAIN]).group.iloc[0], sub.sort_values(["share", MAIN]).group.iloc[-1]]
    others = [g for g in dict.fromkeys(ends) if g != rec.group]
    if not others:
        return "only one depth was tried", ()
    tests = paired_tests(ev, t, ds, others)
    comps = []
    for _, r in tests.iterrows():
        row = sub[sub.group == r.group].iloc[0]
        comps.append(Comparison(short_strategy(row.strategy), float(row.share), float(r["mean difference"]),
                                float(r["95% CI low"]), float(r["95% CI high"]), float(r["Holm p (corrected t)"]),
                                int(r.pairs)))
    if not comps or max(c.pairs for c in comps) < 3:
        n = max((c.pairs for c in comps), default=0)
        return f"too few folds ({n}) to tell the depths tried apart", tuple(comps)
    me = short_strategy(rec.strategy)
    detail = "; ".join(f"{me} − {c.strategy} {c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}], Holm p {c.holm_p:.2f}"
                       for c in comps)
    found = [c for c in comps if c.holm_p < ALPHA]
    if not found:
        names = " … ".join(short_strategy(s) for s in sub.sort_values("share").strategy.iloc[[0, -1]])
        return f"no detectable difference between the depths tried ({names}: {detail})", tuple(comps)
    said = []
    for c in found:
        deeper = shares[rec.group] > c.share
        if c.diff > 0:
            said.append(f"{'fine-tuning beyond' if deeper else 'training less than'} {c.strategy} gains "
                        f"{c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}] (Holm p {c.holm_p:.2g})")
        else:
            said.append(f"{c.strategy} scores {-c.diff:.3f} [{-c.high:.3f}, {-c.low:.3f}] higher than the "
                        f"recommendation (Holm p {c.holm_p:.2g})")
    return "; ".join(said), tuple(comps)


def _caveats(ev: Evidence, ds: str, rec: pd.Series, how: str, est: tuple, chance: float, n_folds: int,
             pairs: int) -> list[str]:
    info, cfg = ev.info(ds), ev.config
    cells = ev.cells[ev.cells.dataset == ds]
    out = []
    if how == OPTIMISTIC:
        out.append("chosen on the same test folds that score it: the estimate is optimistic (no cell stored "
                   "inner-validation predictions: train.val_fraction 0, or folds too small to split)")
    if cfg.get("primary") and how != PRIMARY:
        out.append(f"the config's primary {cfg['primary']} matches no strategy here")
    if np.isfinite(est[1]) and est[1] <= chance:
        out.append(f"the 95% CI includes chance ({chance:.3f})")
    if n_folds <= 1:
        out.append("one held-out split: no spread over folds and no paired test between strategies")
    elif pairs and pairs < 3:
        out.append(f"only {pairs} folds: too few to tell strategies apart")
    if info.get("patient_ids") is False or (not info.get("grouped") and "patient_ids" not in info):
        out.append("no patient ids: images of one patient may sit in training and test folds, so every figure "
                   "is optimistic")
    dup = info.get("duplicates") or {}
    if near(dup) and dup.get("duplicate_groups"):
        out.append(f"folds kept {dup['duplicate_groups']} near-duplicate groups together (perceptual hash within "
                   f"{dup['near_duplicates']} bits)")
    late = unfinished(ev.metrics[ev.metrics.dataset == ds])
    if late:
        names = {r.group: short_strategy(r.strategy) + ("" if r["head"] == "softmax" else f" {r['head']}")
                 for _, r in ev.metrics[ev.metrics.group.isin(late)].drop_duplicates("group").iterrows()}
        out.append("unfinished, left out of the choice: " + ", ".join(
            f"{names.get(g, g)} ({n} of {most} folds)" for g, (n, most) in late.items())
            + "; `medtune run` with the same config finishes them")
    collapsed = collapse_lines(ev, ds)
    if collapsed:
        mine = sum(f" {rec.strategy} {rec['head']} fold " in line for line in collapsed)
        out.append(f"{len(collapsed)} cell(s) collapsed: their predictions are far from the class mix, or one class"
                   + (f"; {mine} of them the recommendation's" if mine else "") + " (the diagnosis lists each)")
    pinned = pinned_lines(ev, ds)
    if pinned:
        out.append(f"{len(pinned)} choice(s) pinned at the edge of their list: the best value may lie beyond it")
    budget = budget_limited(cells)
    if len(budget):
        names = ", ".join(f"{r.backbone} {r.strategy}" + ("" if r["head"] == "softmax" else f" {r['head']}")
                          + f" ({r['last']} of {r.cells} folds)" for _, r in budget.iterrows())
        out.append(f"budget-limited: {names} had their best epoch at the last one; more epochs might change "
                   "the ranking")
    return out


def collapse_lines(ev: Evidence, ds: str | None = None) -> list[str]:
    """Collapsed cells of a data set (all with None), diagnosed now from the stored predictions."""
    cells = ev.cells if ds is None else ev.cells[ev.cells.dataset == ds]
    names = {d: ev.class_names(d) for d in cells.dataset.unique()}
    return collapsed_cells(cells, ev.predictions[ev.predictions.cell_id.isin(cells.cell_id)], names)


def pinned_lines(ev: Evidence, ds: str | None = None) -> list[str]:
    """Choices pinned at the edge of their list: `{choose: [...]}` picks and the heads' own C / k."""
    cells = ev.cells if ds is None else ev.cells[ev.cells.dataset == ds]
    return edge_choices(chosen_values(cells)) + edge_choices(head_choices(cells))


def verdicts(ev: Evidence, t: pd.DataFrame | None = None, n_boot: int = N_BOOT) -> dict[str, Verdict]:
    """{data set: Verdict} of a store's evidence (computed once per Evidence and kept on it)."""
    key = ("verdicts", n_boot)
    if key in ev.memo:
        return ev.memo[key]
    t = choice_table(ev) if t is None else t
    share = ev.cells.set_index("cell_id")["info"].map(lambda i: i.get("trainable_fraction", np.nan))
    shares = ev.metrics.assign(share=ev.metrics.cell_id.map(share)).groupby("group")["share"].mean()
    cfg = ev.config
    out = {}
    for ds in dict.fromkeys(t.dataset):
        if not t[(t.dataset == ds) & t.headline].shape[0]:
            continue
        rec = t[(t.dataset == ds) & t.headline].iloc[0]
        y, p, s = pooled(ev, rec.group)
        est = ci(ev, ds, y, p, s, balanced_accuracy, n_boot)
        names = ev.class_names(ds)
        chance = 1 / len(names) if names else np.nan
        members = ev.metrics[ev.metrics.group == rec.group]
        n_folds = int(members["cell_id"].map(ev.cells.set_index("cell_id")["n_folds"]).max()) \
            if "n_folds" in ev.cells else members.fold.nunique()
        depth, comps = _depth(ev, t, ds, rec, shares)
        pairs = members[["seed", "fold"]].drop_duplicates().shape[0]
        leader = ev.inner_leaders.get(ds)
        leader_row = t[t.group == leader]
        out[ds] = Verdict(
            dataset=ds, group=rec.group, name=label(rec), strategy=str(rec.strategy), how=rec.headline_how,
            rule=cfg.get("recommend") or "leader",
            leader=label(leader_row.iloc[0]) if len(leader_row) else None,
            estimate=est[0], ci_low=est[1], ci_high=est[2], chance=chance,
            evaluation=evaluation_text(n_folds, ev.info(ds)), depth=depth,
            seconds=float(members.seconds.mean()), share=float(shares.get(rec.group, np.nan)),
            comparisons=comps,
            caveats=tuple(_caveats(ev, ds, rec, rec.headline_how, est, chance, n_folds, pairs)))
    ev.memo[key] = out  # before the learning curves, which read the full size's verdicts from here
    ev.memo[key] = out = with_learning_curves(ev, out, n_boot)
    return out


def with_learning_curves(ev: Evidence, out: dict[str, Verdict], n_boot: int) -> dict[str, Verdict]:
    """The verdicts with their learning-curve lines, where `ev` is a store's full size and the store
    holds other sizes too (evaluation/learning.py); a store of one size prints as before."""
    if not out or not is_full(ev.train_size) or len(ev.sizes) < 2:
        return out  # a smaller size's own verdicts (the curve's points), a store of one size, or built by hand
    lc = learning_of(ev, n_boot)
    return {ds: replace(v, sizes=tuple(lc.lines(ds))) for ds, v in out.items()}


def learning_of(source: str | Path | Evidence, n_boot: int = N_BOOT) -> LearningCurves:
    """A store's learning curves with the verdict at each size (kept on the full size's Evidence)."""
    return learning_curves(source, n_boot, judge=verdicts)


def store_verdicts(store_path: str | Path, n_boot: int = N_BOOT) -> dict[str, Verdict]:
    """{data set: Verdict} straight from a results store."""
    return verdicts(read_evidence(store_path), n_boot=n_boot)
