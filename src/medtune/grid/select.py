"""Choices made on inner splits only: `{choose: [...]}` hyperparameters and the nested `auto_depth`.

A list in the config is a grid axis (`blocks: [1, 2, 3]` makes three cells, the depth curve); a
`{choose: [...]}` is a choice inside one cell. For a choice, every candidate value is trained on
the outer training fold's fit part with early stopping on its inner validation part, scored on
that validation part (balanced accuracy, ties broken by the lower class-balanced validation
loss), and the best candidate's model is kept and scored on the outer test fold once: the test
fold never takes part in a choice. `auto_depth` (Varma & Simon 2006 on selection bias) chooses
among whole strategies by an `inner_folds`-fold CV inside the outer training fold, then trains
the pick on the outer fold. A cell's label and id name the choice spec, never the chosen value,
and `info` records every candidate's inner score and the pick.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medtune.models.backbones import create_backbone
from medtune.config import (AUTO_DEPTH, ExperimentConfig, StrategyConfig, auto_depth_candidates, choice_values,
                            expand_choices, expand_params, is_choice)
from medtune.data.loaders import ImageTable
from medtune.errors import ConfigError
from medtune.evaluation.metrics import balanced_accuracy
from medtune.data.splits import inner_split, kfold
from medtune.training.strategies import Strategy, create_strategy, uses_learning_rate
from medtune.training.loop import FitResult, Runtime, TrainSettings, fit, fit_epochs, set_seed

ETA = 3  # successive halving keeps the best 1/ETA of the candidates at each rung


# --------------------------------------------------------------------------- specs (grid side)
def _value_text(v: Any) -> str:
    if is_choice(v):
        return "choose(" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in choice_values(v)) + ")"
    return str(v)


def cell_strategy(name: str, params: dict[str, Any], lr: Any = None) -> dict[str, Any]:
    """The strategy part of a cell's config: every hyperparameter (defaults filled in), a choice kept
    as `{choose: [...]}`, the strategy's own `lr` only where the entry sets one. For a strategy
    without choices or `lr` it is `{name, **strategy.params()}`, the form stored before choices existed."""
    if name == AUTO_DEPTH:
        cands = [cell_strategy(c.name, p, c.lr.model_dump() if hasattr(c.lr, "model_dump") else c.lr)
                 for c in auto_depth_candidates(params) for p in expand_params(c.params)]
        for c in cands:  # a candidate's lr list is a set of candidates, not a grid axis
            if isinstance(c.get("lr"), list):
                c["lr"] = {"choose": c["lr"]}
        return {"name": name, "candidates": cands, "inner_folds": params.get("inner_folds", 3)}
    first = expand_choices(params)[0]
    filled = create_strategy(name, **first).params()
    out = {"name": name, **filled, **{k: dict(v) for k, v in params.items() if is_choice(v)}}
    if lr is not None:
        out["lr"] = dict(lr) if is_choice(lr) else lr
    return out


def strategy_label(sd: dict[str, Any]) -> str:
    """The cell's strategy label: registry key plus non-default hyperparameters, a choice printed as
    `choose(a, b)` (the spec, not the value chosen)."""
    if sd["name"] == AUTO_DEPTH:
        cands = tuple(strategy_label(c) for c in sd["candidates"])
        default = tuple(strategy_label(cell_strategy(**_entry(c))) for c in auto_depth_candidates({}))
        extra = ([f"candidates={cands}"] if cands != default else []) + \
                ([f"inner_folds={sd['inner_folds']}"] if sd["inner_folds"] != 3 else [])
        return f"{AUTO_DEPTH}({', '.join(extra)})" if extra else AUTO_DEPTH
    params = {k: v for k, v in sd.items() if k not in ("name", "lr")}
    first = create_strategy(sd["name"], **{k: choice_values(v)[0] if is_choice(v) else v for k, v in params.items()})
    defaults = {f.name: f.default for f in dataclasses.fields(first)}
    extra = [f"{k}={_value_text(v)}" for k, v in params.items() if is_choice(v) or _same(v) != _same(defaults[k])]
    if "lr" in sd:
        extra.append(f"lr={_value_text(sd['lr'])}")
    return f"{sd['name']}({', '.join(extra)})" if extra else sd["name"]


def _same(v: Any) -> Any:
    """JSON turns tuples into lists: compare values in one form."""
    return tuple(v) if isinstance(v, list) else v


def _entry(c: StrategyConfig) -> dict[str, Any]:
    return {"name": c.name, "params": c.params, "lr": c.lr.model_dump() if hasattr(c.lr, "model_dump") else c.lr}


def cell_strategies(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Every strategy cell of the grid: one per value of each list (grid axis); choices stay inside."""
    out = []
    for s in cfg.strategies:
        lrs = s.lr if isinstance(s.lr, list) else [s.lr]
        for lr in lrs:
            lr = lr.model_dump() if hasattr(lr, "model_dump") else lr
            for params in ([s.params] if s.name == AUTO_DEPTH else expand_params(s.params)):
                out.append(cell_strategy(s.name, params, lr))
    return out


# --------------------------------------------------------------------------- candidates (cell side)
@dataclass(frozen=True)
class Candidate:
    """One way to train a cell: a strategy at a base learning rate, with the values it took from choices."""

    strategy: Strategy
    lr: float
    chosen: dict[str, Any]

    def key(self) -> str:
        """How the candidate is named in `info`: the strategy's label, plus its lr when that was chosen."""
        return self.strategy.label() + (f" lr={self.lr:g}" if "lr" in self.chosen else "")


def candidates(sd: dict[str, Any], train_lr: Any) -> list[Candidate]:
    """Every candidate of a cell's strategy spec: the product of its choices (and of train.lr's, unless
    the strategy sets its own lr); auto_depth's candidates all together."""
    if sd["name"] == AUTO_DEPTH:
        return [c for cand in sd["candidates"] for c in candidates(cand, train_lr)]
    params = {k: v for k, v in sd.items() if k not in ("name", "lr")}
    lr_spec = sd.get("lr", train_lr)
    lrs = choice_values(lr_spec) or [lr_spec]
    out = []
    for values in expand_choices(params):
        strategy = create_strategy(sd["name"], **values)
        for lr in lrs:
            chosen = {k: values[k] for k in params if is_choice(params[k])}
            if is_choice(lr_spec):
                chosen["lr"] = lr
            out.append(Candidate(strategy, float(lr), chosen))
    return out


def without_unused_lr(cands: list[Candidate], settings: TrainSettings) -> list[Candidate]:
    """Drop learning-rate candidates that cannot differ: for a strategy fitted by the convex probe
    (`uses_learning_rate` is false) only the first lr of each combination of its other choices is
    kept, and the lr is no longer recorded as chosen."""
    out, seen = [], set()
    for cand in cands:
        if "lr" not in cand.chosen or uses_learning_rate(cand.strategy, settings.epochs, settings.bn_statistics):
            out.append(cand)
            continue
        key = (cand.strategy.label(), repr(sorted((k, v) for k, v in cand.chosen.items() if k != "lr")))
        if key not in seen:
            seen.add(key)
            out.append(Candidate(cand.strategy, cand.lr, {k: v for k, v in cand.chosen.items() if k != "lr"}))
    return out


# --------------------------------------------------------------------------- training a cell
def fit_candidate(cand: Candidate, c: dict, table: ImageTable, fit_idx: np.ndarray, val_idx: np.ndarray,
                  settings: TrainSettings, rt: Runtime) -> FitResult:
    """Train one candidate from the cell's backbone, seeded so the result does not depend on what ran before."""
    return fit(cell_model(c, table), table, fit_idx, val_idx, cand.strategy,
               settings.model_copy(update={"lr": cand.lr}), rt, seed=c["seed"])


def cell_model(c: dict, table: ImageTable):
    """The cell's backbone with a new head, built right after seeding: a random head must not
    depend on earlier cells."""
    bb = c["backbone"]
    set_seed(c["seed"])
    return create_backbone(bb["name"], bb["pretrained"], table.num_classes, bb["checkpoint"], bb.get("weights"),
                           bb.get("sha256"))


class Paused:
    """One candidate's training, advanced a few epochs at a time with its own random state, so
    interleaving candidates changes nothing: a candidate trained to the end is the one `fit_candidate`
    trains alone (dropout and drop-path draw from the global generator)."""

    def __init__(self, cand: Candidate, c: dict, table: ImageTable, fit_idx, val_idx, settings, rt) -> None:
        self.cand, self.result, self.rows, self.rng = cand, None, [], None
        self.epochs = fit_epochs(cell_model(c, table), table, fit_idx, val_idx, cand.strategy,
                                 settings.model_copy(update={"lr": cand.lr}), rt, seed=c["seed"])
        self._save()

    def _save(self) -> None:
        self.rng = (torch.get_rng_state(), np.random.get_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def advance(self, until: int) -> None:
        """Train until `until` epochs at the candidate's own rate have been evaluated (`rate_epochs`), or
        to the end (early stopping included)."""
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        if self.rng[2] is not None:
            torch.cuda.set_rng_state_all(self.rng[2])
        try:
            while self.result is None and rate_epochs(self.rows) < until:
                try:
                    self.rows.append(next(self.epochs))
                except StopIteration as done:
                    self.result = done.value
        finally:
            self._save()

    def score(self) -> tuple[float, float]:
        """(balanced accuracy, -loss) of the best epoch so far on the inner validation split."""
        best = (min(self.rows, key=lambda r: r["val_loss"]) if self.rows
                else {"val_balanced_accuracy": -1, "val_loss": 0})
        return best["val_balanced_accuracy"], -best["val_loss"]


def is_probe(row: dict) -> bool:
    """A history row of a probe fitted to convergence (models/probe.py, `probe_C`; a choice's recorded
    row says `probe`: epoch_rows): it has no learning rate, so every candidate of a rate choice fits it
    alike from the same start."""
    return "probe_C" in row or row.get("probe") is True


def rate_epochs(rows: list[dict]) -> int:
    """How many of a candidate's evaluated epochs trained at its own rate: halving's unit. A probe
    epoch (LP-FT's first phase, gradual unfreezing's head-only start) is the same for every rate, so a
    rung that counted it would rank ties, and the first-listed rates would go on unseen."""
    return sum(1 for r in rows if not is_probe(r))


def halving_rungs(n_candidates: int, epochs: int, eta: int = ETA) -> list[tuple[int, int]]:
    """The successive-halving schedule: per rung, (epochs every running candidate has trained at its own
    rate when it is ranked, how many candidates go on). The survivors then train to `epochs`."""
    n, out = n_candidates, []
    for i in range(max(1, math.ceil(math.log(n_candidates, eta) - 1e-9)), 0, -1):
        n = max(1, math.ceil(n / eta))
        out.append((max(1, math.ceil(epochs / eta ** i)), n))
    return out


def halving_epochs(n_candidates: int, epochs: int) -> int:
    """Candidate-epochs a halved choice trains when nothing stops early (the run-time estimate's unit;
    without halving it is n_candidates * epochs)."""
    total, running, done = 0, n_candidates, 0
    for budget, keep in halving_rungs(n_candidates, epochs):
        total += running * (budget - done)
        running, done = keep, budget
    return total + running * max(0, epochs - done)


def halve(cands: list[Candidate], c: dict, table: ImageTable, fit_idx: np.ndarray, val_idx: np.ndarray,
          settings: TrainSettings, rt: Runtime) -> tuple[dict, dict]:
    """Successive halving (Jamieson & Talwalkar 2016) of a choice on the inner validation split:
    every candidate trains the first E/ETA^s epochs of its full schedule at its own rate (a probe
    fitted first, as LP-FT's, is the same for every rate and does not count: `rate_epochs`; warm-up
    and cosine run over all E epochs, so a survivor's training is exactly the one it gets alone), the best 1/ETA by
    the best epoch's validation balanced accuracy (ties: lower loss) continue to E/ETA^(s-1), and so
    on to E. Returns ({key: (candidate, FitResult)} of the candidates trained to the end, record)."""
    runs = everyone = [Paused(cand, c, table, fit_idx, val_idx, settings, rt) for cand in cands]
    rungs = halving_rungs(len(runs), settings.epochs)
    stopped: dict[str, int] = {}
    for budget, keep in rungs:
        for r in runs:
            r.advance(budget)
        ranked = sorted(runs, key=lambda r: r.score(), reverse=True)
        for r in ranked[keep:]:
            stopped[r.cand.key()] = rate_epochs(r.rows)
            r.epochs.close()
        runs = ranked[:keep]
    for r in runs:
        r.advance(10**9)
    record = {"halving": {"eta": ETA, "rungs": len(rungs), "stopped_after_epochs": stopped,
                          "epochs_trained": sum(stopped.values()) + sum(rate_epochs(r.rows) for r in runs),
                          "epochs_without_halving": len(cands) * settings.epochs},
              "histories": {r.cand.key(): epoch_rows(r.rows) for r in everyone}}
    return {r.cand.key(): (r.cand, r.result) for r in runs}, record


def epoch_rows(history: list[dict]) -> list[dict]:
    """A candidate's epochs as a choice records them: what it scored on the inner validation split
    after each evaluated epoch and when, so a choice can be read (and its halving replayed) epoch by epoch;
    a probe's row says so (`probe`: not one of halving's epochs)."""
    keys = ("epoch", "train_loss", "val_loss", "val_balanced_accuracy", "elapsed_seconds")
    return [{**{k: h[k] for k in keys if k in h}, **({"probe": True} if is_probe(h) else {})} for h in history]


def inner_score(result: FitResult, table: ImageTable, idx: np.ndarray, settings: TrainSettings,
                rt: Runtime) -> tuple[float, float]:
    """(balanced accuracy, class-balanced log loss) of a trained candidate on inner indices."""
    probs = result.predict_proba(table, idx)
    y = table.labels[idx]
    bacc = balanced_accuracy(y, probs)
    present = np.unique(y)
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))
    loss = float(np.mean([nll[y == k].mean() for k in present]))
    return bacc, loss


def best_of(scores: dict[str, tuple[float, float]]) -> str:
    """Highest balanced accuracy; a tie goes to the lower loss, then to the first listed."""
    return max(scores, key=lambda k: (scores[k][0], -scores[k][1]))


def train_cell(c: dict, table: ImageTable, groups: np.ndarray | None, train_idx: np.ndarray, fit_idx: np.ndarray,
               val_idx: np.ndarray, settings: TrainSettings, rt: Runtime) -> tuple[Strategy, FitResult, dict | None]:
    """Train a cell on its outer training fold: (strategy used, FitResult, record of the choice or None)."""
    cands = without_unused_lr(candidates(c["strategy"], c["train"]["lr"]), settings)
    if c["strategy"]["name"] == AUTO_DEPTH:
        pick, record = auto_depth(cands, c, table, groups, train_idx, settings, rt)
        return pick.strategy, fit_candidate(pick, c, table, fit_idx, val_idx, settings, rt), record
    if len(cands) == 1:
        return cands[0].strategy, fit_candidate(cands[0], c, table, fit_idx, val_idx, settings, rt), None
    if len(val_idx) == 0 or len(np.unique(table.labels[val_idx])) < 2:
        raise ConfigError(f"{strategy_label(c['strategy'])}: choosing needs an inner validation split with at "
                          f"least two classes (this fold's has {len(val_idx)} images); raise train.val_fraction "
                          "or use a plain value instead of {choose: [...]}.")
    results, scores, extra = {}, {}, {}
    if c.get("halving"):
        results, extra = halve(cands, c, table, fit_idx, val_idx, settings, rt)
    else:
        for cand in cands:
            results[cand.key()] = (cand, fit_candidate(cand, c, table, fit_idx, val_idx, settings, rt))
        extra = {"histories": {key: epoch_rows(result.history) for key, (_, result) in results.items()}}
    for key, (cand, result) in results.items():
        scores[key] = inner_score(result, table, val_idx, settings, rt)
    picked = best_of(scores)
    cand, result = results[picked]
    record = {"on": f"inner validation split ({len(val_idx)} images of the training fold)", "picked": picked,
              "chosen": cand.chosen, "scores": {k: v[0] for k, v in scores.items()},
              "losses": {k: v[1] for k, v in scores.items()}, **extra}
    return cand.strategy, result, record


def auto_depth(cands: list[Candidate], c: dict, table: ImageTable, groups: np.ndarray | None,
               train_idx: np.ndarray, settings: TrainSettings, rt: Runtime) -> tuple[Candidate, dict]:
    """Nested CV: every candidate scored by `inner_folds`-fold CV inside the outer training fold (mean
    balanced accuracy, ties to the lower loss); the pick is the best of those scores."""
    k = c["strategy"]["inner_folds"]
    labels = table.labels[train_idx]
    inner = kfold(labels, groups[train_idx] if groups is not None else None, k, c["seed"])
    scores: dict[str, tuple[float, float]] = {}
    by_key = {}
    for cand in cands:
        fold_scores = []
        for tr, te in inner:
            fit_i, val_i = inner_split(train_idx[tr], table.labels, groups, settings.val_fraction, c["seed"])
            res = fit_candidate(cand, c, table, fit_i, val_i, settings, rt)
            fold_scores.append(inner_score(res, table, train_idx[te], settings, rt))
        scores[cand.key()] = (float(np.mean([s[0] for s in fold_scores])), float(np.mean([s[1] for s in fold_scores])))
        by_key[cand.key()] = cand
    picked = best_of(scores)
    record = {"on": f"{k}-fold CV inside the training fold", "picked": picked, "chosen": by_key[picked].chosen,
              "scores": {key: v[0] for key, v in scores.items()}, "losses": {key: v[1] for key, v in scores.items()}}
    if not all(math.isfinite(v[0]) for v in scores.values()):
        raise ConfigError("auto_depth: an inner fold lacked a class; lower inner_folds or use more data.")
    return by_key[picked], record
