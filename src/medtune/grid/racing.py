"""Racing across folds: stop the candidates that cannot win before they cost a full k-fold.

With `racing: on` the runner runs a data set's grid round by round, a round being one (seed, fold)
of every candidate still in the race (a candidate is a cell group: everything but fold and seed).
After each round from `min_folds` on, every candidate is compared with the leader on the folds
both have finished, by the scores of their **inner validation splits** (never a test fold: the
outer estimate of a candidate that survives is as honest as without racing), with the paired
corrected resampled t-test of Nadeau & Bengio (metrics.corrected_ttest), one-sided against a
margin: a candidate is pruned when the test is confident, at `confidence`, that the leader beats
it by more than `margin`. So a near-tie is never pruned however small its fold-to-fold variance
is, and the same folds pair every comparison, as the grid's paired tests do.

A score on n validation images moves in steps of about 1/n (balanced accuracy, accuracy; AUC's
steps are finer), so two folds can show exactly the same gap, a sample variance of 0 that the
t-test on one degree of freedom reads as certainty (Holm p 8e-15 for a 0.033 gap on 19 images a
fold). The differences' variance is therefore floored at the rounding variance of two such scores
(Sheppard's correction: step^2 / 12 each), which no real fold-to-fold noise is below.

The p-value threshold is split evenly over the rounds at which pruning is possible (Bonferroni
over looks) and Holm-adjusted over the candidates compared in a round, so under the test's own
assumptions the chance of pruning a candidate that is not worse by the margin stays below
1 - confidence for the whole race.

The decisions depend only on the done cells' stored predictions, so a resumed run replays the
race from the store and takes the same decisions: finished cells are never redone, and the rounds
left continue where the race stopped. Pruned cells (the folds a pruned candidate did not run) are
stored with status `pruned` and the reason; a rerun with `racing: off` runs them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np

from medtune.evaluation.headline import TIE
from medtune.evaluation.inner import Score, inner_scores
from medtune.evaluation.metrics import corrected_ttest, holm
from medtune.data.subsets import is_full, size_label, size_of
from medtune.evaluation.store import Store, group_key

PRUNED = "pruned"


def candidate(cell: dict) -> str:
    return f"{cell['dataset']} {cell['backbone']} {cell['strategy']} {cell['head']}"


def round_key(cell: dict) -> tuple[int, int]:
    return (cell["seed"], cell["fold"])


def prune(scores: dict[str, dict[tuple, Score]], looks: int, confidence: float, margin: float,
          metric: str = "balanced_accuracy", names: dict[str, str] | None = None) -> dict[str, str]:
    """{candidate: reason} for the candidates to stop now. `scores` = {candidate: {round: Score}}
    over the rounds done so far; `looks` = how many rounds may prune in the whole race. An exact tie
    for the lead goes to the candidate first by `names` ({candidate: readable name}; the key itself
    where none is given)."""
    means = {g: np.mean([s.value for s in r.values()]) for g, r in scores.items()
             if r and all(np.isfinite(s.value) for s in r.values())}
    if len(means) < 2:
        return {}
    leader = min(means, key=lambda g: (-round(float(means[g]), TIE), (names or {}).get(g, g), g))
    tested, pvalues = [], []
    for g in means:
        if g == leader:
            continue
        common = sorted(set(scores[g]) & set(scores[leader]))
        if len(common) < 2:
            continue
        a = np.asarray([scores[leader][k].value for k in common])
        b = np.asarray([scores[g][k].value for k in common])
        n_val = np.mean([scores[g][k].n_val for k in common])
        n_fit = np.mean([scores[g][k].n_fit for k in common])
        floor = 2 * (1 / n_val) ** 2 / 12  # two scores, each rounded to steps of 1/n_val
        t, p_two = corrected_ttest(a - margin, b, n_fit, n_val, min_var=floor)  # H0: leader - candidate <= margin
        p_one = p_two / 2 if t > 0 else 1 - p_two / 2 if np.isfinite(p_two) else 1.0
        tested.append((g, float(np.mean(a - b)), len(common)))
        pvalues.append(p_one)
    if not tested:
        return {}
    alpha = (1 - confidence) / max(looks, 1)
    adjusted = holm(pvalues)
    return {g: (f"worse than the leader by {diff:.3f} {metric} on the inner validation splits of {n} fold(s) "
                f"(one-sided corrected t-test against a margin of {margin:g}: Holm p {p:.3g} < {alpha:.3g}, "
                f"i.e. {1 - confidence:g} over {looks} look(s))")
            for (g, diff, n), p in zip(tested, adjusted) if p < alpha}


def race(cells: list[dict], store: Store, run_round: Callable[[list[dict], str], None], settings) -> dict[str, str]:
    """Run `cells` (the whole grid, done ones included) as races, one per data set and training-set
    size (learning curves: each size is its own race, never a small size against the full); `run_round(todo,
    stage)` trains and records the given cells (`stage` names the round for the progress line).
    Returns {group key: "candidate: why"} of the pruned candidates. `settings`: the RacingConfig."""
    pruned: dict[str, str] = {}
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        size = size_of(c["config"])
        by_dataset[c["dataset"] if is_full(size) else f"{c['dataset']} at {size_label(size)}"].append(c)
    for dataset, dcells in by_dataset.items():
        group_of = {c["cell_id"]: group_key(c["config"]) for c in dcells}
        names = {group_of[c["cell_id"]]: candidate(c) for c in dcells}
        rounds = sorted({round_key(c) for c in dcells})
        looks = max(len(rounds) - settings.min_folds, 0)  # rounds after which pruning can still save a fold
        out: dict[str, str] = {}
        scores: dict[str, dict[tuple, Score]] = defaultdict(dict)
        for i, rk in enumerate(rounds):
            this = [c for c in dcells if round_key(c) == rk and group_of[c["cell_id"]] not in out]
            done = store.done_ids()
            left = [c for c in this if c["cell_id"] not in done]
            if left:
                run_round(left, f"{dataset}: racing round {i + 1}/{len(rounds)}, {len(this)} candidate(s); ")
            got = inner_scores(store, [c["cell_id"] for c in this], settings.metric)
            for c in this:
                if c["cell_id"] in got:
                    scores[group_of[c["cell_id"]]][rk] = got[c["cell_id"]]
            if i + 1 < settings.min_folds or i + 1 == len(rounds):
                continue
            active = {g: s for g, s in scores.items() if g not in out}
            for g, why in prune(active, looks, settings.confidence, settings.margin, settings.metric,
                                names).items():
                out[g] = f"{why}; stopped after round {i + 1} of {len(rounds)}"
        done = store.done_ids()
        for c in dcells:  # the folds a pruned candidate did not run, recorded as such
            g = group_of[c["cell_id"]]
            if g in out and c["cell_id"] not in done:
                store.save_cell(c, PRUNED, error=out[g], info={"racing": out[g]})
        first = {group_of[c["cell_id"]]: c for c in reversed(dcells)}
        pruned.update({g: f"{candidate(first[g])}: {why}" for g, why in out.items()})
    return pruned
