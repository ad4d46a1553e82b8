"""Learning curves: would more labelled data change which depth wins? (issue 40)

A store run with `train_sizes:` holds every cell at several sizes of its outer training fold
(data/subsets.py: nested, stratified, patient-intact subsets beside the same outer test fold).
`learning_curves` reads it once and gives, per data set:

- **points**: for each curve (backbone, head, variant, strategy) and size, the mean number of
  training patients over the folds (the x value), the pooled out-of-fold balanced accuracy with its
  cluster-bootstrap CI (evidence.group_table: at the full size the main table's own numbers), the
  mean trainable share and the mean cell seconds;
- **the recommendation at each size**: verdict.verdicts of that size's evidence (the rule fixed
  before the run, applied to that size's inner-validation scores) and whether depth mattered there
  (passed in as `judge`: verdict.learning_of does, so this module does not import the verdict);
- **crossover**, judged on the pooled estimates. F leads at the full size; walking down from the
  full size, the first size where F is not at the top (a tie counts as the top) closes the
  interval, S being that size's leader (S leads at the smaller end, F from the larger end up). The
  gap F − S at that smaller size and at the full size, and its change between them, are paired over
  the outer folds (every size is scored on the same test folds) with the interval every paired
  difference in medtune gets (metrics.corrected_interval: Nadeau & Bengio's corrected variance,
  which counts the training sets' part of the noise as a bootstrap over test patients does not),
  the full size's correction at every size: at the full size the gap's interval is the one the
  depth line and the paired-tests table print for the same pair. It is a **crossover** only if the
  order reverses, at least one side's gap has a 95% interval excluding 0, and the change of the gap
  excludes 0 too (parallel curves change their gap by nothing, whatever their noise). Otherwise the
  curves **cross within their noise**; where F leads at every size there is **no crossover**;
- **extrapolation to twice the full size's patients**, per curve: the inverse power law
  err(n) = a·n^(−b) + c on error = 1 − balanced accuracy, fitted by weighted least squares
  (scipy's curve_fit, weights 1/CI half-width; a ≥ 0, b in [0, 2], c in [0, 1]). Three parameters
  need at least MIN_SIZES (4) sizes; the fit is refused, with its reason, when it does not converge,
  when its residual RMSE exceeds the points' own mean CI half-width (it does not follow the points
  within their noise), or when b sits at a bound (the points do not pin down a power-law decline).
  The interval is a parametric bootstrap: each point redrawn from a normal of its CI's width, the
  law refitted N_DRAWS times. The points are treated as independent, though nested subsets scored
  on one test set are not. An extrapolation is a model, not a measurement: it is labelled so, and
  a ranking it changes is reported with both intervals (overlapping intervals: it cannot tell).

`LearningCurves.lines(dataset)` is what the verdict prints (verdict.Verdict.sizes) and the report
repeats; `table`, `markdown` and `to_frame` are its tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medtune.data.subsets import is_full, size_label
from medtune.evaluation.evidence import Evidence, fmt_ci, fold_scores, fold_sizes, group_cells, group_table, label, \
    read_evidence, short_strategy, train_sizes_in
from medtune.evaluation.metrics import corrected_interval

N_BOOT = 2000  # as the main table: the full size's points are the table's intervals
N_DRAWS = 200  # refits of the parametric bootstrap of an extrapolation
MIN_SIZES = 4  # a three-parameter law needs one point more than it has parameters
B_BOUNDS = (0.0, 2.0)
BOUND_TOL = 0.01  # b this close to a bound is "at" it
ALPHA = 0.05
CURVE = ["dataset", "backbone", "head", "variant", "strategy"]  # a group without its size


def power_law(n, a, b, c):
    """Error at n training patients: a·n^(−b) + c (c, the error no amount of data removes)."""
    return a * np.power(np.asarray(n, dtype=float), -b) + c


def size_text(size, patients: float) -> str:
    """`25% (80 patients)`; a patient-count size is its own label."""
    if isinstance(size, float) and np.isfinite(patients):
        return f"{size_label(size)} ({patients:.0f} patients)"
    return size_label(size)


def distinguishable(interval: tuple[float, float, float]) -> bool:
    return bool(interval[1] > 0 or interval[2] < 0)


@dataclass(frozen=True)
class Crossover:
    """Whether the full size's leader `full` led all the way down, and if not, where and how surely."""
    kind: str  # "none", "noise", "crossover", or "unpaired" (the two leaders not both run at both sizes)
    full: str
    small: str = ""
    below: str = ""  # the size where `small` leads
    above: str = ""  # the smallest size from which `full` leads
    at_small: tuple[float, float, float] = (np.nan,) * 3  # full − small at `below`: (estimate, low, high)
    at_full: tuple[float, float, float] = (np.nan,) * 3  # full − small at the full size
    change: tuple[float, float, float] = (np.nan,) * 3  # at_full − at_small

    def line(self) -> str:
        if self.kind == "none":
            return f"crossover: none, {self.full} leads on the test folds at every size"
        if self.kind == "unpaired":
            return (f"crossover: not judged (on the test folds {self.small} leads at {self.below}, {self.full} "
                    f"from {self.above} on, but the two were not both run at both sizes)")
        gaps = (f"{self.full} − {self.small} {fmt_gap(self.at_small)} there, {fmt_gap(self.at_full)} at the full "
                f"size (change {fmt_gap(self.change)})")
        who = f"on the test folds {self.small} leads at {self.below}, {self.full} from {self.above} on"
        if self.kind == "crossover":
            return f"crossover between {self.below} and {self.above}: {who}; {gaps}"
        return f"crossover: the curves cross within their noise ({who}; {gaps})"


def fmt_gap(x: tuple[float, float, float]) -> str:
    return f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]"


@dataclass(frozen=True)
class Extrapolation:
    """One curve at `patients` (twice the full size's): made with its interval, or refused (`why`)."""
    curve: str
    patients: float
    estimate: float = np.nan
    low: float = np.nan
    high: float = np.nan
    params: tuple[float, ...] = ()
    rmse: float = np.nan
    why: str = ""

    @property
    def made(self) -> bool:
        return not self.why


@dataclass
class LearningCurves:
    """Every size of a store, computed once: `points` (one row per curve and size), the recommendation
    at each size, the crossover and the extrapolations per data set."""
    points: pd.DataFrame
    sizes: list
    # {ds: [(size, patients, name, depth mattered, inner-validation images a fold)]}
    recommended: dict[str, list[tuple]] = field(default_factory=dict)
    crossovers: dict[str, Crossover] = field(default_factory=dict)
    extrapolations: dict[str, list[Extrapolation]] = field(default_factory=dict)

    def of(self, dataset: str) -> pd.DataFrame:
        return self.points[self.points.dataset == dataset]

    def lines(self, dataset: str) -> list[str]:
        """Three lines: the recommendation at each size (where judged), the crossover, the extrapolation."""
        if dataset not in self.crossovers:
            return []
        recs = [recommendation_line(self.recommended[dataset])] if self.recommended.get(dataset) else []
        return recs + [self.crossovers[dataset].line(),
                       extrapolation_line(self.extrapolations.get(dataset, []), self.crossovers[dataset].full)]

    def to_frame(self) -> pd.DataFrame:
        out = self.points.copy()
        out["size_label"] = [size_text(s, n) for s, n in zip(out["size"], out.n_patients)]
        return out

    def table(self, dataset: str) -> pd.DataFrame:
        """Curve rows × size columns: balanced accuracy [95% CI]; the curve's trained share; the 2x extrapolation."""
        sub = self.of(dataset)
        patients = sub.groupby("size", sort=False).n_patients.mean()
        out = sub.pivot_table(index="curve", columns="size", values="text", aggfunc="first", sort=False)
        out = out[[s for s in self.sizes if s in out.columns]]
        out.columns = [size_text(s, patients[s]) for s in out.columns]
        share = sub.groupby("curve", sort=False).share.mean()
        out.insert(0, "trained", [f"{100 * share[c]:.3g}%" if np.isfinite(share[c]) else "–" for c in out.index])
        ex = {e.curve: e for e in self.extrapolations.get(dataset, [])}
        if ex:
            n = next(iter(ex.values())).patients
            out[f"2x, {n:.0f} patients (extrapolated)"] = [
                fmt_ci(ex[c].estimate, ex[c].low, ex[c].high) if c in ex and ex[c].made else "not made"
                for c in out.index]
        out.index.name = "curve"
        return out.fillna("–")

    def markdown(self, dataset: str) -> str:
        t = self.table(dataset)
        rows = ["| curve | " + " | ".join(t.columns) + " |", "|" + "---|" * (len(t.columns) + 1)]
        return "\n".join(rows + [f"| {i} | " + " | ".join(map(str, r)) + " |" for i, r in zip(t.index, t.values)])


# --------------------------------------------------------------------------- the points
def size_points(ev: Evidence, size, n_boot: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points of one size, its group table): per group the pooled estimate and CI, mean training
    patients, trainable share and cell seconds."""
    t = group_table(ev, n_boot)
    info = ev.metrics.cell_id.map(ev.cells.set_index("cell_id")["info"])
    m = ev.metrics.assign(
        n_patients=[i.get("n_train_patients", np.nan) if isinstance(i, dict) else np.nan for i in info],
        share=[i.get("trainable_fraction", np.nan) if isinstance(i, dict) else np.nan for i in info])
    per = m.groupby("group").agg(n_patients=("n_patients", "mean"), share=("share", "mean"),
                                 seconds=("seconds", "mean"), n_cells=("cell_id", "size"))
    out = t[[*CURVE, "group", "pooled_balanced_accuracy", "ci_low", "ci_high"]].rename(
        columns={"pooled_balanced_accuracy": "estimate"}).join(per, on="group")
    out["size"] = pd.Series([size] * len(out), index=out.index, dtype=object)
    return out.reset_index(drop=True), t


def curve_names(points: pd.DataFrame) -> list[str]:
    """A curve's name: its strategy where a data set has one backbone and head, else the group label."""
    series = points.groupby("dataset")[["backbone", "head", "variant"]].apply(lambda d: len(d.drop_duplicates()))
    return [short_strategy(r.strategy) if series[r.dataset] == 1 else label(r) for _, r in points.iterrows()]


# --------------------------------------------------------------------------- the recommendation by size
def depth_mattered(v) -> bool | None:
    """Whether a verdict's depth comparisons found a difference (Holm-adjusted p below ALPHA); None
    where it made none (one depth tried, or too few folds)."""
    if not v.comparisons or max(c.pairs for c in v.comparisons) < 3:
        return None
    return any(c.holm_p < ALPHA for c in v.comparisons)


def inner_images(ev: Evidence, group: str) -> float:
    """Mean images a fold of a group's inner-validation splits (NaN where none were stored): what a
    recommendation at that size was chosen on."""
    val = ev.extra[(ev.extra.kind == "inner_val") & ev.extra.cell_id.isin(group_cells(ev, group).cell_id)]
    per_cell = val.groupby("cell_id").size()
    return float(per_cell.mean()) if len(per_cell) else np.nan


def recommendation_line(recs: list[tuple]) -> str:
    """`learning curve: on each size's inner splits the rule recommends linear_probe at 10% (32 patients),
    25% (80 patients); full_ft at ...`: recommended, as the verdict is, never read off the test folds."""
    runs: list[tuple[str, list[str]]] = []
    for size, patients, name, *_ in recs:
        if runs and runs[-1][0] == name:
            runs[-1][1].append(size_text(size, patients))
        else:
            runs.append((name, [size_text(size, patients)]))
    said = "; ".join(f"{name} at {', '.join(where)}" for name, where in runs)
    mattered = [size_label(s) for s, _, _, d, _ in recs if d]
    compared = any(d is not None for _, _, _, d, _ in recs)
    depth = (f"; depth mattered (Holm p < {ALPHA:g}) at {', '.join(mattered)}" if mattered
             else "; no detectable difference between depths at any size" if compared else "")
    # how many images each choice rested on, smallest and full size: a choice on a handful is noise
    val = [(s, n) for s, _, _, _, n in recs if np.isfinite(n)]
    split = (f" (inner splits of {val[0][1]:.0f} images a fold at {size_label(val[0][0])}, {val[-1][1]:.0f} at "
             f"{size_label(val[-1][0])})" if len(val) >= 2 else "")
    return f"learning curve: on each size's inner splits the rule recommends {said}{split}{depth}"


# --------------------------------------------------------------------------- crossover
def crossover(pts: pd.DataFrame, evs: dict, sizes: list) -> Crossover:
    """The rule of the module's docstring, on one data set's points."""
    lead = {s: pts[pts["size"].map(lambda x, s=s: type(x) is type(s) and x == s)].sort_values(
        "estimate", ascending=False) for s in sizes}
    lead = {s: d for s, d in lead.items() if len(d) and np.isfinite(d.estimate.iloc[0])}
    order = [s for s in sizes if s in lead]
    full = lead[order[-1]].iloc[0]

    def leads(size) -> bool:  # F at the top of a size, a tie included
        d = lead[size]
        return bool((d[d.curve == full.curve].estimate >= d.estimate.iloc[0]).any())

    j = len(order) - 1
    while j > 0 and leads(order[j - 1]):
        j -= 1
    if j == 0:
        return Crossover("none", full.curve)
    below, above = order[j - 1], order[j]
    small = lead[below].iloc[0]
    where = (full.curve, small.curve, size_text(below, small.n_patients),
             size_text(above, lead[above].iloc[0].n_patients))
    mine = lead[below][lead[below].curve == full.curve]
    partner = lead[order[-1]][lead[order[-1]].curve == small.curve]
    if mine.empty or partner.empty:  # one of the two was not run at both sizes: no paired gap
        return Crossover("unpaired", *where)
    cols = [(below, mine.iloc[0].group), (below, small.group), (order[-1], full.group),
            (order[-1], partner.iloc[0].group)]
    scores = pd.concat([fold_scores(evs[s], g) for s, g in cols], axis=1, join="inner").to_numpy().T
    f_small, s_small, f_full, s_full = scores
    # one correction for every size: the full size's ratio (its folds' training sets overlap most), so
    # that at the full size the gap's interval is the depth line's and the paired-tests table's
    n_train, n_test = fold_sizes(evs[order[-1]], full.group)
    at_small = corrected_interval(f_small, s_small, n_train, n_test)
    at_full = corrected_interval(f_full, s_full, n_train, n_test)
    change = corrected_interval(f_full - s_full, f_small - s_small, n_train, n_test)
    sure = (distinguishable(at_small) or distinguishable(at_full)) and distinguishable(change)
    return Crossover("crossover" if sure else "noise", *where, at_small, at_full, change)


# --------------------------------------------------------------------------- extrapolation
def fit_power_law(n: np.ndarray, acc: np.ndarray, half: np.ndarray, p0=None) -> tuple[np.ndarray | None, float, str]:
    """(a, b, c), residual RMSE in balanced accuracy, and why the fit is refused ("" when it is not)."""
    from scipy.optimize import curve_fit

    ok = np.isfinite(n) & np.isfinite(acc) & (n > 0)
    if ok.sum() < MIN_SIZES:
        return None, np.nan, f"{ok.sum()} sizes, fewer than {MIN_SIZES} for a three-parameter law"
    n, err, half = n[ok], 1 - acc[ok], np.where(np.isfinite(half[ok]), half[ok], 0)
    sigma = np.maximum(half, 1e-3)
    first = np.argmin(n)
    guess = p0 if p0 is not None else (max(err[first] - err.min(), 1e-3) * n[first] ** 0.5, 0.5,
                                       float(np.clip(err.min() / 2, 0, 1)))
    try:
        params, _ = curve_fit(power_law, n, err, p0=guess, sigma=sigma, bounds=([0, B_BOUNDS[0], 0],
                                                                                 [np.inf, B_BOUNDS[1], 1]),
                              maxfev=20000)
    except (RuntimeError, ValueError):
        return None, np.nan, "the fit did not converge"
    rmse = float(np.sqrt(np.mean((power_law(n, *params) - err) ** 2)))
    tol = float(np.mean(half))
    if rmse > tol:
        return params, rmse, f"poor fit: residual RMSE {rmse:.3f} exceeds the points' mean CI half-width {tol:.3f}"
    if min(abs(params[1] - B_BOUNDS[0]), abs(params[1] - B_BOUNDS[1])) < BOUND_TOL:
        return params, rmse, f"exponent b at its bound ({params[1]:.2f}): no power-law decline to extend"
    return params, rmse, ""


def extrapolate(curve: str, d: pd.DataFrame, patients: float) -> Extrapolation:
    """One curve's points (its sizes) extended to `patients`, with the parametric bootstrap interval."""
    from scipy.optimize import curve_fit

    n, acc = d.n_patients.to_numpy(float), d.estimate.to_numpy(float)
    half = ((d.ci_high - d.ci_low) / 2).to_numpy(float)
    params, rmse, why = fit_power_law(n, acc, half)
    if why:
        return Extrapolation(curve, patients, rmse=rmse, why=why)
    rng = np.random.default_rng(0)
    ok = np.isfinite(n) & np.isfinite(acc) & (n > 0)
    sigma = np.maximum(np.nan_to_num(half[ok]), 1e-3)
    draws = []
    for _ in range(N_DRAWS):
        err = 1 - (acc[ok] + rng.normal(0, sigma / 1.96))
        try:
            p, _ = curve_fit(power_law, n[ok], err, p0=params, sigma=sigma,
                             bounds=([0, B_BOUNDS[0], 0], [np.inf, B_BOUNDS[1], 1]), maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        draws.append(1 - power_law(patients, *p))
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return Extrapolation(curve, patients, float(1 - power_law(patients, *params)), float(low), float(high),
                         tuple(float(x) for x in params), rmse)


def extrapolation_line(ex: list[Extrapolation], full_leader: str) -> str:
    """What the law says at twice the data, and whether it changes the full size's leader."""
    if not ex:
        return "extrapolated to 2x: not made (no curve)"
    head = f"extrapolated to 2x ({ex[0].patients:.0f} patients; a fitted power law, not a measurement)"
    made = sorted((e for e in ex if e.made), key=lambda e: -e.estimate)
    refused = [e for e in ex if not e.made]
    left = "; not made for " + "; ".join(f"{e.curve} ({e.why})" for e in refused) if refused else ""
    if not made:
        return f"{head}: not made for " + "; ".join(f"{e.curve} ({e.why})" for e in refused)
    said = ", ".join(f"{e.curve} {fmt_ci(e.estimate, e.low, e.high)}" for e in made)
    top, mine = made[0], next((e for e in made if e.curve == full_leader), None)
    if mine is None:
        verdict = f"{full_leader}, the full size's leader, not extrapolated"
    elif top.curve == full_leader:
        verdict = f"{full_leader} still leads, as at the full size"
    else:
        apart = top.low > mine.high
        verdict = (f"{top.curve} would overtake {full_leader}" + (", the intervals apart" if apart
                                                                   else ", but the intervals overlap: cannot tell"))
    return f"{head}: {said}; {verdict}{left}"


# --------------------------------------------------------------------------- everything, once
def learning_curves(source: str | Path | Evidence, n_boot: int = N_BOOT, judge=None) -> LearningCurves:
    """The learning curves of a store (a path, or the full size's Evidence, on which they are kept).
    `judge` is verdict.verdicts, (Evidence, group table, n_boot) -> {data set: Verdict}, for the
    recommendation at each size; the verdict module passes it (`verdict.learning_of`), since it prints
    these lines: the import goes one way. Without it the recommendation line is left out."""
    full_ev = source if isinstance(source, Evidence) else read_evidence(source)
    key = ("learning", n_boot, judge is not None)
    if key in full_ev.memo:
        return full_ev.memo[key]
    sizes = full_ev.sizes or train_sizes_in(full_ev.store)
    evs, frames, recs = {}, [], {}
    for size in sizes:
        ev = full_ev if is_full(size) else read_evidence(full_ev.store, size)
        pts, t = size_points(ev, size, n_boot)
        evs[size] = ev
        frames.append(pts)
        for ds, v in (judge(ev, t, n_boot) if judge else {}).items():
            patients = pts.loc[pts.group == v.group, "n_patients"]
            recs.setdefault(ds, []).append((size, float(patients.mean()) if len(patients) else np.nan,
                                            short_strategy(v.strategy) if pts[pts.dataset == ds][CURVE[1:4]]
                                            .drop_duplicates().shape[0] == 1 else v.name, depth_mattered(v),
                                            inner_images(ev, v.group)))
    points = pd.concat(frames, ignore_index=True)
    points["curve"] = curve_names(points)
    points["text"] = [fmt_ci(m, lo, hi) for m, lo, hi in zip(points.estimate, points.ci_low, points.ci_high)]
    lc = LearningCurves(points, sizes, recs)
    for ds in dict.fromkeys(points.dataset):
        pts = lc.of(ds)
        lc.crossovers[ds] = crossover(pts, evs, sizes)
        full = pts[pts["size"].map(is_full)]
        target = 2 * float(full.n_patients.mean()) if len(full) else np.nan
        lc.extrapolations[ds] = [extrapolate(c, d.sort_values("n_patients"), target)
                                 for c, d in pts.groupby("curve", sort=False)] if np.isfinite(target) else []
    full_ev.memo[key] = lc
    return lc
