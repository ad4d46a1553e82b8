"""`medtune init PATH`: look at a data set and write a commented experiment file to start from.

Everything the file says is read from the data (classes and counts, patient ids in file names or
a manifest's `patient_id` column or the DICOM headers, exact and near duplicates, the folds the
smallest class allows) or from measured figures (the expected run time: the images' decoding timed
while inspecting them, and a cost model of each strategy's cells fitted to measured runs,
benchmarks/results/init_estimate.json, scaled for a GPU by docs/gpu.md's figure). The recipe is
chosen on inner splits, not fixed: the learning rate by successive halving of a four-value list. The
file is a plain experiment file: `medtune run FILE` accepts it unchanged, and every choice in it
is a line to edit.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtune.errors import DataError

# The learning rate every rate-using strategy chooses on its inner split, by successive halving.
LR_CHOICE = [1e-4, 3e-4, 1e-3, 3e-3]
# Cost model of one outer fold's cell on a 2-thread CPU (EfficientNet-Lite0 at 224 px, batch 32):
# (fixed seconds, seconds per training image and scheduled candidate-epoch), fitted to the demo's
# cells at the recipe `init` writes (benchmarks/init_estimate.py --fit; the rows and how they were
# measured are in benchmarks/results/init_estimate.json). The per-image figure absorbs how early
# stopping ends a schedule on average and the frozen-prefix pass of a fold; the linear probe's unit
# is one pass over the training images.
COST = {"full_ft": (0.0, 0.06903), "linear_probe": (0.0, 0.06205), "partial_ft": (0.0, 0.01255)}
COST_THREADS = 2
# Measured: the demo's 15 cells took 70 s on an H100 against 199.2 s of cells on that CPU
# (docs/gpu.md; benchmarks/results/demo_speed.json "cell_seconds", 2026-11-23).
GPU_OVER_CPU = 70.0 / 199.2

POSITIVE_WORDS = ("malignan", "cancer", "carcinoma", "tumor", "tumour", "melanoma", "positive", "abnormal",
                  "disease", "pneumonia", "covid", "fracture", "lesion", "patholog", "referable")
NEGATIVE_WORDS = ("normal", "benign", "negative", "healthy", "control", "no_finding", "nofinding")
# Tried in order on the file names; the first that reads an id from every name, with at least one id
# shared by two files, is suggested (P012_left.png, 0042-2.png, case_7_a.dcm).
GROUP_PATTERNS = (r"^([A-Za-z]+[-_]?\d+)[-_ .]", r"^(\d+)[-_ ]", r"(?i)(?:patient|subject|case|pat|sub)[-_ ]?(\d+)")


@dataclass
class Inspection:
    """What `init` found in a data set."""

    path: Path
    source: str
    class_names: list[str]
    counts: dict[str, int]
    paths: list[str]
    labels: list[str]
    groups: np.ndarray | None = None
    group_pattern: str | None = None
    groups_from: str | None = None  # "file names" | "the manifest's patient_id column" | "DICOM PatientID"
    duplicates: dict = field(default_factory=dict)
    near_skipped: str | None = None  # why near duplicates were not searched: "--exact-only" or the missing extra

    @property
    def n(self) -> int:
        return len(self.paths)

    def units_per_class(self) -> dict[str, int]:
        """Patients per class when grouped, else images: what bounds the number of folds."""
        if self.groups is None:
            return dict(self.counts)
        out: dict[str, set] = {c: set() for c in self.class_names}
        for c, g in zip(self.labels, self.groups):
            out[c].add(g)
        return {c: len(s) for c, s in out.items()}


def detect_group_pattern(names: list[str]) -> str | None:
    """The first of GROUP_PATTERNS that reads an id from every file name with some id repeated."""
    for pattern in GROUP_PATTERNS:
        rx = re.compile(pattern)
        ids = [m.group(1) if (m := rx.search(n)) else None for n in names]
        if all(ids) and 1 < len(set(ids)) < len(ids):
            return pattern
    return None


def suggest_positive(counts: dict[str, int]) -> tuple[str | None, str]:
    """(class, why): a class whose name says disease, else the rarest class that does not say healthy."""
    names = list(counts)
    for c in names:
        if any(w in c.lower() for w in POSITIVE_WORDS):
            return c, f"its name reads as the finding ({c!r})"
    candidates = [c for c in names if not any(w in c.lower() for w in NEGATIVE_WORDS)] or names
    if len(names) == 2 or candidates != names:
        c = min(candidates, key=lambda k: counts[k])
        return c, "the rarest class whose name does not read as healthy; check it"
    return None, "no class name reads as the finding; set `positive` to the class sensitivity is about"


def inspect(path: str | Path, near: int | None = 8) -> Inspection:
    """Classes, groups and duplicates of a folder, manifest, DICOM tree or .npz."""
    from medtune.data.loaders import list_folder, load_npz, read_manifest
    from medtune.data.dicom import is_dicom, patient_ids
    from medtune.data.quality import check_files, check_table

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: give a folder (one sub-folder per class), a .csv manifest "
                        "(path,label[,patient_id]), a DICOM tree or a .npz file.")
    if path.suffix.lower() == ".npz":
        table = load_npz(path, 64)
        labels = [table.class_names[y] for y in table.labels]
        insp = Inspection(path, "npz", table.class_names, dict(Counter(labels)), list(table.paths), labels)
        report = check_table(table, 5, near)
        insp.near_skipped = None if near is not None else "--exact-only"
    else:
        if path.suffix.lower() == ".csv":
            files, y, class_names, groups = read_manifest(path)
            source, groups_from = "manifest", "the manifest's patient_id column"
        else:
            files, y, class_names, groups = list_folder(path)
            source, groups_from = "folder", None
        labels = [class_names[i] for i in y]
        insp = Inspection(path, source, class_names, {c: labels.count(c) for c in class_names},
                          [str(f) for f in files], labels, groups)
        if groups is None and files and all(is_dicom(f) for f in files):
            insp.source = "dicom"
            insp.groups = patient_ids(files)
            groups_from = "DICOM PatientID" if insp.groups is not None else None
        if insp.groups is None and source == "folder":
            insp.group_pattern = detect_group_pattern([f.name for f in files])
            if insp.group_pattern:
                rx = re.compile(insp.group_pattern)
                insp.groups = np.asarray([rx.search(f.name).group(1) for f in files], dtype=object)
                groups_from = "file names"
        insp.groups_from = groups_from if insp.groups is not None else None
        insp.near_skipped = None if near is not None else "--exact-only"
        try:
            report = check_files(insp.paths, list(y), class_names, 5, near, insp.groups, path.name)
        except DataError:  # no imagehash: exact copies only
            report = check_files(insp.paths, list(y), class_names, 5, None, insp.groups, path.name)
            insp.near_skipped = "pip install 'medtune[data]' for the perceptual hash"
    s = report.summary()
    example = lambda groups: [[Path(report.files[i].path).name for i in g] for g in groups[:3]]  # noqa: E731
    insp.duplicates = {**s, "exact_examples": example(report.exact), "near_examples": example(report.near)}
    return insp


def plan(insp: Inspection, cuda: bool, cpus: int, load_seconds: float = 0.0) -> dict:
    """Folds, epochs, strategies, the recipe chosen on inner splits and the expected seconds of each
    strategy (`cell_seconds`), sized to the data and the machine. `load_seconds`: decoding the
    images once, as measured while inspecting them."""
    smallest = min(insp.units_per_class().values())
    folds = max(2, min(5, smallest))
    epochs = 15 if insp.n < 300 else 10  # small sets: few steps an epoch, early stopping ends it sooner
    strategies = ["linear_probe", {"name": "partial_ft", "fraction": 0.15}, "full_ft"]
    if cuda:  # cheap on a GPU: the two-phase and regularised recipes as well
        strategies += ["lp_ft", "l2_sp"]
    n_train = insp.n * (folds - 1) / folds
    seconds = {}
    for s in strategies:
        key = s if isinstance(s, str) else s["name"]
        seconds[key] = folds * cell_seconds(key, n_train, epochs, len(LR_CHOICE), halving=True) * (
            GPU_OVER_CPU if cuda else 1.0)
    return {"folds": folds, "epochs": epochs, "strategies": strategies, "seconds": seconds, "lr": LR_CHOICE,
            "halving": True, "load_seconds": load_seconds, "total_seconds": sum(seconds.values()) + load_seconds,
            "smallest": smallest, "cuda": cuda, "cpus": cpus}


def cell_seconds(strategy: str, n_train: float, epochs: int, n_rates: int, halving: bool) -> float:
    """Expected seconds of one outer fold's cell on COST_THREADS CPU threads (COST). A strategy without
    a measured row is priced as full fine-tuning; lp_ft as its probe plus full fine-tuning."""
    from medtune.grid.select import halving_epochs

    if strategy == "linear_probe":
        fixed, per = COST["linear_probe"]
        return fixed + per * n_train
    work = halving_epochs(n_rates, epochs) if halving else n_rates * epochs
    fixed, per = COST.get(strategy, COST["full_ft"])
    extra = cell_seconds("linear_probe", n_train, epochs, n_rates, halving) if strategy == "lp_ft" else 0.0
    return fixed + per * n_train * work + extra


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render(insp: Inspection, grid: dict, data_path: str) -> str:
    """The experiment file's text: YAML with comments that give the reasons."""
    import yaml

    stem = insp.path.stem if insp.path.is_file() else insp.path.name
    name = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "data"
    positive, why = suggest_positive(insp.counts)
    d = insp.duplicates
    lines = [f"# Written by `medtune init {data_path}`: edit any line; `medtune run THIS_FILE` runs it.",
             f"# {insp.n} images in {len(insp.class_names)} classes: "
             + ", ".join(f"{c} {insp.counts[c]}" for c in insp.class_names) + ".",
             f"# Sizes (most common): {', '.join(f'{k} x{v}' for k, v in d.get('sizes', {}).items()) or 'n/a'}."]
    if insp.groups is not None:
        lines.append(f"# Patients: {len(set(insp.groups))} ids read from {insp.groups_from}; folds keep each "
                     "patient's images on one side of every split.")
    else:
        lines.append("# Patients: no patient ids found (file names, manifest, DICOM headers), so images are split "
                     "one by one; if a patient has several images, add `group_pattern` (or a patient_id column), "
                     "or the scores will be optimistic.")
    lines.append(f"# Exact duplicates: {d['exact_groups']} groups ({d['exact_extra_images']} extra copies, "
                 f"{d['exact_label_conflicts']} with conflicting labels)"
                 + (f", e.g. {', '.join(d['exact_examples'][0])}" if d["exact_examples"] else "") + ".")
    if d.get("near_threshold") is not None:
        lines.append(f"# Near duplicates (perceptual hash, <= {d['near_threshold']} of 64 bits): {d['near_groups']} "
                     f"groups ({d['near_extra_images']} extra images, {d['near_label_conflicts']} with conflicting "
                     "labels)" + (f", e.g. {', '.join(d['near_examples'][0])}" if d["near_examples"] else "") + ".")
    else:
        lines.append(f"# Near duplicates: not searched ({insp.near_skipped or 'exact copies only'}).")
    lines.append("# `medtune data check` on this folder lists every duplicate group. `duplicates: group` keeps "
                 "identical images on one side of every split" + (", `near_duplicates` near copies too." if
                                                                   d.get("near_groups") else "."))
    lines.append(f"# Positive class: {positive} ({why})." if positive else f"# Positive class: none suggested ({why}).")
    if insp.group_pattern:
        lines.append(f"# group_pattern reads the patient id from file names, e.g. {Path(insp.paths[0]).name}.")
    ds: dict = {"name": name, "path": data_path}
    if insp.source in ("dicom", "npz"):
        ds["source"] = insp.source
    if insp.group_pattern:
        ds["group_pattern"] = insp.group_pattern
    if positive:
        ds["positive"] = positive
    ds["duplicates"] = "group"
    if d.get("near_groups"):
        ds["near_duplicates"] = int(d["near_threshold"])
    where = "a CUDA GPU" if grid["cuda"] else f"this CPU ({grid['cpus']} cores)"
    total = grid["total_seconds"]
    cfg = {"name": name, "datasets": [ds], "backbones": [{"name": "efficientnet_lite0", "image_size": 224}],
           "strategies": grid["strategies"], "heads": ["softmax"], "folds": grid["folds"], "seeds": [0],
           "train": {"epochs": grid["epochs"], "batch_size": 32, "patience": 3, "lr": {"choose": grid["lr"]}},
           "halving": grid["halving"], "store": f"results/{name}.sqlite"}
    body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)
    notes = {
        "backbones:": "# EfficientNet-Lite0 with ImageNet weights ships with medtune (works offline); "
                      "`medtune list backbones` for others",
        "strategies:": "# three depths of fine-tuning (`medtune list strategies`); expected time on "
                       + where + ": " + ", ".join(f"{k} {duration(v)}" for k, v in grid["seconds"].items()),
        "folds:": f"# folds: the smallest class has {grid['smallest']} "
                  + ("patients" if insp.groups is not None else "images") + f"; {grid['folds']} folds keep each "
                  "class in every test fold",
        "train:": f"# {grid['epochs']} epochs at most (early stopping on an inner split, patience 3); each outer "
                  "training fold chooses its learning rate from lr's list on its own inner validation split "
                  "(never the test fold). Expected in all: ~" + duration(total) + f" on {where} (decoding the "
                  f"images ~{duration(grid['load_seconds'])}, measured while inspecting them; the cells from "
                  "medtune's cost model, measured" + ("" if grid["cuda"] else f" on {COST_THREADS} threads; more "
                  "cores: faster") + ").",
        "halving:": "# successive halving of the learning-rate choice: every rate trains the first part of its "
                    "schedule, the best continue to the end (docs/config.md)",
    }
    out = []
    for line in body.splitlines():
        for prefix, note in notes.items():
            if line.startswith(prefix):
                out.append(note)
        out.append(line)
    return "\n".join(lines) + "\n" + "\n".join(out) + "\n"


def write_starter(path: str | Path, out: str | Path, near: int | None = 8) -> tuple[Path, Inspection, dict]:
    """Inspect `path` and write the experiment file `out`; (out, what was found, the grid)."""
    import torch

    t0 = time.perf_counter()
    insp = inspect(path, near)
    grid = plan(insp, torch.cuda.is_available(), os.cpu_count() or 1, time.perf_counter() - t0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(insp, grid, str(path)))
    return out, insp, grid
