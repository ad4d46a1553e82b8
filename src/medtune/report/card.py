"""MODEL_CARD.md for a deployed bundle: what it was trained on and how well it did, from the store.

Every figure is read from the results store through `medtune.evaluation.evidence`, the module the report's
tables come from, so the card and the report say the same numbers: the group's mean ± sd over
folds, the pooled out-of-fold balanced accuracy with its 95% patient-bootstrap CI, and the
calibration (Brier, ECE, PR-AUC). Intended use and limitations are stated from the run's record
(grouping, duplicates, how the group was chosen), not written by hand per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from medtune.evaluation.verdict import Verdict

N_BOOT = 2000  # as the report's tables


@dataclass(frozen=True, eq=False)
class Facts:
    """What the card's sections state, read from the store once: the deployed bundle's `meta`, its data
    set's record (`info`) and verdict, the group's summary row (mean and sd per metric), the size of its
    pooled out-of-fold predictions, their balanced accuracy with its 95% CI (`ba`: point, low, high)
    and calibration table."""
    store_path: str | Path
    meta: dict
    info: dict
    verdict: Verdict | None
    row: pd.Series
    n_pooled: int
    ba: tuple[float, float, float]
    cal: pd.DataFrame


def read_facts(store_path: str | Path, meta: dict, ev=None) -> Facts:
    from medtune.evaluation.evidence import calibration_table, ci, pooled, read_evidence, summary_table
    from medtune.evaluation.metrics import balanced_accuracy
    from medtune.evaluation.verdict import verdicts

    ev = read_evidence(store_path) if ev is None else ev
    ds, group = meta["dataset"], meta["group"]
    verdict = verdicts(ev).get(ds)
    info = ev.info(ds)
    rows = summary_table(ev.metrics[ev.metrics.group == group])
    if rows.empty:  # a store edited by hand (or a different store) no longer holds the deployed group
        from medtune.errors import MedtuneError

        raise MedtuneError(f"the results store {store_path} holds no finished cells of the deployed group {group} "
                           f"({ds} · {meta['backbone']} · {meta['strategy']}): the store was changed or damaged after "
                           "the model was saved. Rerun the grid into it (finished cells are reused) or use the store "
                           "the model came from.")
    y, p, s = pooled(ev, group)
    ba = ci(ev, ds, y, p, s, balanced_accuracy, N_BOOT)
    return Facts(store_path, meta, info, verdict, rows.iloc[0], len(y), ba,
                 calibration_table(ev, rows, ds, n_boot=500))


# --------------------------------------------------------------------------- the card's sections, in order
def card_title(f: Facts) -> list[str]:
    m = f.meta
    return [f"# Model card: {m['dataset']} · {m['backbone']} · {m['strategy']} · {m['head']}",
            "",
            "Written by medtune from the results store "
            f"`{Path(f.store_path).name}`; every figure below is the store's (the report shows the same)."]


def card_verdict(f: Facts) -> list[str]:
    v = f.verdict
    return ["## Verdict",
            "",
            *(["```", *v.lines(), "```"] if v is not None else ["(no verdict: no finished cells)"]),
            *([] if v is None or v.group == f.meta["group"] else
              ["", "**This bundle is not the verdict's recommendation** (it was saved from another group)."])]


def card_data(f: Facts) -> list[str]:
    from medtune.evaluation.evidence import duplicates_text, grouping_text
    from medtune.evaluation.verdict import evaluation_text

    meta, info = f.meta, f.info
    counts = info.get("class_counts", {})
    dup = info.get("duplicates", {}) or {}
    return ["## Data",
            f"- Data set `{meta['dataset']}`: {info.get('n', f.n_pooled)} images; classes "
            + ", ".join(f"{c} {n}" for c, n in counts.items()) + ".",
            "- Split: " + grouping_text(info) + "; "
            + (evaluation_text(int(meta["n_folds"]), info) if int(meta["n_folds"]) <= 1 else
               f"stratified {meta['n_folds']}-fold cross-validation") + f", seed {meta['seed']}.",
            f"- Duplicates: {duplicates_text(dup)}, {dup.get('label_conflicts', 0)} with conflicting labels."]


def card_classes(f: Facts) -> list[str]:
    meta = f.meta
    return ["## Classes",
            f"- Output order: {', '.join(meta['class_names'])}.",
            f"- Positive class: {meta.get('positive') or 'none declared'} (sensitivity, specificity, PPV and NPV "
            "are about it)." if meta.get("positive") else "- Positive class: none declared."]


def card_preprocessing(f: Facts) -> list[str]:
    meta = f.meta
    return ["## Preprocessing",
            f"- Decoded as in training (`medtune.data.loaders.decode_image`): RGB, resized to {meta['image_size']} x "
            f"{meta['image_size']} with bicubic interpolation (PIL `Image.BICUBIC`; bilinear changes the "
            f"probabilities), scaled to [0, 1], normalised with mean {meta['mean']} and std {meta['std']}."]


def card_model(f: Facts) -> list[str]:
    from medtune.evaluation.headline import HOW

    meta = f.meta
    return ["## Model",
            f"- {meta['backbone']} fine-tuned with `{meta['strategy']}`, {meta['head']} head.",
            f"- Deployed as the mean of the probabilities of its {len(meta['folds'])} fold models (folds "
            f"{', '.join(str(e['fold']) for e in meta['folds'])}); `medtune predict --fold N` uses one.",
            f"- Chosen: {HOW.get(meta.get('chosen_by'), meta.get('chosen_by'))}."]


def card_performance(f: Facts) -> list[str]:
    from medtune.evaluation.evidence import fmt_ci
    from medtune.evaluation.metrics import MAIN_METRICS

    row = f.row
    lines = ["## Cross-validated performance (outer test folds)",
             f"- Balanced accuracy, pooled out-of-fold: {fmt_ci(*f.ba)} (95% "
             + ("patient-" if f.info.get("clusters") is not None else "") + f"bootstrap CI, {N_BOOT} resamples).",
             f"- Mean ± sd over {int(row['n_cells'])} cells (folds x seeds):",
             "",
             "| metric | mean | sd |",
             "|---|---|---|"]
    return lines + [f"| {m} | {row[m]:.3f} | {row.get(f'{m}_sd', float('nan')):.3f} |"
                    for m in MAIN_METRICS if m in row and row[m] == row[m]]


def card_calibration(f: Facts) -> list[str]:
    from medtune.evaluation.evidence import RISK_NOTE

    lines = ["## Calibration (pooled out-of-fold, 95% CI)"]
    if not f.cal.empty:
        c = f.cal.iloc[0]
        lines.append(f"- Brier score {c['brier']}; expected calibration error {c['ece']}; PR-AUC {c['pr_auc']}.")
        lines.append(f"- {RISK_NOTE}.")
    return lines


def card_intended_use(f: Facts) -> list[str]:
    return ["## Intended use",
            "- Research: comparing fine-tuning choices and a starting point for a locally validated model. Not a "
            "medical device; not for diagnosis without a prospective validation where it is to be used."]


def card_limitations(f: Facts) -> list[str]:
    """Stated from the run's record (grouping, how the group was chosen), not written per model."""
    lines = ["## Limitations",
             f"- Trained and cross-validated on one data set (`{f.meta['dataset']}`); performance on other scanners, "
             "sites or populations is unknown until tested there (`test_datasets:` in the experiment file).",
             "- Each fold model saw every image except its own test fold: predictions on the training images "
             "themselves are optimistic; the figures above are out-of-fold."]
    if not f.info.get("grouped"):
        lines.append("- No patient ids: images of one patient may sit in both training and test folds, which "
                     "makes the figures above optimistic.")
    if f.meta.get("chosen_by") == "optimistic":
        lines.append("- The deployed group was the best on the same test folds that score it: its figures are an "
                     "optimistic estimate (declare `primary:` or add `auto_depth`).")
    return lines


SECTIONS = (card_title, card_verdict, card_data, card_classes, card_preprocessing, card_model, card_performance,
            card_calibration, card_intended_use, card_limitations)


def model_card(store_path: str | Path, meta: dict, ev=None) -> str:
    """The card's text: its SECTIONS, a blank line between them; `ev`: the store's evidence when the
    caller has read it (keep_best)."""
    facts = read_facts(store_path, meta, ev)
    lines: list[str] = []
    for section in SECTIONS:
        lines += ([""] if lines else []) + section(facts)
    return "\n".join(lines) + "\n"


def write_model_card(out: str | Path, store_path: str | Path, meta: dict, ev=None) -> Path:
    path = Path(out) / "MODEL_CARD.md"
    path.write_text(model_card(store_path, meta, ev))
    return path
