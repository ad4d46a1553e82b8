"""The learning-curve figure: balanced accuracy against training patients, one line per strategy, with
the cost of each size beneath. Presentation only; the numbers are evaluation/learning.py's."""

from __future__ import annotations

import numpy as np

from medtune.evaluation.learning import LearningCurves
from medtune.data.subsets import is_full, size_label

DODGE = 1.06  # extrapolated points of several curves sit this factor apart on the log axis
STYLES = ("-", "--", "-.", (0, (6, 2, 1, 2, 1, 2)))  # one per backbone / head / variant series where there are several
EXTRAPOLATED = ":"  # the segment to a 2x point: dotted, a style no measured series has


def series_style(sub) -> dict[str, tuple[str, str]]:
    """{curve: (colour, line style)}: a colour per strategy, a line style per backbone/head series."""
    strategies = list(dict.fromkeys(sub.strategy))
    series = list(dict.fromkeys(zip(sub.backbone, sub["head"], sub.variant)))
    out = {}
    for _, r in sub.drop_duplicates("curve").iterrows():
        out[r.curve] = (f"C{strategies.index(r.strategy) % 10}",
                        STYLES[series.index((r.backbone, r["head"], r.variant)) % len(STYLES)])
    return out


def size_ticks(ax, sub, target: float) -> None:
    """x ticks at each size's mean training patients, labelled `25%` over `80 pts`; 2x where extrapolated."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    at = sub.groupby("size", sort=False).n_patients.mean().dropna()
    ticks = list(at.values) + ([target] if np.isfinite(target) else [])
    names = [f"{size_label(s) if isinstance(s, float) else ''}\n{n:.0f} pts" for s, n in at.items()]
    names += ["2x (model)\n" + f"{target:.0f} pts"] if np.isfinite(target) else []
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels(names)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def curve_figure(lc: LearningCurves, dataset: str, plt=None):
    """x: training patients (log scale; ticks name each size and its patients); y: pooled out-of-fold
    balanced accuracy with its 95% CI band, one line per curve, its trained share in the legend; a
    dashed segment to the 2x extrapolation and its interval where one was made. Below: mean cell
    seconds per size (what each point cost). `plt`: the report's pyplot (html._plt, its fonts; this module
    does not import html, which imports it), else matplotlib's on the Agg backend."""
    if plt is None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    sub = lc.of(dataset).dropna(subset=["n_patients"])
    style = series_style(sub)
    ex = {e.curve: e for e in lc.extrapolations.get(dataset, []) if e.made}
    target = next(iter(ex.values())).patients if ex else np.nan
    fig, (ax, cost) = plt.subplots(2, 1, figsize=(9.5, 7.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.1]})
    for curve, d in sub.groupby("curve", sort=False):
        d = d.sort_values("n_patients")
        colour, ls = style[curve]
        share = d.share.mean()
        name = curve + (f" ({100 * share:.3g}% trained)" if np.isfinite(share) else "")
        ax.plot(d.n_patients, d.estimate, marker="o", color=colour, ls=ls, lw=2, label=name)
        ax.fill_between(d.n_patients, d.ci_low, d.ci_high, color=colour, alpha=0.13, lw=0)
        if curve in ex:
            e, last = ex[curve], d[d["size"].map(is_full)]
            x = e.patients * DODGE ** (list(ex).index(curve) - (len(ex) - 1) / 2)  # intervals side by side
            if len(last):
                ax.plot([last.n_patients.iloc[0], x], [last.estimate.iloc[0], e.estimate], color=colour,
                        ls=EXTRAPOLATED, lw=1.8)
            ax.errorbar([x], [e.estimate], yerr=[[e.estimate - e.low], [e.high - e.estimate]],
                        marker="o", mfc="white", color=colour, capsize=4, ls="none")
        cost.plot(d.n_patients, d.seconds, marker="o", color=colour, ls=ls, lw=1.5)
    ax.set_xscale("log")
    lo, hi = sub.n_patients.min(), max(sub.n_patients.max(), target if np.isfinite(target) else 0)
    ax.set_xlim(lo / 1.35, hi * 1.35)
    size_ticks(cost, sub, target)
    if ex:
        ax.axvspan(sub.n_patients.max() * 1.15, hi * 1.35, color="0.5", alpha=0.08, lw=0)
        ax.text(hi, ax.get_ylim()[0], "extrapolated\n(a model)", ha="center", va="bottom", fontsize=10, color="0.3")
    ax.set_ylabel("balanced accuracy\n(pooled out-of-fold, 95% CI)")
    ax.set_title(f"{dataset}: learning curves (nested subsets, same test folds)")
    ax.grid(alpha=0.3)
    several = sub[["backbone", "head", "variant"]].drop_duplicates().shape[0] > 1
    # beneath the plots, not beside them: a long strategy label (a rate choice) beside the axes left
    # them half the width and ran the size ticks into each other
    handles, labels = ax.get_legend_handles_labels()
    legend_in = 0.28 * (len(labels) + 1)  # inches: a row per curve and the title
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + legend_in)
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.005), fontsize=11, title_fontsize=11,
               title="backbone · strategy" if several else "strategy", frameon=False)
    cost.set_ylabel("seconds\nper cell")
    cost.set_xlabel("training patients per fold (mean over folds; log scale)")
    if (sub.seconds > 0).all() and sub.seconds.max() / sub.seconds.min() > 20:
        from matplotlib.ticker import FuncFormatter

        cost.set_yscale("log")
        cost.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    cost.grid(alpha=0.3)
    fig.tight_layout(rect=(0, legend_in / (height + legend_in), 1, 1))
    return fig
