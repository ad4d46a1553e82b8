"""The HTML report and its CSV/MD/TeX tables: presentation only; the numbers come from
`medtune.evaluation.evidence`, which reads the results store (and the PNGs the runner wrote beside it),
never a model."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medtune.evaluation.evidence import (GROUP, MAIN, Evidence, calibration_table, clusters, external_table, fmt_ci,  # noqa: F401
                                      efficiency_table, fold_ranks, short_strategy, group_cells, group_table,
                                      headline_row, label, main_table, operating_points, operating_table,
                                      paired_tests, pooled, positive_index, rank_blocks, grouping_text, read_evidence,
                                      subgroup_table, summary_table)
from medtune.evaluation.diagnose import budget_lines, chosen_values, head_choices
from medtune.evaluation.evidence import RISK_NOTE, near
from medtune.evaluation.headline import OPTIMISTIC
from medtune.evaluation.metrics import MAIN_METRICS, METRICS, cd_cliques, confusion, friedman, nemenyi_cd, net_benefit
from medtune.version import RESULTS_VERSION

FONT = 13  # points: readable when the page is printed

SHORT = {m.name: m.short for m in METRICS}  # the metric table's column labels


def metric_legend(of: str) -> str:
    """'acc = accuracy, bal_acc = balanced accuracy, ...' from the metric table; the one-vs-rest
    metrics share one entry, followed by `of` (whose class they describe)."""
    parts, one_vs_rest = [], [m for m in METRICS if m.needs_positive]
    for m in METRICS:
        if not m.needs_positive:
            parts.append(f"{m.short} = {m.legend}")
        elif m is one_vs_rest[0]:
            parts.append(f"{'/'.join(x.short for x in one_vs_rest)} = {'/'.join(x.legend for x in one_vs_rest)}{of}")
    return ", ".join(parts)


def pm(mean: float, sd: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if np.isnan(sd) else f"{mean:.{digits}f}±{sd:.{digits}f}"


def format_pm(table: pd.DataFrame, columns: list[str] | None = None, digits: int = 3) -> pd.DataFrame:
    """'mean±sd' strings for display, with short metric names."""
    columns = [c for c in (columns or MAIN_METRICS) if c in table.columns]
    out = table[[c for c in GROUP if c in table.columns]].copy()
    if "variant" in out.columns and not out["variant"].astype(bool).any():
        out = out.drop(columns=["variant"])
    if "strategy" in out.columns:
        out["strategy"] = out["strategy"].map(short_strategy)
    for c in columns:
        out[SHORT.get(c, c)] = [pm(m, s, digits) for m, s in zip(table[c], table[f"{c}_sd"])]
    out["cells"] = table["n_cells"]  # folds x seeds
    out["seconds"] = table["seconds"].round(1)
    return out


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT + 1, "axes.labelsize": FONT,
                         "legend.fontsize": FONT - 1, "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1})
    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def png(fig) -> str:
    """A figure as a base64 PNG data URI (the HTML stays one self-contained file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_file(fig, path: Path) -> Path:
    """A figure written as a PNG file beside results.md (which links it), closed as `png` closes it."""
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def trained_share(info: dict) -> float:
    """The share of the network's parameters a cell trained (the new head included), or NaN."""
    f = info.get("trainable_fraction")
    return float(f) if f is not None else np.nan


# the strategies that differ only in how much of the top of the chain trains, at one rate: the
# points of a depth curve. Every other strategy (LP-FT, L2-SP, Auto-RGN, LoRA, ...) is another
# method at its own share of parameters, so it is drawn as a point of its own, not joined to the curve.
DEPTH_SETTINGS = ("linear_probe", "partial_ft", "blockwise_ft", "full_ft")


def is_depth_setting(strategy: str) -> bool:
    return str(strategy).split("(", 1)[0] in DEPTH_SETTINGS


def place_labels(ax, points: list[tuple[float, float, str, str]], fontsize: float) -> None:
    """Write `(x, y, text, colour)` labels right of their points so that no label covers another or
    another point: points are taken left to right, and each label goes to the first free height of
    0, +1, -1, +2, ... lines from its point (a thin line leads back to a label moved off its point).
    Label widths are estimated from the text length. Call after the axes' limits are set."""
    if not points:
        return
    per_pt = ax.figure.dpi / 72
    xy = ax.transData.transform([(x, y) for x, y, _, _ in points])
    line, char, pad = 1.2 * fontsize * per_pt, 0.6 * fontsize * per_pt, 7 * per_pt
    placed: list[tuple[float, float, float, float]] = []

    def free(box: tuple[float, float, float, float], own: int) -> bool:
        x0, y0, x1, y1 = box
        if any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed):
            return False
        return not any(j != own and x0 - 4 < px < x1 + 4 and y0 - 4 < py < y1 + 4 for j, (px, py) in enumerate(xy))

    for i in sorted(range(len(points)), key=lambda i: (xy[i][0], -xy[i][1])):
        x, y, text, colour = points[i]
        px, py = xy[i]
        width = len(text) * char
        steps = [0] + [s * k for k in range(1, 16) for s in (1, -1)]
        boxes = [(px + pad, py + k * line - line / 2, px + pad + width, py + k * line + line / 2) for k in steps]
        k, box = next(((k, b) for k, b in zip(steps, boxes) if free(b, i)), (0, boxes[0]))
        placed.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(pad / per_pt, (k * line - line / 2) / per_pt),
                    fontsize=fontsize, color=colour, va="bottom",
                    arrowprops=({"arrowstyle": "-", "lw": 0.5, "color": colour, "shrinkA": 0, "shrinkB": 3}
                                if k else None))


def fig_depth(ev: Evidence, t: pd.DataFrame, dataset: str):
    """Balanced accuracy against the share of parameters trained (one unit for every backbone, log
    scale: a probe trains ~0.1%, full fine-tuning 100%), one colour per backbone and head. The depth
    settings (DEPTH_SETTINGS) are joined into that series' depth curve; every other strategy is a
    diamond of the same colour at its own share, not on the curve; each point is named by its
    strategy, the names spread so that none overlap (place_labels)."""
    plt = _plt()
    c = ev.cells[ev.cells.dataset == dataset].copy()
    c["share"] = c["info"].map(trained_share) * 100
    depth = c.groupby("group")["share"].median()
    sub = t[t.dataset == dataset].set_index("group")
    sub["share"] = depth
    nested = sub.strategy.astype(str).str.startswith("auto_depth")
    series = list(sub[~nested].reset_index().groupby(["backbone", "head", "variant"]))
    n_points = int((~nested).sum())
    fig, ax = plt.subplots(figsize=(9, max(4.8, 0.22 * n_points)))
    labels: list[tuple[float, float, str, str]] = []
    for i, ((bb, head, variant), g) in enumerate(series):
        colour = f"C{i % 10}"
        name = bb + ("" if head == "softmax" else f" · {head}") + (f" [{variant}]" if variant else "")
        on_curve = g.strategy.map(is_depth_setting)
        curve = g[on_curve].sort_values(["share", "strategy"])
        ax.errorbar(curve.share, curve[MAIN], yerr=curve[f"{MAIN}_sd"].fillna(0), marker="o", capsize=4,
                    label=f"{name}: depth curve", color=colour)
        others = g[~on_curve]
        if len(others):
            ax.errorbar(others.share, others[MAIN], yerr=others[f"{MAIN}_sd"].fillna(0), marker="D", ls="none",
                        capsize=4, color=colour, mfc="white", label=f"{name}: other methods")
        labels += [(r.share, r[MAIN], short_strategy(r.strategy), colour) for _, r in g.iterrows()
                   if np.isfinite(r.share) and np.isfinite(r[MAIN])]
    # the nested choice has no single depth (each outer fold picks its own): a level across the axis
    for j, (_, r) in enumerate(sub[nested].iterrows()):
        colour = f"C{(j + len(series)) % 10}"
        sd = 0 if np.isnan(r[f"{MAIN}_sd"]) else r[f"{MAIN}_sd"]
        ax.axhline(r[MAIN], ls="--", color=colour, lw=1.5,
                   label=f"{short_strategy(r.strategy)}: {r[MAIN]:.3f} (depth picked per fold)")
        ax.axhspan(r[MAIN] - sd, r[MAIN] + sd, color=colour, alpha=0.08)
    shares = sub.loc[~nested, "share"].dropna()
    if len(shares) and shares.min() > 0:
        ax.set_xscale("log")
        ax.set_xlim(shares.min() / 2, 1000)  # room right of 100% for the labels of the full-network methods
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        narrow = shares.max() / shares.min() < 10  # less than a decade: 1-2-5 ticks, else decades
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if narrow else (1.0,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%" if v <= 100 else ""))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters trained (% of the network, the new head included; log scale)")
    ax.set_ylabel("balanced accuracy (mean ± sd over folds)")
    ax.set_title(f"{dataset}: how deep to fine-tune")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=FONT - 3)
    place_labels(ax, labels, FONT - 4)
    return fig


def fig_roc(y: np.ndarray, p: np.ndarray, class_names: list[str], positive: str | None, title: str):
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = [class_names.index(positive)] if positive in class_names and len(class_names) == 2 else (
        [1] if len(class_names) == 2 else range(len(class_names)))
    for c in classes:
        t = y == c
        if t.all() or not t.any():
            continue
        fpr, tpr, _ = roc_curve(t, p[:, c])
        ax.plot(fpr, tpr, lw=2, label=f"{class_names[c]} vs rest (AUC {roc_auc_score(t, p[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.set_aspect("equal")
    return fig


def fig_confusion(y: np.ndarray, p: np.ndarray, class_names: list[str], title: str):
    plt = _plt()
    cm = confusion(y, p, len(class_names))
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, f"{cm[i, j]}\n({frac[i, j]:.0%})", ha="center", va="center", fontsize=FONT,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return fig


def fig_cd(ranks: dict[str, float], cd: float, title: str):
    """Critical-difference diagram (Demšar 2006): average ranks on an axis, best on the left; methods
    whose ranks differ by less than CD are joined by a thick grey bar (not significantly different)."""
    plt = _plt()
    names = sorted(ranks, key=ranks.get)
    k = len(names)
    lo, hi = 1, max(k, 2)
    half = (k + 1) // 2
    step = 0.55
    rows = max(half, k - half)
    fig, ax = plt.subplots(figsize=(11, 1.8 + 0.5 * rows))
    ax.set_xlim(lo, hi)
    ax.set_ylim(-(rows + 1) * step, 1.2)
    ax.axis("off")
    ax.hlines(0, lo, hi, color="black", lw=1.5)
    for r in range(lo, hi + 1):
        ax.vlines(r, 0, 0.12, color="black")
        ax.text(r, 0.18, str(r), ha="center", va="bottom")
    ax.hlines(0.85, lo, lo + cd, color="crimson", lw=3)
    ax.vlines([lo, lo + cd], 0.78, 0.92, color="crimson", lw=2)
    ax.text(lo + cd + 0.05, 0.85, f"critical difference CD = {cd:.2f}", ha="left", va="center", color="crimson")
    for i, n in enumerate(names):
        r = ranks[n]
        left = i < half
        y = -(i + 1) * step if left else -(k - i) * step
        x_end = lo - 0.05 if left else hi + 0.05
        ax.plot([r, r, x_end], [0, y, y], color="black", lw=1, clip_on=False)
        ax.text(x_end + (-0.04 if left else 0.04), y, f"{n}  ({r:.2f})", ha="right" if left else "left",
                va="center")
    for n_c, (a, b) in enumerate(cd_cliques([ranks[n] for n in names], cd)):
        y = -0.22 - 0.14 * n_c
        ax.hlines(y, ranks[names[a]] - 0.03, ranks[names[b]] + 0.03, color="dimgrey", lw=5)
    ax.set_title(title, pad=4)
    return fig


def fig_curves(ev: Evidence, group: str, title: str):
    plt = _plt()
    sel = group_cells(ev, group)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (_, r) in enumerate(sel.iterrows()):
        h = r["info"].get("history") or []
        if not h:
            continue
        ep = [e["epoch"] + 1 for e in h]
        colour = f"C{i % 10}"
        # the nested choice trains a different strategy per fold
        picked = (r["info"].get("auto_depth") or {}).get("picked")
        name = (f"fold {r.fold}" + (f" ({picked})" if picked else "")
                + ("" if r.seed == sel.seed.min() else f" seed {r.seed}"))
        ax.plot(ep, [e["train_loss"] for e in h], color=colour, marker="o", label=f"{name} train")
        val = [e["val_loss"] for e in h]
        if not all(v is None or np.isnan(v) for v in val):
            ax.plot(ep, val, color=colour, marker="s", ls="--", label=f"{name} validation")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: inside, it hid the later folds' curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


MAX_CURVES = 6  # more overlaid curves than this read as one tangle, with colours repeating


def colours(t: pd.DataFrame, dataset: str) -> dict[str, str]:
    """One colour per group of a data set, in the table's order: the calibration, decision-curve and
    cost plots draw a group in the same colour."""
    return {g: f"C{i % 10}" for i, g in enumerate(t[t.dataset == dataset].group)}


def curve_rows(sub: pd.DataFrame) -> pd.DataFrame:
    """The groups one data set's overlaid curves show: all of them in a small grid, else the headline and
    the best mean on the test folds (the decision curve's pair); the tables beside keep every group."""
    if len(sub) <= MAX_CURVES:
        return sub
    return sub[sub.headline | sub.best_on_test_folds]


def fig_reliability(ev: Evidence, t: pd.DataFrame, dataset: str, n_bins: int = 10):
    """Reliability diagram (scikit-learn's calibration_curve, equal-mass bins) of the pooled out-of-fold
    predictions of `curve_rows`' groups; the bars are 95% Wilson intervals of the observed frequency per bin."""
    from sklearn.calibration import calibration_curve

    plt = _plt()
    pos = positive_index(ev, dataset)
    colour = colours(t, dataset)
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for _, r in curve_rows(t[t.dataset == dataset]).iterrows():
        y, p, _ = pooled(ev, r.group, risk=True)
        if not len(y):
            continue
        event, prob = ((y == pos), p[:, pos]) if pos is not None else ((p.argmax(1) == y), p.max(1))
        frac, mean_p = calibration_curve(event, prob, n_bins=n_bins, strategy="quantile")
        n_b = len(y) / len(frac)
        z = 1.96
        centre = (frac + z * z / (2 * n_b)) / (1 + z * z / n_b)
        half = z * np.sqrt(frac * (1 - frac) / n_b + z * z / (4 * n_b * n_b)) / (1 + z * z / n_b)
        ax.errorbar(mean_p, frac, yerr=[np.maximum(frac - (centre - half), 0), np.maximum(centre + half - frac, 0)],
                    marker="o", ms=4, capsize=2, lw=1.5 if not r.headline else 3, color=colour[r.group],
                    label=("★ " if r.headline else "") + ("† " if r.best_on_test_folds else "") + label(r))
    what = f"P({ev.class_names(dataset)[pos]})" if pos is not None else "top-label confidence"
    ax.set_xlabel(f"predicted {what} (bin mean)")
    ax.set_ylabel("observed frequency (95% Wilson interval)")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(f"{dataset}: calibration ({n_bins} equal-mass bins)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=FONT - 3)  # below: never over the data
    ax.grid(alpha=0.3)
    return fig


def fig_decision(ev: Evidence, rows: list, dataset: str, colour: dict[str, str]):
    """Decision curve (net benefit against threshold probability, as dcurves defines it) of the given
    groups' pooled out-of-fold predictions at the training prevalence (RISK_NOTE: equal-prior
    probabilities would be read as risks they are not), with treat-all and treat-none; `colour`: the
    data set's group colours (`colours`)."""
    plt = _plt()
    pos = positive_index(ev, dataset)
    pt = np.arange(0.01, 1.0, 0.01)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    prev = None
    for i, r in enumerate(rows):
        y, p, _ = pooled(ev, r.group, risk=True)
        model, all_ = net_benefit(y == pos, p[:, pos], pt)
        prev = (y == pos).mean()
        ax.plot(pt, model, lw=2.5 if r.headline else 1.5, color=colour[r.group],
                label=("★ " if r.headline else "") + label(r))
    if prev is not None:
        ax.plot(pt, all_, color="dimgrey", ls="--", label="treat all")
        ax.axhline(0, color="black", lw=1, label="treat none")
        ax.set_ylim(min(-0.05, -0.2 * prev), max(prev * 1.15, 0.05))
    ax.set_xlabel(f"threshold probability of {ev.class_names(dataset)[pos]}")
    ax.set_ylabel("net benefit")
    ax.set_title(f"{dataset}: decision curve (pooled out-of-fold)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=FONT - 3, ncol=2)
    return fig


def fig_cost(t: pd.DataFrame, dataset: str):
    """The trade-off of depth: pooled balanced accuracy [95% CI] against training seconds per fold."""
    plt = _plt()
    sub = t[t.dataset == dataset]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    secs = sub.seconds / sub.n_cells
    points = []
    colour = colours(t, dataset)
    for _, r in sub.iterrows():
        x = r.seconds / r.n_cells
        ax.errorbar([x], [r.pooled_balanced_accuracy], yerr=[[r.pooled_balanced_accuracy - r.ci_low],
                                                              [r.ci_high - r.pooled_balanced_accuracy]],
                    marker="*" if r.headline else "o", ms=14 if r.headline else 7, capsize=4, color=colour[r.group])
        points.append((x, r.pooled_balanced_accuracy, label(r).split(" · ", 1)[-1], colour[r.group]))
    if (secs > 0).all() and secs.max() / max(secs.min(), 1e-9) > 20:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # plain numbers at 1, 2, 5 x 10^k; unlabelled minor ticks (they overlapped)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training seconds per fold (mean over cells)")
    ax.set_ylabel("balanced accuracy, pooled out-of-fold [95% CI]")
    ax.set_title(f"{dataset}: accuracy against training cost (★ = headline)")
    ax.grid(alpha=0.3)
    if (secs > 0).all():
        ax.set_xlim(right=ax.get_xlim()[1] * (3 if ax.get_xscale() == "log" else 1.25))  # room for the last labels
    place_labels(ax, points, FONT - 4)
    return fig


# --------------------------------------------------------------------------- tables as text
def to_markdown(df: pd.DataFrame, index_name: str = "", digits: int = 3) -> str:
    """A Markdown table; floats to `digits` decimals, as the HTML tables show them."""
    def cell(v) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) and np.isfinite(v) else str(v)

    cols = [index_name] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i)] + [cell(v) for v in row]) + " |" for i, row in zip(df.index, df.values)]
    return "\n".join(lines)


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("★", r"$\star$"), ("–", "--"), ("·", r"$\cdot$")):
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame, caption: str, index_name: str = "") -> str:
    cols = [index_name] + [str(c) for c in df.columns]
    body = [" & ".join(_tex(str(v)) for v in [i, *row]) + r" \\" for i, row in zip(df.index, df.values)]
    return "\n".join([r"\begin{table}[ht]", r"\centering", rf"\caption{{{_tex(caption)}}}",
                      r"\begin{tabular}{l" + "l" * len(df.columns) + "}", r"\hline",
                      " & ".join(_tex(c) for c in cols) + r" \\", r"\hline", *body, r"\hline", r"\end{tabular}",
                      r"\end{table}", ""])


# --------------------------------------------------------------------------- HTML
CSS = """
body { font-family: Helvetica, Arial, sans-serif; font-size: 15px; max-width: 1250px; margin: 2em auto; color: #111; }
h1 { font-size: 26px; } h2 { font-size: 21px; border-bottom: 2px solid #ccc; margin-top: 2em; } h3 { font-size: 17px; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; display: block; \
max-width: 100%; overflow-x: auto; } td, th { border: 1px solid #bbb; padding: 3px 5px; text-align: left; }
th { background: #eef; } td.best { font-weight: bold; background: #fff4c2; }
img { max-width: 100%; } .row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 14px; color: #333; max-width: 260px; }
.gallery img { width: 200px; height: 200px; image-rendering: pixelated; border: 3px solid #2a7; }
.gallery figure.wrong img { border-color: #c33; }
pre { font-size: 13px; background: #f6f6f6; padding: 8px; white-space: pre-wrap; word-break: break-all; }
.note { color: #444; }
@media print { h2 { page-break-before: always; } figure, table { page-break-inside: avoid; } }
"""


def html_table(df: pd.DataFrame, index_name: str | None = None, digits: int = 3) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "–" if np.isnan(v) else (f"{v:.2g}" if abs(v) < 10 ** -digits and v != 0 else f"{v:.{digits}f}")
        return html.escape(str(v))

    head = ([index_name] if index_name is not None else []) + [str(c) for c in df.columns]
    rows = []
    for i, row in zip(df.index, df.astype(object).values):
        cells = [f"<th>{html.escape(str(i))}</th>"] if index_name is not None else []
        for v in row:
            best = isinstance(v, str) and v.startswith("★")
            cells.append(f"<td{' class=best' if best else ''}>{fmt(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows)
            + "</table>")


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def gallery_html(model_dir: Path) -> str:
    entries = json.loads((model_dir / "gallery" / "gallery.json").read_text())
    meta = json.loads((model_dir / "model.json").read_text())
    figs = []
    for e in entries:
        data = base64.b64encode((model_dir / "gallery" / e["file"]).read_bytes()).decode()
        cap = (f"{'✔ correct' if e['kind'] == 'correct' else '✘ wrong'}: true <b>{html.escape(e['true'])}</b>, "
               f"predicted <b>{html.escape(e['predicted'])}</b> ({e['confidence']:.0%})<br>"
               f"<span class=note>{html.escape(Path(e['path']).name)}</span>")
        figs.append(f'<figure class="{e["kind"]}"><img src="data:image/png;base64,{data}" '
                    f'alt="Grad-CAM {html.escape(e["file"])}"><figcaption>{cap}</figcaption></figure>')
    return (f"<p class=note>Model: {html.escape(meta['backbone'])} · {html.escape(meta['strategy'])} · "
            f"{html.escape(meta['head'])}, fold {meta['fold']} of {meta['n_folds']} (its test-fold images). "
            "Grad-CAM for the predicted class: red = regions that raised that class's score most. "
            "Green frame = correct, red frame = wrong; per class the most confident cases.</p>"
            f"<div class='row gallery'>{''.join(figs)}</div>")


def best_models(store: Path) -> dict[str, Path]:
    from medtune.deploy.bundle import models_dir

    out = {}
    for f in sorted(models_dir(store).glob("*/model.json")):
        out[json.loads(f.read_text())["dataset"]] = f.parent
    return out


def patient_note(ev: Evidence, dataset: str) -> str:
    """Where the fold grouping came from, from the resolved config: without patient ids, images of
    one patient can sit in train and test at once, and every metric is then optimistic."""
    for cfg in ev.runs.config_json.map(json.loads):
        for d in cfg.get("datasets", []):
            name = d.get("name") or (Path(d["path"]).name if d.get("path") else d.get("source"))
            if name != dataset:
                continue
            if d.get("group_pattern"):
                return ("Folds grouped by patient id (file-name pattern "
                        f"<code>{html.escape(d['group_pattern'])}</code>).")
            if d.get("source") == "synthetic":
                return "Folds grouped by (generated) patient id."
            manifest = str(d.get("path", "")).lower().endswith(".csv")
            has_ids = ev.info(dataset).get("patient_ids")
            if manifest and has_ids is not False:  # older stores do not say: the column, where it exists
                return ("Folds grouped by patient id (the manifest's patient_id column, or the DICOM headers)."
                        if has_ids else
                        "Folds grouped by the manifest's patient_id column where it has one.")
            if has_ids:  # neither pattern nor manifest: the DICOM headers
                return "Folds grouped by patient id (from the DICOM headers)."
            missing = ("no <code>patient_id</code> column in the manifest" if manifest else
                       "no <code>group_pattern</code>")
            return (f"<b>No patient ids were given</b> ({missing}): images of one patient may "
                    "be in both training and test folds, which makes every figure here optimistic. Only "
                    + ("near-duplicate groups are" if near(ev.info(dataset).get("duplicates") or {}) else
                       "identical images are") + " kept together (see Duplicates and leakage).")
    return ""


def cd_section(wide: pd.DataFrame, what: str, where: str) -> str:
    """Friedman test and the Nemenyi critical-difference diagram, or a sentence saying why not."""
    k, n = wide.shape[1], wide.shape[0]
    head = f"<h3>Ranking of all compared models ({html.escape(where)}, {what})</h3>"
    if k < 3 or n < 2:
        return head + (f"<p class=note>The Friedman test needs at least 3 models and 2 blocks; here {k} models "
                       f"and {n} blocks, so no critical-difference diagram.</p>")
    chi2, p, ranks = friedman(wide.to_numpy())
    cd = nemenyi_cd(k, n)
    fig = fig_cd(dict(zip(wide.columns, ranks)), cd, f"Average rank (1 = best) over {n} {what.split('= ')[1]}")
    return (head + f"<p>Friedman χ² = {chi2:.2f}, p = {p:.3g}. Nemenyi critical difference at α = 0.05: "
            f"CD = {cd:.2f}; models joined by a grey bar are not significantly different.</p>"
            + img(png(fig), f"critical difference diagram {where}"))


# --------------------------------------------------------------------------- the page
TRAIN_SHOWN = ("epochs", "batch_size", "lr", "weight_decay", "patience", "val_fraction", "class_weight",
               "bn_statistics", "amp")


def tripod_appendix(ev: Evidence, vs: dict | None = None) -> pd.DataFrame:
    """TRIPOD+AI / CLAIM items this run can fill from its configuration and data record, and what
    the user must still state (the store cannot know eligibility, reference standard or ethics).
    `vs`: the verdicts (verdict.verdicts), whose lines state the recommendation and how it was chosen."""
    cfg, env = ev.config, (json.loads(ev.runs.env_json.iloc[-1]) if len(ev.runs) else {})
    ds = [d for d in ev.datasets.itertuples() if not str(d.info.get("role", "train")).startswith("external")]
    ext = [d for d in ev.datasets.itertuples() if str(d.info.get("role", "")).startswith("external")]
    data = "; ".join(f"{d.dataset}: {d.info.get('n', '?')} images, {d.info.get('class_counts', {})}, "
                     f"{grouping_text(d.info)}, duplicates "
                     f"{d.info.get('duplicates', {}).get('policy', '?')}" for d in ds)
    cv = cfg.get("cv", "kfold")
    validation = (f"{'leave-one-site-out' if cv == 'by_site' else str(cfg.get('folds', '?')) + '-fold stratified'} "
                  f"cross-validation, grouped by patient where ids exist, seeds {cfg.get('seeds')}; "
                  + (f"external test set(s) {', '.join(d.dataset for d in ext)} predicted without refitting"
                     if ext else "no external test set"))
    strategies = ", ".join(dict.fromkeys(ev.metrics.strategy))
    backbones = ", ".join(f"{b.get('name')} ({'pretrained' if b.get('pretrained', True) else 'random init'}"
                          f"{', ' + str(b['image_size']) + ' px' if b.get('image_size') else ''})"
                          for b in cfg.get("backbones", []))
    ops = ", ".join(f"{k} ≥ {v}" for p in cfg.get("operating_points", []) for k, v in p.items()) or "none declared"
    from medtune.evaluation.verdict import verdicts

    vs = verdicts(ev) if vs is None else vs
    headline_rule = " ".join(" ".join(line.strip() for line in v.lines()) for v in vs.values())
    if any(v.evaluation.startswith("a held-out") for v in vs.values()):
        validation = "; ".join(f"{v.dataset}: {v.evaluation}" for v in vs.values()) + validation[validation.index(";"):]
    rows = [
        ("Data source and participants (TRIPOD 5, 6; CLAIM 7-9)", data,
         "Where and when the images were acquired, eligibility criteria, how patients were selected."),
        ("Outcome / reference standard (TRIPOD 7; CLAIM 14-17)", f"class labels as given by the data set; positive "
         f"class {', '.join(str(d.info.get('positive')) for d in ds)}", "How labels were established (biopsy, "
         "reader consensus), by whom, blinded to what."),
        ("Sample size (TRIPOD 8; CLAIM 19)", data, "Why this sample size suffices for the intended use."),
        ("Missing data (TRIPOD 9)", "images that fail to decode are refused with an error; none are imputed",
         "Images excluded before the manifest was written, and why."),
        ("Model (TRIPOD 10; CLAIM 22-24)", f"backbones {backbones}; fine-tuning strategies {strategies}; heads "
         f"{cfg.get('heads')}; training "
         + ", ".join(f"{k} {v}" for k, v in (cfg.get("train") or {}).items() if k in TRAIN_SHOWN), "—"),
        ("Model selection (TRIPOD 10d; CLAIM 26)", "epochs by early stopping on an inner validation split; depth "
         "by auto_depth's inner folds where used; operating points on inner validation splits; no choice uses a "
         f"test fold. Recommendation, by the rule `recommend: {cfg.get('recommend') or 'leader'}` fixed before the "
         f"run: {headline_rule}", "—"),
        ("Validation (TRIPOD 10e, 12; CLAIM 29-32)", validation, "Whether the external set is a different site, "
         "time period or device, and how it differs (case mix, prevalence)."),
        ("Performance measures (TRIPOD 10d, 16; CLAIM 28, 37)", "balanced accuracy, sensitivity, specificity, PPV, "
         "NPV, AUC, PR-AUC, Brier score, ECE; 95% patient-level bootstrap CIs of pooled out-of-fold predictions; "
         f"operating points: {ops}; decision curves", "The clinically required operating point and its rationale."),
        ("Fairness / subgroups (TRIPOD+AI 14; CLAIM 38)", ", ".join(cfg.get("subgroups", [])) or "no subgroup "
         "columns declared", "Which subgroups matter for the intended population."),
        ("Software and reproducibility (TRIPOD 18; CLAIM 42)", f"medtune {env.get('medtune')}, results version "
         f"{RESULTS_VERSION}{' (the store also holds older cells)' if ev.version_note else ''}, git "
         f"{env.get('git_commit')}, torch {env.get('torch')}, timm {env.get('timm')}, device {env.get('device')}; "
         "resolved configuration below", "Where code, weights and data can be obtained."),
        ("Ethics, funding, conflicts (TRIPOD 19, 22; CLAIM 44)", "—", "Approval, consent waiver, funding, conflicts."),
    ]
    return pd.DataFrame(rows, columns=["item", "what this run did (from the store)", "you must still state"]
                        ).set_index("item")


def verdict_html(v, t: pd.DataFrame) -> str:
    """The report's first box: the verdict's own lines (evaluation/verdict.py), then the optimistic view it is not."""
    lines = v.lines()
    text = (f"<div class=headline><p><b>{html.escape(lines[0])}</b></p>"
            + "".join(f"<p class={'warn' if line.strip().startswith('caveat:') else 'line'}>"
                      f"{html.escape(line.strip())}</p>" for line in lines[1:]))
    best = t[(t.dataset == v.dataset) & t.best_on_test_folds]
    if v.how != OPTIMISTIC and len(best) and best.iloc[0].group != v.group:
        b = best.iloc[0]
        text += (f"<p class=note>Optimistic view (not the answer): the best mean on the test folds is "
                 f"{html.escape(label(b))}, {b[MAIN]:.3f}; selecting it on the folds that score it inflates "
                 "that figure.</p>")
    return text + "</div>"


CSS_EXTRA = """
div.headline { font-size: 16px; background: #f3f8ff; border-left: 5px solid #36c; padding: 8px 12px; }
div.headline p { margin: 0.25em 0; } div.headline p.warn { font-weight: normal; }
.warn { color: #b00; font-weight: bold; } div.banner { background: #fff0f0; border: 2px solid #c33; padding: 8px 12px; }
"""


@dataclass(frozen=True, eq=False)
class Page:
    """What every section of the page reads: the store's evidence, its group table `t`, the verdicts
    `vs`, the bootstrap size of the secondary tables (`small`) and the saved models. The sections also
    add to the text files written beside report.html: `md` (results.md after its heading), `tex`
    (results.tex) and `subgroups` (subgroups.csv); they do so in page order, so each file keeps it."""
    ev: Evidence
    t: pd.DataFrame
    vs: dict
    small: int
    models: dict[str, Path]
    md: list[str] = field(default_factory=list)
    tex: list[str] = field(default_factory=list)
    subgroups: list[pd.DataFrame] = field(default_factory=list)
    n_boot: int = 2000  # the main table's bootstrap (the learning curves' points use it too)
    out: Path | None = None  # where report.html is written: figures that results.md links go beside it


@dataclass(frozen=True, eq=False)
class Data:
    """One data set's part of the page: its classes and record, its rows of the group table (`sub`),
    the headline row and its cells."""
    name: str
    class_names: list[str]
    info: dict
    positive: str | None
    sub: pd.DataFrame
    head: pd.Series
    cells: pd.DataFrame


def data_of(pg: Page, ds: str) -> Data:
    info = pg.ev.info(ds)
    return Data(ds, pg.ev.class_names(ds), info, info.get("positive"), pg.t[pg.t.dataset == ds],
                headline_row(pg.t, ds), pg.ev.cells[pg.ev.cells.dataset == ds])


# --------------------------------------------------------------------------- sections: the page's top
def section_title(pg: Page) -> str:
    title = f"<h1>medtune report: {html.escape(pg.ev.store.name)}</h1>"
    if pg.ev.version_note:
        title += f"<div class=banner><b>Mixed or old results:</b> {html.escape(pg.ev.version_note)}</div>"
    return title


def section_reading(pg: Page) -> str:
    """How to read the page: what a row and the marks are, before any number."""
    return (
        "<p>Each cell of the grid (data set × backbone × strategy × head × fold) was trained and tested under "
        "cross-validation, grouped by patient where the data set gives patient ids; every number and figure "
        "below is computed from the stored predictions. A row is one complete configuration (everything but "
        "fold and seed). <b>Main metric: balanced accuracy</b> (mean recall over classes, chance = 1/number of "
        "classes). Main tables: the pooled out-of-fold estimate with its 95% bootstrap CI, resampling patients "
        "(not images). ★ marks the recommendation (the verdict in the blue box), chosen without the test folds; "
        "† marks the best mean on the test folds, an optimistic view.</p>")


# --------------------------------------------------------------------------- sections: one data set
def section_dataset(pg: Page, d: Data) -> str:
    positive = (f"; positive class for sensitivity/specificity/PPV/NPV: <b>{html.escape(d.positive)}</b>"
                if d.positive else "")
    classes = html.escape(str(d.info.get("class_counts", d.class_names)))
    return (f"<h2>{html.escape(d.name)}</h2>"
            f"<p>{int(d.info.get('n', 0))} images, classes {classes}{positive}."
            f" {patient_note(pg.ev, d.name)} Evaluation: {html.escape(pg.vs[d.name].evaluation)}.</p>")


def section_verdict(pg: Page, d: Data) -> str:
    return verdict_html(pg.vs[d.name], pg.t)


def section_main_table(pg: Page, d: Data) -> str:
    table = main_table(pg.t, d.name)
    pg.md.extend([f"## {d.name}\n", to_markdown(table, "strategy"), ""])
    pg.tex.append(to_latex(table, f"{d.name}: balanced accuracy, pooled out-of-fold [95% patient-bootstrap CI]; "
                           "star = headline, dagger = best on test folds", "strategy"))
    return ("<h3>Balanced accuracy: strategy × backbone (pooled out-of-fold [95% patient-bootstrap CI])</h3>"
            + html_table(table, "strategy"))


def section_racing(pg: Page, d: Data) -> str:
    stopped = d.sub[d.sub.pruned != ""]
    if not len(stopped):
        return ""
    pg.md.extend(["### Stopped early by racing\n", *[f"- {label(r)}: {r.pruned}" for _, r in stopped.iterrows()], ""])
    return ("<h3>Racing: candidates stopped early</h3><p class=note>Under <code>racing:</code> the grid ran "
            "fold by fold and stopped each candidate below that its inner validation splits (never a test "
            "fold) showed to be worse than the leader by more than the margin; its rows above average only "
            "the folds it ran, and it is never the † row.</p><ul>"
            + "".join(f"<li><b>{html.escape(label(r))}</b> ({int(r.n_cells)} cell(s)): "
                      f"{html.escape(r.pruned)}</li>" for _, r in stopped.iterrows()) + "</ul>")


def section_efficiency(pg: Page, d: Data) -> str:
    eff = efficiency_table(pg.ev, pg.t, d.name)
    if eff.empty:
        return ""
    pg.md.extend(["### Trainable parameters and share of full fine-tuning\n", to_markdown(eff, "strategy"), ""])
    return ("<h3>What each strategy trains, and what it keeps of full fine-tuning</h3>"
            "<p class=note>Trainable params: the share of the network's parameters that received a "
            "gradient (the new head included; for LoRA and SSF the adapter's own tensors, merged into the "
            "weights after training). AUC and balanced accuracy: mean over folds, and as a share of "
            "full_ft's on the same backbone and head.</p>" + html_table(eff, "strategy"))


def section_collapsed(pg: Page, d: Data) -> str:
    from medtune.evaluation.verdict import collapse_lines

    collapsed = collapse_lines(pg.ev, d.name)  # evaluation/diagnose.py's rule applied to the stored predictions
    if not collapsed:
        return ""
    return ("<h3 class=warn>Collapsed cells: one class predicted, or predictions far from the class "
            "mix</h3><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in collapsed) + "</ul>")


def section_chosen(pg: Page, d: Data) -> str:
    """evaluation/diagnose.py: `{choose: [...]}` picks and the heads' own C / k, all made on inner splits."""
    from medtune.evaluation.verdict import pinned_lines

    chosen = pd.concat([t_ for t_ in (chosen_values(d.cells), head_choices(d.cells)) if not t_.empty]
                       or [chosen_values(d.cells)], ignore_index=True)
    if chosen.empty:
        return ""
    shown = chosen.drop(columns=["dataset", "try"] + (["backbone"] if chosen.backbone.nunique() == 1 else []))
    edges = pinned_lines(pg.ev, d.name)
    pg.md.extend(["### Hyperparameters chosen on inner splits\n", to_markdown(shown.set_index("strategy"), "strategy"),
                  "", *[f"- {line}" for line in edges], ""])
    return ("<h3>Hyperparameters chosen on inner splits</h3><p class=note>For each outer fold, every "
            "candidate of a <code>{choose: [...]}</code> was trained on the fold's fit part and scored "
            "on its inner validation part; the value picked there is listed per fold (the test fold "
            "took no part). <i>pinned</i>: the pick sat at the same end of its list in at least 80% of the "
            "folds, so the best value may lie outside the list: the row then measured the list, not the "
            "method.</p>"
            + html_table(shown.set_index("strategy"), "strategy")
            + ("<ul class=warn>" + "".join(f"<li>{html.escape(line)}</li>" for line in edges) + "</ul>"
               if edges else ""))


def section_budget(pg: Page, d: Data) -> str:
    budget = budget_lines(d.cells)
    if not budget:
        return ""
    pg.md.extend(["### Budget-limited strategies\n", *[f"- {line}" for line in budget], ""])
    return ("<h3 class=warn>Budget-limited strategies</h3><p class=note>The best epoch on the inner "
            "validation split was the last one in at least 80% of the folds: the model was still "
            "improving when the epochs ran out, so more epochs might change the ranking.</p><ul class=warn>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in budget) + "</ul>")


def section_metrics(pg: Page, d: Data) -> str:
    ev = pg.ev
    of = f" ({d.positive})" if d.positive else " (macro mean over classes)"
    detail = format_pm(d.sub.reset_index(drop=True))
    detail["seconds"] = detail["seconds"].round().astype(int)
    undefined = [c for c in ("ppv_undefined", "npv_undefined") if c in ev.metrics.columns]
    flag = ""
    if undefined and (ev.metrics[ev.metrics.dataset == d.name][undefined].fillna(0).to_numpy() > 0).any():
        flag = (" <span class=warn>Some folds have classes never predicted (PPV undefined) or always predicted "
                "(NPV undefined); they count as 0 in the macro means, as scikit-learn's zero_division=0.</span>")
    return ("<h3>All clinical metrics (mean ± sd over folds)</h3>"
            "<p class=note>Estimator: the mean over folds (and seeds), ± its sd (spread, not a CI). "
            f"{html.escape(metric_legend(of))}, "
            f"cells = folds × seeds averaged, seconds = training time. Brier, ECE and PR-AUC score "
            f"probabilities at the training prevalence (see Calibration).{flag}</p>"
            + html_table(detail.drop(columns=["dataset"])))


def section_paired_tests(pg: Page, d: Data) -> str:
    tests = paired_tests(pg.ev, pg.t, d.name)
    if tests.empty:
        return ""
    return ("<h3>Is the headline different from the others? Paired tests on the same folds</h3>"
            "<p class=note>Corrected resampled t-test (Nadeau &amp; Bengio 2003: variance × (1/k + "
            "n<sub>test</sub>/n<sub>train</sub>), because folds share training data) and Wilcoxon "
            "signed-rank test, each with Holm-adjusted p-values over this family of "
            f"{len(tests)} comparison(s). With few folds the Wilcoxon test cannot reach p &lt; 0.05.</p>"
            + html_table(tests.drop(columns=["group"]).set_index("compared with"), "compared with"))


def section_ranks(pg: Page, d: Data) -> str:
    ranks = fold_ranks(pg.ev, d.name)
    if len(ranks) < 2:
        return ""
    return ("<h3>Mean rank over folds (descriptive)</h3><p class=note>Descriptive only: the folds of one "
            "data set share training data and are not independent blocks, so no Friedman/Nemenyi test "
            "is run here (it is, across data sets, when the store has several).</p>"
            + html_table(ranks, "group"))


def section_depth(pg: Page, d: Data) -> str:
    return "<h3>Depth of fine-tuning</h3>" + img(png(fig_depth(pg.ev, pg.t, d.name)), f"depth plot {d.name}")


def section_learning_curves(pg: Page, d: Data) -> str:
    """evaluation/learning.py, where the store holds more than one training-set size: the figure, the
    table and the verdict's own curve lines; "" for a store of one size."""
    from medtune.evaluation.evidence import train_sizes_in
    from medtune.evaluation.verdict import learning_of
    from medtune.report.learning_plot import curve_figure

    if len(train_sizes_in(pg.ev.store)) < 2:
        return ""
    lc = learning_of(pg.ev, pg.n_boot)  # kept on the evidence: the verdict's lines are these
    if d.name not in lc.crossovers:
        return ""
    lines, table = lc.lines(d.name), lc.table(d.name)
    pg.md.extend(["### Learning curves\n", lc.markdown(d.name), "", *[f"- {line}" for line in lines], ""])
    if pg.out is not None:
        name = f"learning_curves_{''.join(ch if ch.isalnum() else '_' for ch in d.name)}.png"
        png_file(curve_figure(lc, d.name, _plt()), pg.out / name)
        pg.md.extend([f"![learning curves of {d.name}]({name})", ""])
    return ("<h3>Learning curves: would more data change the answer?</h3><p class=note>Every cell was also run on "
            "part of its outer training fold: nested subsets (a smaller size lies inside a larger one), "
            "stratified by class and patient-intact, scored on the same outer test folds as the full size, so the "
            "sizes differ only in how much the model trained on. x: training patients per fold (mean over folds); "
            "y: pooled out-of-fold balanced accuracy with its 95% patient-bootstrap CI, at the full size the main "
            "table's figure. A crossover is claimed only where the leader on the test folds changes, the gap "
            "between the two leaders (paired over the folds, with the depth comparisons' interval) excludes 0 on "
            "one side, and its change between the sizes excludes 0 too. What the rule recommends at each size is "
            "chosen on that size's inner splits, as the verdict is. The point at 2x is "
            "an inverse power law fitted to the curve: <b>an extrapolation is a model, not a measurement</b>, made "
            "only where the law follows the points within their intervals; the bottom panel is what each size "
            "cost.</p>" + img(png(curve_figure(lc, d.name, _plt())), f"learning curves {d.name}")
            + html_table(table, "curve")
            + "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")


def section_cost(pg: Page, d: Data) -> str:
    return "<h3>Accuracy against training cost</h3>" + img(png(fig_cost(pg.t, d.name)), f"cost plot {d.name}")


def section_calibration(pg: Page, d: Data) -> str:
    cal = calibration_table(pg.ev, pg.t, d.name, pg.small)
    if cal.empty:
        return ""
    of = d.positive or (d.class_names[1] if len(d.class_names) == 2 else "top label")
    shown = (f"The diagram shows the headline (★) and the best mean on the test folds (†); the table holds "
             f"all {len(d.sub)} groups." if len(curve_rows(d.sub)) < len(d.sub) else "")
    return ("<h3>Calibration and PR-AUC (pooled out-of-fold [95% patient-bootstrap CI])</h3>"
            f"<p class=note>Of P({html.escape(of)}). "
            "Brier = mean squared error of the probability (lower is better); ECE = expected calibration "
            "error over equal-mass bins, their number by the monotonic sweep (lower is better); "
            "PR-AUC = average precision. "
            f"{html.escape(RISK_NOTE)}. " + shown + "</p>"
            + html_table(cal, "group") + img(png(fig_reliability(pg.ev, pg.t, d.name)), f"reliability {d.name}"))


def section_operating_points(pg: Page, d: Data) -> str:
    points = pg.ev.config.get("operating_points") or []
    if not points:
        return ""
    opt = operating_table(pg.ev, pg.t, d.name, points, pg.small)
    if opt.empty:
        return ("<h3>Operating points</h3><p class=note>No operating points: they need a positive class "
                "(binary, or `positive:` on the data set) and inner validation predictions.</p>")
    return ("<h3>Operating points chosen on inner validation splits</h3><p class=note>For each outer "
            "fold the threshold on P(positive) is the strictest reaching the target on that fold's "
            "inner validation split; the fold's test images are then called at it. Pooled outer-fold "
            "figures [95% patient-bootstrap CI]: what a clinic would see at a threshold fixed in "
            "advance.</p>" + html_table(opt.set_index("group"), "group"))


def section_decision_curve(pg: Page, d: Data) -> str:
    if positive_index(pg.ev, d.name) is None:
        return ""
    rows = [d.head] + [r for _, r in d.sub[d.sub.best_on_test_folds].iterrows() if r.group != d.head.group]
    return ("<h3>Decision curve</h3><p class=note>Net benefit = TP/n − FP/n · p<sub>t</sub>/(1 − "
            "p<sub>t</sub>) at threshold probability p<sub>t</sub> (Vickers &amp; Elkin 2006, as the "
            "dcurves package computes it); a model is useful where it lies above both treat-all and "
            "treat-none. Probabilities at the training prevalence (see Calibration).</p>"
            + img(png(fig_decision(pg.ev, rows, d.name, colours(pg.t, d.name))), f"decision curve {d.name}"))


def section_external(pg: Page, d: Data) -> str:
    ext = external_table(pg.ev, pg.t, d.name, pg.small)
    if ext.empty:
        return ""
    return ("<h3>Internal vs external validation</h3><p class=note>Internal: pooled out-of-fold "
            "predictions. External: each outer fold's model predicts the external set as it is (no "
            "refitting, no recalibration); the fold-average model averages their probabilities.</p>"
            + html_table(ext.set_index("group"), "group"))


def section_subgroups(pg: Page, d: Data) -> str:
    sg = subgroup_table(pg.ev, pg.t, d.name, pg.small)
    if sg.empty:
        return ""
    pg.subgroups.append(sg)
    shown = sg[sg.group == label(d.head)].drop(columns=["dataset", "group"])
    return ("<h3>Subgroups (headline model, pooled out-of-fold)</h3><p class=note>Per value of the "
            "manifest columns under <code>subgroups:</code>; every group's rows are in subgroups.csv. "
            "Small subgroups give wide intervals.</p>" + html_table(shown.set_index("subgroup"), "subgroup"))


def section_roc_confusion(pg: Page, d: Data) -> str:
    y, p, _ = pooled(pg.ev, d.head.group)
    if not (len(d.class_names) and len(y)):
        return ""
    name = label(d.head)
    return (f"<h3>Headline model ({html.escape(name)}): ROC and confusion matrix (pooled out-of-fold)</h3>"
            "<div class=row>"
            + img(png(fig_roc(y, p, d.class_names, d.positive, "ROC: headline model")), f"ROC {d.name}")
            + img(png(fig_confusion(y, p, d.class_names, "Confusion: headline model")), f"confusion {d.name}")
            + "</div>")


def section_training_curves(pg: Page, d: Data) -> str:
    fig = fig_curves(pg.ev, d.head.group, f"{label(d.head)}: loss per epoch")
    return "<h3>Training curves of the headline group</h3>" + img(png(fig), f"training curves {d.name}")


def section_gallery(pg: Page, d: Data) -> str:
    model = pg.models.get(d.name)
    if model is None or not (model / "gallery" / "gallery.json").is_file():
        return ""
    saved = json.loads((model / "model.json").read_text()).get("cell_id")
    same = saved in set(group_cells(pg.ev, d.head.group).cell_id)
    return ("<h3>Grad-CAM gallery of the saved model</h3>"
            + ("" if same else "<p class=warn>The saved model is not from the headline group (it was kept "
               "by an older rule: best mean on the test folds); read its pictures with that in mind.</p>")
            + gallery_html(model))


def section_duplicates(pg: Page, d: Data) -> str:
    dup = d.info.get("duplicates", {})
    record = {k: v for k, v in d.info.items() if k not in ("clusters", "subgroups")}
    kind = ("Near-duplicate groups (perceptual hash" if dup.get("near_duplicates") else
            "Identical images (after decoding")
    policy = html.escape(str(dup.get("policy", "?")))
    return (f"<h3>Duplicates and leakage</h3><p>{kind}) found: "
            f"<b>{dup.get('duplicate_groups', 0)}</b> groups, {dup.get('duplicate_images', 0)} extra copies, "
            f"{dup.get('label_conflicts', 0)} with conflicting labels; policy <b>{policy}</b> "
            "(group: copies are kept in the same fold, so no image is both trained and tested on)."
            + (f" <b style='color:#b00'>{dup['label_conflicts']} duplicate group(s) carry different "
               "labels</b>: check them at the source (<code>medtune data check</code>)."
               if dup.get("label_conflicts") else "")
            + f"</p><pre>{html.escape(json.dumps(record, default=str))}</pre>")


# --------------------------------------------------------------------------- sections: the page's end
def section_across_datasets(pg: Page) -> str:
    if pg.t.dataset.nunique() < 2:
        return ""
    return "<h2>Across data sets</h2>" + cd_section(rank_blocks(pg.ev), "blocks = data sets", "all data sets")


def section_tripod(pg: Page) -> str:
    return ("<h2>Appendix: TRIPOD+AI / CLAIM checklist</h2><p class=note>Filled from this run's configuration "
            "and data record; the last column is what a manuscript must still state.</p>"
            + html_table(tripod_appendix(pg.ev, pg.vs), "item"))


def section_configuration(pg: Page) -> str:
    return "<h2>Configuration and environment</h2>" + "".join(
        f"<h3>run {html.escape(r.run_id)}</h3><p>Resolved configuration:</p>"
        f"<pre>{html.escape(json.dumps(json.loads(r.config_json), indent=1))}</pre><p>Environment:</p>"
        f"<pre>{html.escape(json.dumps(json.loads(r.env_json), indent=1))}</pre>" for _, r in pg.ev.runs.iterrows())


# --------------------------------------------------------------------------- the page: its table of contents
PAGE_TOP = (section_title, section_reading)
DATASET_SECTIONS = (section_dataset, section_verdict, section_main_table, section_racing, section_efficiency,
                    section_collapsed, section_chosen, section_budget, section_metrics, section_paired_tests,
                    section_ranks, section_depth, section_learning_curves, section_cost, section_calibration,
                    section_operating_points, section_decision_curve, section_external, section_subgroups,
                    section_roc_confusion, section_training_curves, section_gallery, section_duplicates)
PAGE_END = (section_across_datasets, section_tripod, section_configuration)


def build_report(store_path: str | Path, out_dir: str | Path, n_boot: int = 2000) -> dict[str, Path]:
    """Write report.html (self-contained), results.csv, subgroups.csv, results.md and results.tex: the
    page is its sections in order (PAGE_TOP, DATASET_SECTIONS for each data set, PAGE_END), each
    returning its HTML, or "" where it does not apply."""
    from medtune.evaluation.verdict import verdicts

    ev = read_evidence(store_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = group_table(ev, n_boot)
    pg = Page(ev, t, verdicts(ev, t, n_boot), small=max(200, n_boot // 4),  # the secondary tables' bootstraps
              models=best_models(ev.store), n_boot=n_boot, out=out)
    body = [section(pg) for section in PAGE_TOP]
    for ds in dict.fromkeys(t.dataset):
        d = data_of(pg, ds)
        body += [section(pg, d) for section in DATASET_SECTIONS]
    body += [section(pg) for section in PAGE_END]
    return write_report(pg, out, "".join(body))


def write_report(pg: Page, out: Path, body: str) -> dict[str, Path]:
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>medtune report</title>"
            f"<style>{CSS}{CSS_EXTRA}</style></head><body>{body}</body></html>")
    paths = {"html": out / "report.html", "csv": out / "results.csv", "md": out / "results.md",
             "tex": out / "results.tex"}
    paths["html"].write_text(page, encoding="utf-8")
    pg.t.to_csv(paths["csv"], index=False)
    if pg.subgroups:
        paths["subgroups"] = out / "subgroups.csv"
        pd.concat(pg.subgroups).to_csv(paths["subgroups"], index=False)
    md = [f"# medtune results: {pg.ev.store.name}\n",
          "Balanced accuracy, pooled out-of-fold [95% patient-bootstrap CI]; ★ = headline (chosen without the "
          "test folds), † = best mean on the test folds (optimistic).\n", *pg.md]
    paths["md"].write_text("\n".join(md) + "\n", encoding="utf-8")
    paths["tex"].write_text("\n".join(pg.tex), encoding="utf-8")
    return paths
