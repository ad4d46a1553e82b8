"""Tables and (later) the HTML report, computed only from the results store."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medtune.diagnose import collapsed_cells
from medtune.metrics import MAIN_METRICS

GROUP = ["dataset", "backbone", "strategy", "head"]


def summary_table(metrics: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Mean and sd over folds and seeds per (dataset, backbone, strategy, head)."""
    columns = [c for c in (columns or MAIN_METRICS) if c in metrics.columns]
    agg = metrics.groupby(GROUP, sort=False)
    mean = agg[columns].mean()
    sd = agg[columns].std(ddof=1)
    out = mean.copy()
    for c in columns:
        out[f"{c}_sd"] = sd[c]
    out["n_cells"] = agg.size()
    out["seconds"] = agg["seconds"].sum()
    return out.reset_index()


SHORT = {"accuracy": "acc", "balanced_accuracy": "bal_acc", "sensitivity": "sens", "specificity": "spec",
         "ppv": "PPV", "npv": "NPV", "f1": "F1", "auc": "AUC"}


def pm(mean: float, sd: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if np.isnan(sd) else f"{mean:.{digits}f}±{sd:.{digits}f}"


def format_pm(table: pd.DataFrame, columns: list[str] | None = None, digits: int = 3) -> pd.DataFrame:
    """'mean±sd' strings for display, with short metric names."""
    columns = [c for c in (columns or MAIN_METRICS) if c in table.columns]
    out = table[GROUP].copy()
    for c in columns:
        out[SHORT.get(c, c)] = [pm(m, s, digits) for m, s in zip(table[c], table[f"{c}_sd"])]
    out["folds"] = table["n_cells"]
    out["seconds"] = table["seconds"].round(1)
    return out


# =========================================================================== the evidence report
# Everything below reads the store (and the PNGs the runner wrote beside it), never a model.
import base64  # noqa: E402
import html  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from medtune.metrics import (balanced_accuracy, bootstrap_ci, cd_cliques, confusion, corrected_ttest,  # noqa: E402
                             friedman, nemenyi_cd, wilcoxon)

MAIN = "balanced_accuracy"
FONT = 13  # points: readable when the page is printed


@dataclass
class Evidence:
    """What the report is computed from, read once from the store."""

    metrics: pd.DataFrame
    cells: pd.DataFrame
    predictions: pd.DataFrame
    datasets: pd.DataFrame
    runs: pd.DataFrame
    store: Path


def read_evidence(store_path: str | Path) -> Evidence:
    from medtune.errors import MedtuneError
    from medtune.store import open_store, read_cells, read_datasets

    with open_store(store_path, must_exist=True) as s:
        m = s.metrics()
        if m.empty:
            raise MedtuneError(f"{store_path} holds no finished cells yet; run `medtune run CONFIG` first.")
        return Evidence(m, read_cells(s), s.predictions(), read_datasets(s), s.runs(), Path(store_path))


def label(row) -> str:
    """One readable name per cell group within a data set."""
    return f"{row['backbone']} · {row['strategy']}" + ("" if row["head"] == "softmax" else f" · {row['head']}")


def pooled(ev: Evidence, keys: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, probs) of a group's out-of-fold predictions, first seed only so each sample counts once."""
    c = ev.cells
    sel = c[(c.dataset == keys[0]) & (c.backbone == keys[1]) & (c.strategy == keys[2]) & (c["head"] == keys[3])]
    sel = sel[sel.seed == sel.seed.min()]
    p = ev.predictions[ev.predictions.cell_id.isin(sel.cell_id)]
    return p.y_true.to_numpy(), np.array(p.probs.tolist(), dtype=float)


def group_table(ev: Evidence, n_boot: int = 2000) -> pd.DataFrame:
    """Per group: mean ± sd over folds and seeds, pooled out-of-fold balanced accuracy with its 95%
    bootstrap CI, and whether it is the best group of its data set (highest mean)."""
    t = summary_table(ev.metrics)
    lo, hi, pt = [], [], []
    for _, r in t.iterrows():
        y, p = pooled(ev, tuple(r[GROUP]))
        point, a, b = bootstrap_ci(y, p, balanced_accuracy, n_boot=n_boot, seed=0) if len(y) else (np.nan,) * 3
        pt.append(point), lo.append(a), hi.append(b)
    t["pooled_balanced_accuracy"], t["ci_low"], t["ci_high"] = pt, lo, hi
    t["best"] = t[MAIN] == t.groupby("dataset")[MAIN].transform("max")
    return t


def main_table(t: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Strategy rows x backbone (and head) columns: 'mean [CI]' of balanced accuracy, best marked ★."""
    sub = t[t.dataset == dataset].copy()
    sub["column"] = sub.backbone + np.where(sub["head"] == "softmax", "", " · " + sub["head"])
    sub["cell"] = [f"{'★ ' if b else ''}{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi, b in
                   zip(sub[MAIN], sub.ci_low, sub.ci_high, sub.best)]
    out = sub.pivot(index="strategy", columns="column", values="cell").fillna("–")
    order = list(dict.fromkeys(sub.strategy))
    return out.loc[order]


def paired_tests(ev: Evidence, t: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The best group against every other on the same (seed, fold) pairs: corrected resampled
    t-test (Nadeau & Bengio) and Wilcoxon signed-rank, on balanced accuracy."""
    m = ev.metrics[ev.metrics.dataset == dataset]
    best = tuple(t[(t.dataset == dataset) & t.best].iloc[0][GROUP])
    info = ev.cells.set_index("cell_id")["info"]
    score = m.set_index(GROUP + ["seed", "fold"])[MAIN].sort_index()
    rows = []
    for keys, g in m.groupby(GROUP, sort=False):
        if keys == best:
            continue
        a_all = score.loc[best]
        common = a_all.index.intersection(g.set_index(["seed", "fold"]).index)
        a, b = a_all.loc[common].to_numpy(), g.set_index(["seed", "fold"])[MAIN].loc[common].to_numpy()
        ids = g.cell_id
        n_train = np.mean([info[i].get("n_train", np.nan) for i in ids])
        n_test = np.mean([info[i].get("n_test", np.nan) for i in ids])
        tt, p_t = corrected_ttest(a, b, n_train, n_test)
        _, p_w = wilcoxon(a, b)
        rows.append({"compared with": label(dict(zip(GROUP, keys))), "pairs": len(common),
                     "mean difference": float(np.mean(a - b)), "corrected t": tt, "p (corrected t)": p_t,
                     "p (Wilcoxon)": p_w})
    return pd.DataFrame(rows)


def cd_blocks(ev: Evidence, dataset: str | None) -> tuple[pd.DataFrame, str]:
    """Scores for the Friedman test: rows = data sets (methods common to all) when the store has
    several, else the (seed, fold) pairs of one data set."""
    m = ev.metrics.copy()
    m["method"] = [label(r) for _, r in m.iterrows()]
    if dataset is None:
        wide = m.groupby(["dataset", "method"])[MAIN].mean().unstack().dropna(axis=1)
        return wide, "blocks = data sets"
    sub = m[m.dataset == dataset]
    wide = sub.pivot_table(index=["seed", "fold"], columns="method", values=MAIN).dropna(axis=1)
    return wide, "blocks = folds"


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


def max_blocks(info: dict) -> float:
    tb = info.get("trainable_blocks") or []
    return float(max(tb)) if tb else np.nan


def fig_depth(ev: Evidence, t: pd.DataFrame, dataset: str):
    """Balanced accuracy against the number of trainable blocks (max over epochs), one series per
    backbone and head, each point named by its strategy."""
    plt = _plt()
    c = ev.cells[ev.cells.dataset == dataset].copy()
    c["blocks"] = c["info"].map(max_blocks)
    depth = c.groupby(GROUP)["blocks"].median()
    sub = t[t.dataset == dataset].set_index(GROUP)
    sub["blocks"] = depth
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (bb, head), g in sub.reset_index().groupby(["backbone", "head"]):
        g = g.sort_values("blocks")
        ax.errorbar(g.blocks, g[MAIN], yerr=g[f"{MAIN}_sd"].fillna(0), marker="o", capsize=4,
                    label=bb + ("" if head == "softmax" else f" · {head}"))
        for _, r in g.iterrows():
            ax.annotate(r.strategy, (r.blocks, r[MAIN]), textcoords="offset points", xytext=(6, 6), fontsize=FONT - 2)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("trainable blocks (of the network's stem → head chain; head = 1)")
    ax.set_ylabel("balanced accuracy (mean ± sd over folds)")
    ax.set_title(f"{dataset}: how deep to fine-tune")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
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


def fig_curves(ev: Evidence, keys: tuple, title: str):
    plt = _plt()
    c = ev.cells
    sel = c[(c.dataset == keys[0]) & (c.backbone == keys[1]) & (c.strategy == keys[2]) & (c["head"] == keys[3])]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (_, r) in enumerate(sel.iterrows()):
        h = r["info"].get("history") or []
        if not h:
            continue
        ep = [e["epoch"] + 1 for e in h]
        colour = f"C{i % 10}"
        ax.plot(ep, [e["train_loss"] for e in h], color=colour, marker="o", label=f"fold {r.fold} train")
        val = [e["val_loss"] for e in h]
        if not all(v is None or np.isnan(v) for v in val):
            ax.plot(ep, val, color=colour, marker="s", ls="--", label=f"fold {r.fold} validation")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(ncol=2, loc="best")
    return fig


# --------------------------------------------------------------------------- tables as text
def to_markdown(df: pd.DataFrame, index_name: str = "") -> str:
    cols = [index_name] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i)] + [str(v) for v in row]) + " |" for i, row in zip(df.index, df.values)]
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
table { border-collapse: collapse; margin: 0.8em 0; font-size: 14px; } td, th { border: 1px solid #bbb; padding: 4px 7px; text-align: left; }
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
    from medtune.bundle import models_dir

    out = {}
    for f in sorted(models_dir(store).glob("*/model.json")):
        out[json.loads(f.read_text())["dataset"]] = f.parent
    return out


def build_report(store_path: str | Path, out_dir: str | Path, n_boot: int = 2000) -> dict[str, Path]:
    """Write report.html (self-contained), results.csv, results.md and results.tex to `out_dir`."""
    ev = read_evidence(store_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = group_table(ev, n_boot)
    models = best_models(ev.store)
    ds_info = ev.datasets.set_index("dataset")
    md = [f"# medtune results: {ev.store.name}\n",
          "Balanced accuracy, mean over folds [95% bootstrap CI of the pooled out-of-fold predictions]; ★ = best.\n"]
    tex = []
    body = [f"<h1>medtune report: {html.escape(ev.store.name)}</h1>",
            "<p>Each cell of the grid (data set × backbone × strategy × head) was trained and tested under "
            "stratified k-fold cross-validation, grouped by patient where the data set gives patient ids (each "
            "data set's section says whether it does); every number and figure below is computed "
            "from the stored out-of-fold predictions. <b>Main metric: balanced accuracy</b> (mean recall over "
            "classes, chance = 1/number of classes). Tables show the mean over folds with the 95% bootstrap "
            "confidence interval of the pooled out-of-fold predictions; ★ marks the best mean.</p>"]
    for ds in dict.fromkeys(t.dataset):
        class_names = ds_info.loc[ds, "class_names"] if ds in ds_info.index else []
        info = ds_info.loc[ds, "info"] if ds in ds_info.index else {}
        positive = info.get("positive")
        sub = t[t.dataset == ds]
        best_row = sub[sub.best].iloc[0]
        keys = tuple(best_row[GROUP])
        table = main_table(t, ds)
        md += [f"## {ds}\n", to_markdown(table, "strategy"), ""]
        tex.append(to_latex(table, f"{ds}: balanced accuracy, mean over folds [95% bootstrap CI]; best marked", "strategy"))
        body.append(f"<h2>{html.escape(ds)}</h2>")
        body.append(f"<p>{int(info.get('n', 0))} images, classes {html.escape(str(info.get('class_counts', class_names)))}"
                    f"{f'; positive class for sensitivity/specificity/PPV/NPV: <b>{html.escape(positive)}</b>' if positive else ''}."
                    f" {patient_note(ev, ds)}</p>")
        body.append("<h3>Balanced accuracy: strategy × backbone</h3>" + html_table(table, "strategy"))
        of = f" ({html.escape(positive)})" if positive else " (macro mean over classes)"
        body.append(f"<p>Best: <b>{html.escape(label(best_row))}</b>, balanced accuracy {best_row[MAIN]:.3f} "
                    f"± {best_row[f'{MAIN}_sd']:.3f} (sd over {int(best_row.n_cells)} folds), AUC "
                    f"{best_row.get('auc', np.nan):.3f}, sensitivity{of} {best_row.get('sensitivity', np.nan):.3f}, "
                    f"specificity{of} {best_row.get('specificity', np.nan):.3f}.</p>")
        collapsed = collapsed_cells(ev.cells[ev.cells.dataset == ds])  # diagnose.py (select helper's lines)
        if collapsed:
            body.append("<h3 style='color:#b00'>Collapsed cells: one class predicted</h3><ul>"
                        + "".join(f"<li>{html.escape(line)}</li>" for line in collapsed) + "</ul>")
        detail = format_pm(sub.reset_index(drop=True))
        detail["seconds"] = detail["seconds"].round().astype(int)
        body.append("<h3>All clinical metrics (mean ± sd over folds)</h3>"
                    f"<p class=note>acc = accuracy, bal_acc = balanced accuracy, sens/spec/PPV/NPV{of}, "
                    "F1 = macro F1, AUC = area under the ROC curve, folds = cells averaged, seconds = training time.</p>"
                    + html_table(detail.drop(columns=["dataset"])))
        tests = paired_tests(ev, t, ds)
        if not tests.empty:
            body.append("<h3>Is the best really better? Paired tests on the same folds</h3>"
                        "<p class=note>Corrected resampled t-test (Nadeau &amp; Bengio 2003: variance × (1/k + "
                        "n<sub>test</sub>/n<sub>train</sub>), because folds share training data) and Wilcoxon "
                        "signed-rank test. With few folds the Wilcoxon test cannot reach p &lt; 0.05.</p>"
                        + html_table(tests.set_index("compared with"), "compared with"))
        body.append("<h3>Depth of fine-tuning</h3>" + img(png(fig_depth(ev, t, ds)), f"depth plot {ds}"))
        y, p = pooled(ev, keys)
        if len(class_names) and len(y):
            name = label(best_row)
            body.append("<h3>Best model: ROC and confusion matrix (pooled out-of-fold)</h3><div class=row>"
                        + img(png(fig_roc(y, p, class_names, positive, f"ROC: {name}")), f"ROC {ds}")
                        + img(png(fig_confusion(y, p, class_names, f"Confusion: {name}")), f"confusion {ds}")
                        + "</div>")
        body.append("<h3>Training curves of the best group</h3>"
                    + img(png(fig_curves(ev, keys, f"{label(best_row)}: loss per epoch")), f"training curves {ds}"))
        wide, what = cd_blocks(ev, ds)
        body.append(cd_section(wide, what, ds))
        if ds in models and (models[ds] / "gallery" / "gallery.json").is_file():
            body.append("<h3>Grad-CAM gallery of the saved best model</h3>" + gallery_html(models[ds]))
        dup = info.get("duplicates", {})
        body.append("<h3>Duplicates and leakage</h3><p>Identical images (after decoding) found: "
                    f"<b>{dup.get('duplicate_groups', 0)}</b> groups, {dup.get('duplicate_images', 0)} extra copies, "
                    f"{dup.get('label_conflicts', 0)} with conflicting labels; policy <b>{html.escape(str(dup.get('policy', '?')))}</b> "
                    "(group: copies are kept in the same fold, so no image is both trained and tested on)."
                    + (f" <b style='color:#b00'>{dup['label_conflicts']} set(s) of identical images carry different "
                       "labels</b>: check them at the source (<code>medtune data check</code>)." if dup.get("label_conflicts") else "")
                    + f"</p><pre>{html.escape(json.dumps(info, default=str))}</pre>")
    if t.dataset.nunique() >= 2:
        wide, what = cd_blocks(ev, None)
        body.append("<h2>Across data sets</h2>" + cd_section(wide, what, "all data sets"))
    body.append("<h2>Configuration and environment</h2>")
    for _, r in ev.runs.iterrows():
        body.append(f"<h3>run {html.escape(r.run_id)}</h3><p>Resolved configuration:</p>"
                    f"<pre>{html.escape(json.dumps(json.loads(r.config_json), indent=1))}</pre><p>Environment:</p>"
                    f"<pre>{html.escape(json.dumps(json.loads(r.env_json), indent=1))}</pre>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>medtune report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    paths = {"html": out / "report.html", "csv": out / "results.csv", "md": out / "results.md", "tex": out / "results.tex"}
    paths["html"].write_text(page, encoding="utf-8")
    t.to_csv(paths["csv"], index=False)
    paths["md"].write_text("\n".join(md) + "\n", encoding="utf-8")
    paths["tex"].write_text("\n".join(tex), encoding="utf-8")
    return paths


def patient_note(ev: Evidence, dataset: str) -> str:
    """Where the fold grouping came from, from the resolved config: without patient ids, images of
    one patient can sit in train and test at once, and every metric is then optimistic."""
    for cfg in ev.runs.config_json.map(json.loads):
        for d in cfg.get("datasets", []):
            name = d.get("name") or (Path(d["path"]).name if d.get("path") else d.get("source"))
            if name != dataset:
                continue
            if d.get("group_pattern"):
                return f"Folds grouped by patient id (file-name pattern <code>{html.escape(d['group_pattern'])}</code>)."
            if d.get("source") == "synthetic":
                return "Folds grouped by (generated) patient id."
            if str(d.get("path", "")).lower().endswith(".csv"):
                return "Folds grouped by the manifest's patient_id column where it has one."
            return ("<b>No patient ids were given</b> (no <code>group_pattern</code>): images of one patient may "
                    "be in both training and test folds, which makes every figure here optimistic. Only identical "
                    "images are kept together (see Duplicates and leakage).")
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
