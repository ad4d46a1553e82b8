"""MODEL_CARD.md for a deployed bundle: what it was trained on and how well it did, from the store.

Every figure is read from the results store through `medtune.results.evidence`, the module the report's
tables come from, so the card and the report say the same numbers: the group's mean ± sd over
folds, the pooled out-of-fold balanced accuracy with its 95% patient-bootstrap CI, and the
calibration (Brier, ECE, PR-AUC). Intended use and limitations are stated from the run's record
(grouping, duplicates, how the group was chosen), not written by hand per model.
"""

from __future__ import annotations

from pathlib import Path

N_BOOT = 2000  # as the report's tables


def model_card(store_path: str | Path, meta: dict, ev=None) -> str:
    """The card's text; `ev`: the store's evidence when the caller has read it (keep_best)."""
    from medtune.results.evidence import (RISK_NOTE, calibration_table, ci, duplicates_text, fmt_ci, grouping_text, pooled,
                                  read_evidence, summary_table)
    from medtune.results.headline import HOW
    from medtune.results.metrics import MAIN_METRICS, balanced_accuracy
    from medtune.results.verdict import evaluation_text, verdicts

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
    row = rows.iloc[0]
    y, p, s = pooled(ev, group)
    point, lo, hi = ci(ev, ds, y, p, s, balanced_accuracy, N_BOOT)
    cal = calibration_table(ev, rows, ds, n_boot=500)
    counts = info.get("class_counts", {})
    dup = info.get("duplicates", {}) or {}
    k = len(meta["folds"])
    lines = [
        f"# Model card: {ds} · {meta['backbone']} · {meta['strategy']} · {meta['head']}",
        "",
        "Written by medtune from the results store "
        f"`{Path(store_path).name}`; every figure below is the store's (the report shows the same).",
        "",
        "## Verdict",
        "",
        *(["```", *verdict.lines(), "```"] if verdict is not None else ["(no verdict: no finished cells)"]),
        *([] if verdict is None or verdict.group == group else
          ["", "**This bundle is not the verdict's recommendation** (it was saved from another group)."]),
        "",
        "## Data",
        f"- Data set `{ds}`: {info.get('n', len(y))} images; classes " + ", ".join(f"{c} {n}" for c, n in counts.items()) + ".",
        "- Split: " + grouping_text(info) + "; "
        + (evaluation_text(int(meta["n_folds"]), info) if int(meta["n_folds"]) <= 1 else
           f"stratified {meta['n_folds']}-fold cross-validation") + f", seed {meta['seed']}.",
        f"- Duplicates: {duplicates_text(dup)}, {dup.get('label_conflicts', 0)} with conflicting labels.",
        "",
        "## Classes",
        f"- Output order: {', '.join(meta['class_names'])}.",
        f"- Positive class: {meta.get('positive') or 'none declared'} (sensitivity, specificity, PPV and NPV "
        "are about it)." if meta.get("positive") else "- Positive class: none declared.",
        "",
        "## Preprocessing",
        f"- Decoded as in training (`medtune.data.loaders.decode_image`): RGB, resized to {meta['image_size']} x "
        f"{meta['image_size']} with bicubic interpolation (PIL `Image.BICUBIC`; bilinear changes the probabilities), "
        f"scaled to [0, 1], normalised with mean {meta['mean']} and std {meta['std']}.",
        "",
        "## Model",
        f"- {meta['backbone']} fine-tuned with `{meta['strategy']}`, {meta['head']} head.",
        f"- Deployed as the mean of the probabilities of its {k} fold models (folds "
        f"{', '.join(str(e['fold']) for e in meta['folds'])}); `medtune predict --fold N` uses one.",
        f"- Chosen: {HOW.get(meta.get('chosen_by'), meta.get('chosen_by'))}.",
        "",
        "## Cross-validated performance (outer test folds)",
        f"- Balanced accuracy, pooled out-of-fold: {fmt_ci(point, lo, hi)} (95% "
        + ("patient-" if info.get("clusters") is not None else "") + f"bootstrap CI, {N_BOOT} resamples).",
        f"- Mean ± sd over {int(row['n_cells'])} cells (folds x seeds):",
        "",
        "| metric | mean | sd |",
        "|---|---|---|",
    ]
    for m in MAIN_METRICS:
        if m in row and row[m] == row[m]:
            lines.append(f"| {m} | {row[m]:.3f} | {row.get(f'{m}_sd', float('nan')):.3f} |")
    lines += ["", "## Calibration (pooled out-of-fold, 95% CI)"]
    if not cal.empty:
        c = cal.iloc[0]
        lines.append(f"- Brier score {c['brier']}; expected calibration error {c['ece']}; PR-AUC {c['pr_auc']}.")
        lines.append(f"- {RISK_NOTE}.")
    lines += [
        "",
        "## Intended use",
        "- Research: comparing fine-tuning choices and a starting point for a locally validated model. Not a "
        "medical device; not for diagnosis without a prospective validation where it is to be used.",
        "",
        "## Limitations",
        f"- Trained and cross-validated on one data set (`{ds}`); performance on other scanners, sites or "
        "populations is unknown until tested there (`test_datasets:` in the experiment file).",
        "- Each fold model saw every image except its own test fold: predictions on the training images "
        "themselves are optimistic; the figures above are out-of-fold.",
    ]
    if not info.get("grouped"):
        lines.append("- No patient ids: images of one patient may sit in both training and test folds, which "
                     "makes the figures above optimistic.")
    if meta.get("chosen_by") == "optimistic":
        lines.append("- The deployed group was the best on the same test folds that score it: its figures are an "
                     "optimistic estimate (declare `primary:` or add `auto_depth`).")
    return "\n".join(lines) + "\n"


def write_model_card(out: str | Path, store_path: str | Path, meta: dict, ev=None) -> Path:
    path = Path(out) / "MODEL_CARD.md"
    path.write_text(model_card(store_path, meta, ev))
    return path
