"""The headline answer of a grid, chosen without looking at the test folds.

Picking the row with the best mean over the outer test folds and reporting that mean is the
optimism nested selection exists to avoid: the folds that choose the winner also score it. The
headline is therefore, per data set, (1) the strategy the config declared `primary` before the
run, else (2) `auto_depth`, whose depth was chosen on inner folds of each outer training fold,
each reported with its outer-fold estimate, else (3) the inner-validation leader: the best mean
score on the cells' inner validation splits (every cell stores its predictions there; under
`racing:`, among the candidates the race kept; an exact tie to the group training fewer parameters,
then to the first by name: inner_leader). Only when no cell has an inner validation split
(`train.val_fraction: 0`) does the headline fall back to (4) the best row on the test folds, and
then it says so; a candidate racing stopped early (fewer folds) is never that row. `keep_best`
uses the same rule for the deployed model, so the model a clinic gets is the one the headline
describes.

`recommend: one_se` (config) replaces (3) by the simpler alternative: among the groups whose mean
inner-validation score lies within one standard error (over folds) of the leader's, the one that
trains the fewest parameters (Breiman's one-standard-error rule): a tie on the inner splits is
then settled by cost, not by noise. `recommend: leader` (the default) keeps the leader.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PRIMARY, NESTED, INNER, ONE_SE, OPTIMISTIC = "primary", "nested", "inner", "one_se", "optimistic"
RULES = ("leader", "one_se")  # `recommend:` in the config

HOW = {
    PRIMARY: "declared primary in the config before the run; its estimate is from the outer test folds",
    NESTED: "auto_depth's nested choice (depth picked on inner folds of each outer training fold); its "
            "estimate is from the outer test folds, which took no part in the choice",
    INNER: "the inner-validation leader: the best mean score on the cells' inner validation splits (never a test "
           "fold; under racing, among the candidates the race kept); its estimate is from the outer test folds, "
           "which took no part in the choice",
    ONE_SE: "the one-standard-error rule: of the groups whose mean inner-validation score is within one standard "
            "error (over folds) of the inner-validation leader's, the one training the fewest parameters (never a "
            "test fold); its estimate is from the outer test folds, which took no part in the choice",
    OPTIMISTIC: "best mean on the outer test folds: an optimistic view, since the same folds chose it and score "
                "it (no cell has an inner validation split: keep `train.val_fraction` above 0, declare `primary:` "
                "or add `auto_depth` for an unbiased headline)",
}


def strategy_name(label: str) -> str:
    """`partial_ft(blocks=2)` -> `partial_ft`: the registry key of a stored strategy label."""
    return str(label).split("(", 1)[0]


def _first(groups: pd.DataFrame) -> str:
    """Among several matching groups (several backbones or heads), a fixed choice that looks at no
    score: the network's own classifier (softmax) first, then backbone and variant by name."""
    from medtune.models.heads import HEADS

    own = [name for name, h in HEADS.items() if not h.on_features]
    g = groups.assign(_fitted=~groups["head"].isin(own)).sort_values(["_fitted", "backbone", "variant", "strategy"])
    return str(g["group"].iloc[0])


def headline_group(cells: pd.DataFrame, primary: str | None = None, metric: str = "balanced_accuracy",
                   inner_leader: str | None = None) -> tuple[str, str]:
    """(group key, how) for ONE data set's done cells (rows of `Store.metrics()`, with `group`,
    `strategy`, `backbone`, `head`, `variant`, `metric` and, from a raced store, `pruned` columns).
    `inner_leader`: the group with the best mean inner-validation score (headline.inner_leader via evidence.choices).
    `how` is PRIMARY, NESTED, INNER or OPTIMISTIC (see HOW). A `primary` that matches no strategy
    of the data set is ignored here; the report says so."""
    if cells.empty:
        raise ValueError("headline_group needs at least one done cell")
    groups = cells.drop_duplicates("group")
    if primary:
        hit = groups[(groups["strategy"] == primary) | (groups["strategy"].map(strategy_name) == primary)]
        if not hit.empty:
            return _first(hit), PRIMARY
    nested = groups[groups["strategy"].map(strategy_name) == "auto_depth"]
    if not nested.empty:
        return _first(nested), NESTED
    if inner_leader is not None and inner_leader in set(groups["group"]):
        return inner_leader, INNER
    whole = cells[cells["pruned"] == ""] if "pruned" in cells.columns else cells
    means = (whole if not whole.empty else cells).groupby("group")[metric].mean().dropna()
    names = name_order(cells)
    return str(min(means.index, key=lambda g: (-round(float(means[g]), TIE), names[str(g)]))), OPTIMISTIC


TIE = 12  # decimals: means that agree to 12 places tie (the order folds are summed in moves the last bit)


def name_order(cells: pd.DataFrame) -> dict[str, tuple]:
    """{group: a readable sort key}: backbone, variant, strategy and head, then the key itself. Where
    scores tie, medtune takes the first group by this order, never by the key alone (a hash of the
    configuration, which changes with every results version)."""
    first = cells.drop_duplicates("group").set_index("group")
    cols = [c for c in ("backbone", "variant", "strategy", "head") if c in first.columns]
    return {str(g): tuple(str(first.at[g, c]) for c in cols) + (str(g),) for g in first.index}


def inner_leader(cells: pd.DataFrame) -> str | None:
    """The group with the best mean inner-validation score (`inner`) among ONE data set's cells, None
    when none has one. Scores on n validation images move in steps of 1/n, so two groups can tie
    exactly; a tie goes to the group training the fewer parameters (`share`, where known), then to the
    first by name (name_order)."""
    means = cells.groupby("group")["inner"].mean().dropna() if "inner" in cells else pd.Series(dtype=float)
    if not len(means):
        return None
    share = cells.groupby("group")["share"].mean() if "share" in cells else pd.Series(dtype=float)
    names = name_order(cells)
    cost = {g: float(share.get(g, np.nan)) for g in means.index}
    return str(min(means.index, key=lambda g: (-round(float(means[g]), TIE),
                                               cost[g] if np.isfinite(cost[g]) else np.inf, names[str(g)])))


def one_se_group(cells: pd.DataFrame, leader: str) -> str:
    """The one-standard-error choice among ONE data set's groups, given the leader's key. `cells` needs
    `group`, `inner` (the cell's inner-validation score) and `share` (its trainable share of the
    network's parameters). The leader's standard error is sd / sqrt(n) over its folds (and seeds); with
    fewer than two scored folds there is no error to allow and the leader stays. Ties in share go to the
    higher inner mean, then to the first by name (no score from a test fold enters)."""
    scored = cells.dropna(subset=["inner"])
    lead = scored.loc[scored["group"] == leader, "inner"]
    if len(lead) < 2:
        return leader
    se = float(lead.std(ddof=1) / np.sqrt(len(lead)))
    means = scored.groupby("group")["inner"].mean()
    share = cells.groupby("group")["share"].mean()
    near = [g for g in means.index if means[g] >= means[leader] - se and np.isfinite(share.get(g, np.nan))]
    if leader not in near:
        return leader
    names = name_order(cells)
    return str(min(near, key=lambda g: (share[g], -round(float(means[g]), TIE), names[str(g)])))


def unfinished(cells: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """{group: (its done (seed, fold) cells, the most any group has)} for ONE data set's groups that have
    not finished the folds the others have (an interrupted or partly failed run). Racing's pruned groups
    stopped by design and are not unfinished. Such a group is left out of the recommendation: an estimate
    from a subset of the folds is not comparable, and the nested choice took precedence however few of its
    folds were done."""
    if not {"seed", "fold"} <= set(cells.columns) or cells.empty:
        return {}
    running = cells[cells["pruned"] == ""] if "pruned" in cells.columns else cells
    done = running.drop_duplicates(["group", "seed", "fold"]).groupby("group").size()
    if done.empty:
        return {}
    most = int(done.max())
    return {str(g): (int(n), most) for g, n in done.items() if n < most}


def choose(cells: pd.DataFrame, rule: str = "leader", primary: str | None = None,
           metric: str = "balanced_accuracy") -> tuple[str, str, str | None]:
    """(group, how, inner-validation leader or None) for ONE data set's done cells: the one rule every
    reader of the store (verdict, report, results, keep_best) follows. `cells` as for headline_group
    plus `inner` (inner-validation score per cell, NaN where none) and `share` (trainable share)."""
    if rule not in RULES:
        raise ValueError(f"recommend must be one of {RULES}, got {rule!r}")
    late = unfinished(cells)
    if len(late) < cells["group"].nunique():
        cells = cells[~cells["group"].isin(late)]
    whole = cells[cells["pruned"] == ""] if "pruned" in cells.columns else cells
    leader = inner_leader(whole)
    group, how = headline_group(cells, primary, metric, leader)
    if how == INNER and rule == "one_se":
        group, how = one_se_group(whole, leader), ONE_SE
    return group, how, leader


def headline_groups(cells: pd.DataFrame, primary: str | None = None, metric: str = "balanced_accuracy",
                    inner_leaders: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """{data set: (group key, how)} over a whole store's done cells."""
    return {ds: headline_group(sub, primary, metric, (inner_leaders or {}).get(ds))
            for ds, sub in cells.groupby("dataset", sort=False) if not sub[metric].isna().all()}
