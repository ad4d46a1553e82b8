"""The `medtune` command: run | results | list | data check | init | report | predict | export | track.

A `MedtuneError` (anything the user can fix) is printed as one paragraph and exits with status 2;
other exceptions keep their traceback because they are medtune's bugs.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medtune.errors import MedtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medtune: compare fine-tuning strategies x backbones x data sets under patient-grouped "
                       "k-fold cross-validation, with clinical metrics.",
                  epilog="Start with `medtune run smoke` (seconds) or `medtune run demo` (minutes; the embedded demo), "
                         "then `medtune init YOUR_DATA` to write an experiment file for your images; "
                         "documentation in docs/quickstart.md.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect a data set before training.")
app.add_typer(data_app, name="data")
# Results tables are wide: when output is not a terminal (CI logs, pipes) do not wrap them at 80.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def working(text: str):
    """Sign of life for a command that works more than a few seconds: a spinner on a terminal, one
    line on stderr elsewhere (a log shows which stage it is in)."""
    if err_console.is_terminal:
        with err_console.status(escape(text)):
            yield
    else:
        err_console.print(f"{escape(text)} ...", highlight=False, soft_wrap=True)
        yield


def version_callback(value: bool) -> None:
    if value:
        from medtune import __version__
        from medtune.version import RESULTS_VERSION

        console.print(f"medtune {__version__} (results version {RESULTS_VERSION})", highlight=False)
        raise typer.Exit()


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """medtune's own warnings as one `warning:` paragraph on stderr, as the CLI's other notes are; a
    library's keep Python's form (file, line), which says where to look."""
    if "medtune" in Path(filename).parts:
        err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        default_show_warning(message, category, filename, lineno, file, line)


default_show_warning = warnings.showwarning


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="Print medtune's version and exit.")) -> None:
    warnings.showwarning = show_warning


class Fmt(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


class What(str, Enum):
    backbones = "backbones"
    strategies = "strategies"
    heads = "heads"
    weights = "weights"
    depths = "depths"


def shipped_configs() -> dict[str, Path]:
    """The example experiment files by name: inside the installed package (`medtune/configs/`, put
    there by pyproject's package-dir mapping), or the checkout's `configs/` when run from source."""
    from importlib.resources import files

    here = Path(str(files("medtune"))) / "configs"
    folder = here if here.is_dir() else Path(__file__).resolve().parents[2] / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def config_path(config: Path) -> Path:
    """A path to an experiment file, or the bare name of a shipped one (`demo`, `smoke`)."""
    if config.exists() or config.suffix or len(config.parts) > 1:
        return config
    shipped = shipped_configs()
    if str(config) in shipped:
        return shipped[str(config)]
    names = ", ".join(shipped) or "none installed"
    raise MedtuneError(f"{config}: no such file, and not a shipped configuration ({names}). Give a YAML file, "
                       "or write one for your images with `medtune init DATA_FOLDER`.")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Experiment YAML file, or a shipped one by name: `demo` (the embedded "
                                            "demo, minutes), `smoke` (seconds). `medtune init DATA` writes one "
                                            "for your images; docs/config.md."),
    store: Optional[Path] = typer.Option(None, "--store", help="SQLite results store to write; default: `store` "
                                                               "in the config."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value without editing the file; the value "
                                                    "is YAML, list entries are numbered from 0: --set train.epochs=3 "
                                                    "--set datasets.0.path=../data/busi (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="Hide the progress: the bar on a terminal, one line per "
                                                      "finished cell "
                                                 "elsewhere (the summary is still printed)."),
) -> None:
    """Train and evaluate every cell of an experiment; rerun to resume.

    Every cell (data set x backbone x strategy x head x seed x fold) of CONFIG is written to the results
    store as it finishes; running again skips finished cells."""
    from medtune.config import load_config
    from medtune.grid.runner import run as run_grid

    from medtune.errors import Interrupted

    resume = " ".join(["medtune run", shlex.quote(str(config))]
                      + ([f"--store {shlex.quote(str(store))}"] if store else [])
                      + [f"--set {shlex.quote(o)}" for o in set_])
    try:
        cfg = load_config(config_path(config), set_)
        summary = run_grid(cfg, str(store) if store else None, progress=not quiet)
    except MedtuneError as exc:
        fail(exc)
    except KeyboardInterrupt as exc:
        interrupted(exc.summary if isinstance(exc, Interrupted) else None, resume)
    print_run_summary(summary, resume)


def print_run_summary(summary, resume: str) -> None:
    """What `medtune run` prints at its end: the counts, the results table, then the verdict (the same
    lines `results`, the report and the model card print) and what was deployed; a failed cell last,
    where a reader of the log looks, and in the exit status a script reads."""
    import json

    from medtune.evaluation.evidence import duplicates_text

    raced = f"{len(summary.pruned)} candidate(s) pruned by racing, " if summary.pruned else ""
    shared = f"{summary.elsewhere} by other runs sharing the store, " if summary.elsewhere else ""
    console.print(f"{summary.total} cells: {summary.done} run, {shared}{summary.skipped} already done, {raced}"
                  f"{summary.failed} failed, {summary.seconds:.0f} s. Store: {summary.store}")
    for why in summary.pruned.values():
        console.print(f"pruned: {escape(why)}")
    for name, d in summary.duplicates.items():
        if d.get("duplicate_groups"):
            console.print(f"[yellow]{escape(name)}: {escape(duplicates_text(d))}.[/]")
    try:
        verdicts = print_results(Path(summary.store), Fmt.table, failed=False, verdict=False)
    except MedtuneError as exc:
        fail(exc)
    print_verdicts(verdicts)
    for path in summary.best_models:
        meta = json.loads((Path(path) / "model.json").read_text())
        v = verdicts.get(meta.get("dataset"))
        name = f"{meta.get('backbone')} · {meta.get('strategy')}" + ("" if meta.get("head") == "softmax" else
                                                                     f" · {meta.get('head')}")
        same = v is not None and meta.get("group") == v.group
        console.print(f"deployed{'' if same else ' (NOT the verdict: an older bundle)'}: {escape(name)} "
                      f"({meta.get('dataset')}, its {len(meta.get('folds', []))} fold models) to {path} "
                      f"(`medtune predict {path} IMAGES`, `medtune export {path}`)", soft_wrap=True, highlight=False)
    if summary.failed:
        err_console.print(f"[bold red]error:[/] {summary.failed} of {summary.total} cells failed; `medtune results "
                          f"--store {escape(shlex.quote(summary.store))} --failed` shows their errors. Fix the cause "
                          f"and rerun `{escape(resume)}`: finished cells are kept, failed ones are tried again.",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def print_verdicts(verdicts: dict) -> None:
    """The verdict lines exactly as `Verdict.lines()` gives them: no wrapping, no markup."""
    for v in verdicts.values():
        for line in v.lines():
            console.print(escape(line), soft_wrap=True, highlight=False,
                          style="yellow" if line.lstrip().startswith("caveat:") else None)


def interrupted(summary, resume: str) -> None:
    """Ctrl-C: what is kept, where, and the command that resumes; exit status 130 (128 + SIGINT)."""
    if summary is None or not summary.total:
        err_console.print(f"interrupted before the first cell; nothing was written. `{escape(resume)}` starts again.",
                          highlight=False, soft_wrap=True)
    else:
        kept = summary.skipped + summary.done + summary.elsewhere
        err_console.print(f"interrupted: {summary.done} cell(s) finished by this run, {kept} of {summary.total} in "
                          f"all, are kept in {escape(summary.store)}; the cell in flight was not recorded. "
                          f"`{escape(resume)}` resumes without redoing finished cells.",
                          highlight=False, soft_wrap=True)
    raise typer.Exit(130)


@app.command()
def results(
    store: Path = typer.Option(Path("results/medtune.sqlite"), "--store",
                               help="SQLite results store: the `store` of the config you ran (e.g. "
                                    "results/demo.sqlite for configs/demo.yaml)."),
    format: Fmt = typer.Option(Fmt.table, "--format",
                               help="Output format: table to read, csv or json for other tools."),
    failed: bool = typer.Option(False, "--failed", help="List failed cells and their errors instead."),
    wide: bool = typer.Option(False, "--wide", help="Every metric (accuracy, PPV, NPV, F1, PR-AUC, Brier too), "
                                                   "not only the ones that decide."),
) -> None:
    """Print a store's verdict and results table, or its failed cells.

    The verdict first (the recommended configuration, whether depth matters, its cost and caveats), then
    mean ± sd of each metric over folds (and seeds), one row per data set, backbone, strategy and head,
    the recommended row marked *; --failed lists the failed cells with their errors."""
    from medtune.evaluation.store import guarded

    try:
        with guarded(store, "reading it"):  # a damaged store: one paragraph, not pandas' traceback
            print_results(store, format, failed, wide=wide)
    except MedtuneError as exc:
        fail(exc)


LABELS = ["dataset", "backbone", "strategy", "head", "seed", "fold"]


def print_failed(cells, fmt: Fmt) -> None:
    """Failed cells: a table with each error's first line (the message; the traceback follows it), or
    csv/json records with the whole error."""
    bad = cells[cells.status == "failed"][["cell_id", *LABELS, "error"]].copy()
    bad["error"] = bad["error"].fillna("").astype(str)
    if fmt == Fmt.json:
        sys.stdout.write(bad.to_json(orient="records", indent=2) + "\n")
        return
    if fmt == Fmt.csv:
        sys.stdout.write(bad.to_csv(index=False))
        return
    if bad.empty:
        console.print("no failed cells.")
        return
    table = Table(title=f"{len(bad)} failed cells (`--format json` for the whole errors)")
    for c in [*LABELS, "error"]:
        table.add_column(c, overflow="fold")
    for r in bad.itertuples(index=False):
        first = next((line for line in r.error.splitlines() if line.strip()), "")
        table.add_row(*[escape(str(getattr(r, c))) for c in LABELS], escape(first))
    console.print(table)


PIPE_WIDTH = 120  # a log or a file: a fixed, readable width (a reader cannot widen it)
COMPACT = ["balanced_accuracy", "auc", "sensitivity", "specificity", "ece"]  # what decides; --wide for all


def table_width() -> int:
    """The width tables are fitted to: $COLUMNS when set, else the terminal's, else (a pipe, a file)
    PIPE_WIDTH."""
    import os

    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) >= 40:
        return int(cols)
    return console.width if sys.stdout.isatty() else PIPE_WIDTH


def print_table(table: Table) -> None:
    """Fit the table to `table_width()`: on a terminal its width, under a pipe at most PIPE_WIDTH, so a
    log reader, who cannot widen the window, never sees a number folded across lines."""
    width = min(table_width(), max(40, Console(width=100_000).measure(table).maximum))
    Console(width=width, force_terminal=sys.stdout.isatty() or None, highlight=False).print(table)


def results_tables(shown, labels: list[str], numbers: list[str], width: int) -> list[Table]:
    """`shown` as one rich table, or, when its numbers cannot fit `width` without folding a figure,
    several: each repeats the label columns and takes as many number columns as fit. Numbers never wrap
    (no_wrap); label columns may fold."""
    def make(cols: list[str]) -> Table:
        t = Table(show_lines=False)
        for c in labels:
            width = min(8, max(len(str(v)) for v in [c, *shown[c]]))
            t.add_column(c.replace("_", " "), overflow="fold", min_width=width)
        for c in cols:
            t.add_column(c.replace("_", " "), no_wrap=True, justify="right")
        for _, r in shown.iterrows():
            t.add_row(*[escape(str(r[c])) for c in [*labels, *cols]])
        return t

    parts: list[list[str]] = [[]]
    for c in numbers:
        if parts[-1] and Console(width=100_000).measure(make(parts[-1] + [c])).minimum > width:
            parts.append([])
        parts[-1].append(c)
    return [make(cols) for cols in parts]


def print_results(store: Path, fmt: Fmt, failed: bool, wide: bool = False, verdict: bool = True) -> dict:
    """The verdict (unless `verdict` is False: `run` prints it last) and the results table; returns
    {data set: Verdict} (evaluation/verdict.py) so the caller prints the same one."""
    import numpy as np

    from medtune.evaluation.diagnose import budget_lines
    from medtune.evaluation.evidence import RISK_NOTE, read_evidence, summary_table
    from medtune.report.html import SHORT, format_pm, trained_share
    from medtune.evaluation.store import open_store
    from medtune.evaluation.verdict import collapse_lines, pinned_lines, verdicts

    with open_store(store, must_exist=True) as s:
        if failed:
            print_failed(s.cells(), fmt)
            return {}
        empty = s.metrics().empty
        note = s.version_warning()
    if note:
        err_console.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if empty:
        console.print(f"{store}: no finished cells yet.")
        return {}
    ev = read_evidence(store)
    vs = verdicts(ev)
    summary = summary_table(ev.metrics)  # Brier and ECE at the training prevalence (evidence.RISK_NOTE)
    recommended = {v.group for v in vs.values()}
    share = ev.cells.set_index("cell_id")["info"].map(trained_share)
    shares = ev.metrics.assign(s=ev.metrics.cell_id.map(share)).groupby("group")["s"].mean()
    summary["recommended"] = summary.group.isin(recommended)  # last: csv readers keep their column order
    summary["trainable_share"] = summary.group.map(shares)
    if fmt == Fmt.csv:
        sys.stdout.write(summary.to_csv(index=False))
        return vs
    if fmt == Fmt.json:
        import json

        records = json.loads(summary.to_json(orient="records"))
        from medtune.evaluation.store import strict_json  # NaN (an undefined CI) as null: strict readers refuse NaN

        doc = {"verdict": {ds: v.to_dict() for ds, v in vs.items()}, "results": records, "probabilities": RISK_NOTE}
        sys.stdout.write(json.dumps(json.loads(strict_json(doc)), indent=2) + "\n")
        return vs
    if verdict:
        print_verdicts(vs)
    stopped = summary[summary.pruned != ""] if "pruned" in summary else summary.iloc[:0]
    shown = format_pm(summary.drop(columns=["pruned"], errors="ignore"), None if wide else COMPACT)
    if not wide:  # the main metric with its spread, the others' means: a row that fits 100 columns
        for c in COMPACT[1:]:
            if SHORT[c] in shown:
                shown[SHORT[c]] = [f"{v:.3f}" if np.isfinite(v) else "–" for v in summary[c]]
    shown.insert(0, "*", ["*" if r else "" for r in summary.recommended])
    shown["trained"] = [f"{100 * x:.2f}%" if np.isfinite(x) else "–" for x in summary.trainable_share]
    shown["s/cell"] = (summary.seconds / summary.n_cells).round(1)
    shown = shown.drop(columns=["seconds"])
    labels = [c for c in ["*", "dataset", "backbone", "strategy", "head", "variant"] if c in shown.columns]
    fixed = {c: shown[c].iloc[0] for c in ("dataset", "backbone", "head", "cells")
             if c in shown and shown[c].nunique() == 1}
    labels = [c for c in labels if c not in fixed]
    numbers = [c for c in shown.columns if c not in labels and c not in fixed]
    title = " · ".join([str(store), *(f"{v} cells" if c == "cells" else str(v) for c, v in fixed.items())])
    console.print(("mean ± sd over folds and seeds" if wide else "balanced accuracy mean ± sd, other metrics mean")
                  + " (cells = folds x seeds); * = recommended (the verdict); ECE of probabilities at the training "
                    "prevalence; --wide for every metric", soft_wrap=True, highlight=False)
    tables = results_tables(shown, labels, numbers, table_width())
    for i, table in enumerate(tables):  # the title as a line of its own: a long store path never wraps it
        console.print(escape(title) + (f" ({i + 1}/{len(tables)})" if len(tables) > 1 else ""), soft_wrap=True,
                      highlight=False)
        print_table(table)
    for line in collapse_lines(ev) + pinned_lines(ev) + budget_lines(ev.cells):
        # evaluation/diagnose.py: what the metrics do not shout
        console.print(f"[yellow]{escape(line)}[/]", soft_wrap=True)
    for _, r in stopped.iterrows():  # grid/racing.py: its row averages only the folds it ran
        console.print(f"pruned by racing ({int(r.n_cells)} cells): {escape(r.dataset)} {escape(r.backbone)} "
                      f"{escape(r.strategy)} {escape(r['head'])}: {escape(r.pruned)}")
    return vs


@app.command("list")
def list_(what: What = typer.Argument(..., help="What to list: backbones, strategies, heads, weights, or depths "
                                      "BACKBONE."),
          backbone: Optional[str] = typer.Argument(None, help="For `depths`: a backbone name."),
          random_init: bool = typer.Option(False, "--random-init", help="For `depths`: no weights needed."),
          json_out: bool = typer.Option(False, "--json", help="For `depths`: print JSON.")) -> None:
    """List the strategies, the heads, the backbones, the weight sources, or the depths of a backbone.

    Strategies: the names to use in a config, with their papers. Heads: the names `heads:` takes.
    Backbones: the studies' networks, with where their weights come from. Weights: the named
    pretrained sources and whether they resolve here. Depths: what the standard depth settings train
    (`medtune list depths resnet50 --random-init`)."""
    if what == What.depths:
        list_depths(backbone, random_init, json_out)
    elif what == What.strategies:
        from medtune.training.strategies import REGISTRY

        table = Table(title="strategies (registry keys usable in YAML)")
        for col in ("name", "what it does", "source", "parameters"):
            table.add_column(col, overflow="fold")
        for name in sorted(REGISTRY):
            cls = REGISTRY[name]
            params = ", ".join(f"{k}={v}" for k, v in cls().params().items())
            table.add_row(name, cls.summary, cls.citation, params or "–")
        console.print(table)
    elif what == What.heads:
        from medtune.models.heads import HEADS

        table = Table(title="heads (registry keys usable in `heads:`)")
        for col in ("name", "what it does"):
            table.add_column(col, overflow="fold")
        for name, cls in HEADS.items():
            table.add_row(name, cls.description)
        console.print(table)
    elif what == What.weights:
        from medtune.models.weights import rows, weights_dir

        table = Table(title=f"named weights (`weights: KEY` on a backbone; files are looked for in {weights_dir()})")
        for col in ("weights", "backbone", "kind", "status", "where"):
            table.add_column(col, overflow="fold")
        for r in rows():
            table.add_row(r["weights"], r["backbone"], r["kind"], r["status"], r["where"])
        console.print(table)
    else:
        from medtune.models.backbones import EMBEDDED, STUDY_BACKBONES, timm_name
        from medtune.models.weights import embedded_weights_path

        table = Table(title="backbones of the studies (any timm model name also works)")
        for col in ("name", "timm architecture", "weights"):
            table.add_column(col)
        for name in STUDY_BACKBONES:
            if name in EMBEDDED:
                src = "embedded (installed)" if embedded_weights_path(name) else f"embedded: {EMBEDDED[name].get}"
            else:
                src = "timm hub, or `checkpoint: FILE`"
            table.add_row(name, timm_name(name), src)
        console.print(table)


def list_depths(backbone: str | None, random_init: bool, json_out: bool) -> None:
    """The standard depth settings on one backbone: trained blocks and fraction of parameters."""
    import json

    from medtune.models.backbones import create_backbone
    from medtune.errors import ConfigError
    from medtune.training.strategies import PEFT_DEPTHS, STANDARD_DEPTHS, depth, parse_label

    if not backbone:
        raise typer.BadParameter("`medtune list depths` needs a backbone, e.g. `medtune list depths resnet50 "
                                 "--random-init`.")
    model = create_backbone(backbone, pretrained=not random_init, num_classes=2)
    rows, missing = [], []
    for label in (*STANDARD_DEPTHS, *PEFT_DEPTHS):
        try:  # lora needs the optional peft package: say so instead of failing the whole list
            rows.append({**depth(parse_label(label), model), "strategy": label})
        except ConfigError as exc:
            missing.append(f"{label}: {exc}")
    if json_out:
        sys.stdout.write(json.dumps({"backbone": backbone, "depths": rows, "unavailable": missing}, indent=2) + "\n")
        return
    table = Table(title=f"{backbone}: what each depth setting trains")
    for col in ("strategy", "params trained", "trainable blocks"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["strategy"], f"{100 * r['trainable_fraction']:.2f}% ({r['trainable_params']:,})",
                      ", ".join(r["trainable_blocks"]))
    console.print(table)
    for line in missing:
        console.print(f"not listed: {line}")


@data_app.command("check")
def data_check(
    target: Path = typer.Argument(..., help="A data folder (one sub-folder per class), a .csv manifest, a "
                                            "MedMNIST .npz, or an experiment YAML (every data set in it is checked, "
                                            "with its options, e.g. `split: official`)."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Folds to plan (default: the config's, else 5)."),
    near: int = typer.Option(8, "--near", help="Near-duplicate threshold: max differing bits of the 64-bit "
                                               "perceptual hash (default 8; the config's near_duplicates wins)."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Skip the perceptual-hash near-duplicate search."),
    group_pattern: Optional[str] = typer.Option(None, "--group-pattern", help="Regex reading a patient id from "
                                                                               "file names (folders only)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    show: int = typer.Option(5, "--show", help="How many unreadable files / duplicate groups to list."),
) -> None:
    """Check a data set before training: classes, unusable files, duplicates.

    Classes, sizes and modes, files that cannot be used, exact and near duplicates, label conflicts,
    and duplicates the planned folds would split across train/test.

    Exit status: 0 when `medtune run` can use the data (warnings alone, such as blank images,
    repeated manifest rows or near duplicates with different labels, stay 0); 1 when files cannot
    be used, a manifest gives one file two labels or patient ids, or identical images carry
    different labels; 2 when the target itself cannot be read."""
    from medtune.data.quality import check_targets

    try:
        reports = check_targets(target, folds, None if exact_only else near, group_pattern)
    except MedtuneError as exc:
        fail(exc)
    if json_out:
        import json

        sys.stdout.write(json.dumps([r.summary() for r in reports], indent=2) + "\n")
    else:
        for r in reports:
            print_quality(r, show)
    if any(r.failed for r in reports):
        raise typer.Exit(1)


def print_quality(r, show: int) -> None:

    s = r.summary()
    table = Table(title=f"data check: {s['dataset']} ({s['n_files']} files)", show_header=False)
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("classes", ", ".join(f"{c} {n}" for c, n in s["class_counts"].items()))
    table.add_row("sizes (most common)", ", ".join(f"{k} ×{v}" for k, v in s["sizes"].items()))
    table.add_row("modes", ", ".join(f"{k} ×{v}" for k, v in s["modes"].items()))
    table.add_row("cannot be used", str(s["unreadable"]))
    table.add_row("exact duplicates", f"{s['exact_groups']} groups ({s['exact_extra_images']} extra copies), "
                                      f"{s['exact_label_conflicts']} with conflicting labels")
    if s["near_threshold"] is not None:
        table.add_row(f"near duplicates (≤{s['near_threshold']} bits)",
                      f"{s['near_groups']} groups ({s['near_extra_images']} extra images), "
                      f"{s['near_label_conflicts']} with conflicting labels")
    plan = "official split (train+val vs test)" if s["official_split"] else f"{s['folds']}-fold plan"
    table.add_row(f"{plan}, duplicates ignored",
                  f"{s['exact_groups_straddling_folds']} exact and {s['near_groups_straddling_folds']} near groups "
                  f"would sit on both sides of a split" + (" (patient-grouped)" if s["grouped_by_patient"] else ""))
    console.print(table)
    for note in r.warnings:
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    for c in r.manifest_conflicts[:show]:
        console.print(f"[red]contradictory rows:[/] {escape(c)}", highlight=False, soft_wrap=True)
    if len(r.manifest_conflicts) > show:
        console.print(f"... and {len(r.manifest_conflicts) - show} more contradictory rows")
    bad = [f for f in r.files if f.error]
    for f in bad[:show]:
        console.print(f"[red]cannot be used:[/] {escape(f.error)}", highlight=False)
    if len(bad) > show:
        console.print(f"... and {len(bad) - show} more files that cannot be used")
    for kind, groups in (("exact", r.exact), ("near", r.near)):
        conflicts = r.conflicts(groups)
        across = r.across_splits(groups)
        for g in [*conflicts, *[g for g in across if g not in conflicts]][:show]:
            print_duplicate_group(r, kind, g, g in conflicts, g in across)
        for g in [g for g in groups if g not in conflicts and g not in across][:show]:
            console.print(f"{kind} duplicates: " + escape(", ".join(r.files[i].path for i in g)), highlight=False)
    if r.exact or r.near:
        console.print("Keep copies on one side of every split with `duplicates: group` (exact copies) and "
                      "`near_duplicates: N` (perceptual), or remove them; resolve conflicting labels by hand.")


def print_duplicate_group(r, kind: str, g: list[int], conflict: bool, across: bool) -> None:
    """One group of copies that matters: labelled differently, or in both train/val and test of an
    official split; members with their labels, so a mislabelled copy is visible."""
    what = (f"{kind} duplicates" + (" across splits" if across else "")
            + (" with conflicting labels" if conflict else ""))
    members = escape(", ".join(f"{r.files[i].path} [{r.class_names[r.files[i].label]}]" for i in g))
    console.print(f"[yellow]{what}:[/] {members}", highlight=False)


@app.command()
def init(
    data: Path = typer.Argument(..., help="A folder (one sub-folder per class), a .csv manifest "
                                          "(path,label[,patient_id]), a DICOM tree or a .npz file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Experiment file to write; default: <data name>.yaml "
                                                           "in the current folder."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Skip the perceptual-hash near-duplicate search."),
) -> None:
    """Write a commented experiment file for a data set.

    Inspects DATA: classes and counts, a suggested positive class, the patient ids found, the duplicates,
    and a grid sized to the data and this machine with its expected run time. `medtune run OUT` runs it
    as written."""
    from medtune.starter import duration, write_starter

    target = out or Path(f"{(data.stem if data.is_file() else data.resolve().name) or 'experiment'}.yaml")
    try:
        if target.exists() and not force:
            raise MedtuneError(f"{target} exists; pass --force to overwrite it, or --out another file.")
        path, insp, grid = write_starter(data, target, None if exact_only else 8)
    except MedtuneError as exc:
        fail(exc)
    console.print(f"{path}: {insp.n} images, {len(insp.class_names)} classes, {grid['folds']} folds, "
                  f"{len(grid['strategies'])} strategies, expected ~{duration(grid['total_seconds'])}. "
                  f"Read its comments, then `medtune run {path}`.", highlight=False)


@app.command()
def report(
    store: Path = typer.Option(Path("results/medtune.sqlite"), "--store", help="SQLite results store."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder; default: <store>.report/ beside the store."),
) -> None:
    """Write the HTML report of a store, and CSV/Markdown/LaTeX tables.

    One self-contained HTML file (tables with 95% CIs, depth plot, ROC, confusion, critical-difference
    diagram, training curves, Grad-CAM gallery, config) plus results.csv, results.md and results.tex."""
    from medtune.report.html import build_report

    from medtune.evaluation.store import guarded, open_store

    try:
        with guarded(store, "reading it"):
            with open_store(store, must_exist=True) as s:
                note = s.version_warning()
                statuses = dict(s.conn.execute("SELECT status, COUNT(*) FROM cells GROUP BY status").fetchall())
            if not statuses.get("done") and statuses.get("failed"):
                raise MedtuneError(f"every cell in {store} failed ({statuses['failed']} cells), so there is nothing to "
                                   f"report. `medtune results --store {shlex.quote(str(store))} --failed` shows why; "
                                   f"fix "
                                   "the cause and rerun `medtune run CONFIG`.")
            if note:
                err_console.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
            with working(f"report: reading {store} and computing the tables, confidence intervals and figures"):
                paths = build_report(store, out or Path(f"{store}.report"))
    except MedtuneError as exc:
        fail(exc)
    for kind, path in paths.items():
        console.print(f"{kind:>4}: {path}")


class TTA(str, Enum):
    none = "none"
    flip = "flip"


class ExportFormat(str, Enum):
    torchscript = "torchscript"
    onnx = "onnx"


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="A model directory, e.g. results/demo.sqlite.models/best."),
    format: list[ExportFormat] = typer.Option([ExportFormat.torchscript, ExportFormat.onnx], "--format",
                                              help="torchscript and/or onnx (repeatable; default both)."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Export one fold's model; default: the fold ensemble."),
) -> None:
    """Export the deployed model to TorchScript and ONNX.

    The fold ensemble becomes one graph (input: RGB in [0, 1]; normalisation and the average over folds
    inside), with preprocessing.json beside it."""
    from medtune.deploy.bundle import export as export_model

    try:
        for f in format:
            with working(f"export: loading {model_dir} and writing {f.value}"):
                out = export_model(model_dir, f.value, fold)
            console.print(f"{f.value}: {out}")
    except MedtuneError as exc:
        fail(exc)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A model directory, e.g. results/demo.sqlite.models/best."),
    images: list[Path] = typer.Argument(..., help="Image files, folders (plain or one sub-folder per class) or "
                                                  "CSV manifests (path,label)."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Folder for predictions.csv (and cam/)."),
    cam: bool = typer.Option(False, "--cam", help="Also save Grad-CAM overlays for the predicted class."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Use one fold's model; default: the mean of the fold "
                                                            "models' probabilities."),
    tta: TTA = typer.Option(TTA.none, "--tta", help="Test-time augmentation: flip also averages over each image's "
                                                   "horizontal mirror."),
) -> None:
    """Class probabilities for new images from a deployed model.

    Writes OUT/predictions.csv: by default the mean over the fold models; Grad-CAM overlays with --cam."""
    from medtune.deploy.predict import predict as run_predict

    try:
        with working(f"predict: loading {model} and predicting {len(images)} input(s)"):
            df = run_predict(model, images, out, cam=cam, fold=fold, tta=tta.value)
    except MedtuneError as exc:
        fail(exc)
    console.print(f"{len(df)} images -> {out / 'predictions.csv'}"
                  + (f"; Grad-CAM overlays in {out / 'cam'}" if cam else ""))
    if df["true"].notna().any():
        known = df[df["true"].notna()]
        console.print(f"accuracy on the {len(known)} labelled images: {(known.true == known.predicted).mean():.3f} "
                      "(optimistic if they include the model's own training images)")


@app.command()
def track(
    store: Path = typer.Option(Path("results/medtune.sqlite"), "--store", help="SQLite results store to copy."),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", help="MLflow tracking URI (a server, sqlite:///FILE, or "
                                                                 "a folder); default sqlite:///mlflow.db here."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment; default: the config's "
                                                                        "name."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not build and attach the HTML report."),
) -> None:
    """Copy a store's finished cells to MLflow.

    One run per cell (resolved config as params, final and per-epoch metrics, the kept model as
    artifacts) and one run with the report. Runs already there (tagged with the cell id) are kept, so
    tracking again adds only new cells."""
    from medtune.evaluation.store import guarded
    from medtune.report.tracking import track_store

    try:
        with guarded(store, "reading it"), working(f"track: copying the cells of {store} to MLflow"):
            s = track_store(store, mlflow, experiment, report=not no_report)
    except MedtuneError as exc:
        fail(exc)
    console.print(f"MLflow {s.uri}, experiment {s.experiment!r}: {s.created} runs created, {s.existing} already "
                  f"there. `mlflow ui --backend-store-uri {s.uri}` to browse.", highlight=False)


def main() -> None:  # pragma: no cover - console-script entry point
    app()
