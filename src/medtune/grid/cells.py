"""One cell of the grid: its data, its configuration and id, its training and scoring, and how its
outcome is recorded in the store and shown while the grid runs. `Grid` is the whole grid of an
experiment as one iterable (data set x backbone x strategy x seed x fold x head), yielding `Cell`s.

Everything an executor needs to run cells lives here, so the local loop (grid/runner.py), the Ray
executor (grid/distributed.py) and the deployed-model refit (deploy/bundle.py) all import from this module and
none of them imports the grid orchestration back: there is no import cycle between them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

import numpy as np
import torch

from medtune.version import __version__
from medtune.models.backbones import default_image_size
from medtune.config import AUTO_DEPTH, ExperimentConfig
from medtune.data.loaders import ImageTable, load_dataset, manifest_columns
from medtune.evaluation.diagnose import collapse, describe
from medtune.errors import MedtuneError, TrainingError
from medtune.models import heads
from medtune.models import probe
from medtune.models.heads import DECISION_RULES, full_proba, head_class
from medtune.evaluation.metrics import clinical_metrics
from medtune.grid.select import ETA, cell_strategies, strategy_label, train_cell
from medtune.data.splits import (LeaveOneSiteOut, OfficialSplit, PatientKFold, apply_duplicate_policy,
                                   assert_disjoint, check_foldable, inner_split)
from medtune.data.subsets import FULL, SUBSET_RULE, is_full, size_label, size_of, train_subset
from medtune.evaluation.store import Store
from medtune.training.loop import Runtime, TrainSettings, autocast_dtype, resolve_device
from medtune.version import RESULTS_VERSION


# --------------------------------------------------------------------------- data preparation
@dataclass
class PreparedData:
    """A data set at one image size, with its groups after the duplicate policy and its folds."""

    table: ImageTable
    groups: np.ndarray | None
    duplicates: dict
    positive: str | None
    folds: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    official: bool = False  # `split: official`: the source's own train+val vs test, one "fold"
    inner: dict[tuple, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    sites: np.ndarray | None = None  # `cv: by_site`: leave-one-site-out folds instead of k-fold
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # manifest columns per image (subgroups)
    external: dict[str, ImageTable] = field(default_factory=dict)  # `test_datasets`, predicted without refitting

    def splitter(self, n_folds: int, seed: int) -> PatientKFold | LeaveOneSiteOut | OfficialSplit:
        """The outer folds' splitter (data/splits.py): leave one site out under `cv: by_site`, the
        source's own train/test under `split: official` (n_folds and seed unused for both), else
        patient-grouped stratified k-fold."""
        if self.sites is not None:
            return LeaveOneSiteOut(self.sites, self.table.name)
        if self.official:
            return OfficialSplit(self.table.split)
        return PatientKFold(n_folds, seed)

    def splits(self, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The outer (train, test) folds, computed once per seed (once in all for sites and official)."""
        key = "by_site" if self.sites is not None else "official" if self.official else seed
        if key not in self.folds:
            self.folds[key] = list(self.splitter(n_folds, seed).split(None, self.table.labels, self.groups))
        return self.folds[key]

    def train_fold(self, n_folds: int, seed: int, fold: int, size: float | int = FULL) -> np.ndarray:
        """The training side of an outer fold at a training-set size (data/subsets.py): the whole
        fold at the full size, else a nested, stratified, patient-intact subset of it."""
        train_idx = self.splits(n_folds, seed)[fold][0]
        return train_subset(train_idx, self.table.labels, self.groups, size, seed, fold, self.table.class_names,
                            self.table.name)

    def fit_val(self, n_folds: int, seed: int, fold: int, fraction: float,
                size: float | int = FULL) -> tuple[np.ndarray, np.ndarray]:
        """The (fit, validation) inner split of an outer training fold (at a size: of its subset, by
        the same rule), computed once: every cell of the fold shares it (a grouped split of BUSI
        takes 0.2 s, paid twice per cell before)."""
        key = (n_folds, seed, fold, fraction, size)
        if key not in self.inner:
            train_idx = self.train_fold(n_folds, seed, fold, size)
            self.inner[key] = inner_split(train_idx, self.table.labels, self.groups, fraction, seed)
        return self.inner[key]


def n_folds_of(ds, folds: int) -> int:
    """The fold count a config alone tells: an official train/test split is a single fold
    (OfficialSplit), otherwise the config's k. Folds that come from the data (`cv: by_site`) are
    counted by the prepared data's splitter (runner: `expand`'s `n_folds_by`)."""
    return 1 if ds.options.get("split") == "official" else folds


def record_of(data: PreparedData, positive: str | None, role: str = "train") -> dict:
    """The store's record of a data set: counts, duplicates, and per sample (by table position) the
    patient cluster for the bootstrap and the subgroup columns."""
    t = data.table
    clusters = (np.unique(data.groups.astype(str), return_inverse=True)[1].tolist() if data.groups is not None
                else None)
    return {"duplicates": data.duplicates, "n": len(t), "class_counts": t.class_counts(),
            "grouped": data.groups is not None, "patient_ids": t.groups is not None, "positive": positive,
            "role": role, "clusters": clusters,
            "subgroups": {k: [str(x) for x in v] for k, v in data.attributes.items()}}


def prepare_external(ext, image_size: int, class_names: list[str]) -> PreparedData:
    """A `test_datasets` entry at one image size: same classes in the same order as the training set,
    its own duplicate policy, no folds (it is only ever predicted)."""
    opts = dict(ext.options)
    if ext.group_pattern:
        opts["group_pattern"] = ext.group_pattern
    table = load_dataset(ext.path, source=ext.source, image_size=image_size, name=ext.display_name(), **opts)
    if table.class_names != class_names:
        raise MedtuneError(f"test data set {ext.display_name()!r} has classes {table.class_names}; the training data "
                           f"has {class_names}. An external set must use the same class names.")
    table, groups, record = apply_duplicate_policy(table, ext.duplicates, ext.near_duplicates)
    return PreparedData(table, groups, record, ext.positive)


def prepare(ds, image_size: int, n_folds: int, columns: list[str] = (), cv: str = "kfold") -> PreparedData:
    opts = dict(ds.options)
    split = opts.pop("split", "merged")
    if split not in ("official", "merged"):
        raise MedtuneError(f"data set {ds.display_name()!r}: options.split must be official or merged, not {split!r}.")
    if ds.group_pattern:
        opts["group_pattern"] = ds.group_pattern
    table = load_dataset(ds.path, source=ds.source, image_size=image_size, name=ds.display_name(), **opts)
    if ds.positive is not None and ds.positive not in table.class_names:
        raise MedtuneError(f"data set {ds.display_name()!r}: positive class {ds.positive!r} is not one of "
                           f"{table.class_names}.")
    table, groups, record = apply_duplicate_policy(table, ds.duplicates, ds.near_duplicates)
    if split == "official":
        if table.split is None or not (table.split == "test").any() or (table.split == "test").all():
            raise MedtuneError(f"data set {ds.display_name()!r}: `split: official` needs a source with its own "
                               "train/test split (a MedMNIST .npz); use `split: merged` for k-fold CV.")
        train, test = (table.split != "test"), (table.split == "test")
        leaked = {table.digests[i] for i in np.flatnonzero(train)} & {table.digests[i] for i in np.flatnonzero(test)}
        if leaked:
            raise MedtuneError(f"data set {ds.display_name()!r}: the official split has {len(leaked)} identical "
                               "image(s) in both train/val and test; set `duplicates: drop` or use `split: merged`.")
        return PreparedData(table, groups, record, ds.positive, official=True)
    names = list(dict.fromkeys([*columns, *(["site"] if cv == "by_site" else [])]))
    attrs: dict[str, np.ndarray] = {}
    if names:
        values = manifest_columns(ds.path, names, ds.options.get("root"))
        attrs = {n: np.asarray([values[n].get(p, "") for p in table.paths], dtype=object) for n in names}
    if cv == "by_site":
        data = PreparedData(table, groups, record, ds.positive, sites=attrs["site"], attributes=attrs)
        data.splits(0, 0)  # checks the sites now, before any training
        return data
    check_foldable(table.labels, groups, table.class_names, n_folds, ds.display_name())
    return PreparedData(table, groups, record, ds.positive, attributes=attrs)


# --------------------------------------------------------------------------- cells
def settings_from(cfg: ExperimentConfig) -> TrainSettings:
    """The loop's settings. A chosen `lr` is NaN here: each candidate replaces it (grid/select.py), so a
    path that forgot to would fail loudly instead of training at a guessed rate."""
    return cfg.train.model_copy(update={"lr": math.nan}) if isinstance(cfg.train.lr, dict) else cfg.train


def cell_id(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def numerics() -> dict:
    """The module constants that change a cell's numbers (the searched grids, their bounds and steps,
    halving's ETA), hashed into every cell id: changing one can never reuse numbers computed under
    another, without waiting for a hand-bumped RESULTS_VERSION."""
    return {"probe_C_grid": list(probe.C_GRID), "probe_C_bounds": list(probe.C_BOUNDS), "probe_C_step": probe.C_STEP,
            "svm_C_grid": list(heads.C_GRID), "svm_C_bounds": list(heads.C_BOUNDS), "svm_C_step": heads.C_STEP,
            "knn_k_grid": list(heads.K_GRID), "halving_eta": ETA}


def precision_of(cfg: ExperimentConfig, device: torch.device) -> str:
    """The dtype a cell computes in, `amp: auto` resolved on the device that runs it: CPU-fp32 and
    GPU-bf16 cells differ in numbers, so they differ in id. Under Ray with GPUs the worker's GPU
    decides; the driver may have none, so the id says what it knows (autocast on CUDA, or fp32)."""
    if cfg.executor == "ray" and cfg.device != "cpu" and cfg.gpus_per_cell > 0:
        return "float32" if cfg.train.amp == "off" else "cuda autocast"
    dtype = autocast_dtype(device, cfg.train.amp)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def data_key(name: str, image_size: int) -> str:
    """The key of a data set at one image size (`name@size`): what prepared data, fingerprints and
    fold counts are looked up by."""
    return f"{name}@{image_size}"


def data_key_of(cell: Mapping) -> str:
    """The `data_key` of the data a cell trains and tests on."""
    return data_key(cell["dataset"], cell["config"]["backbone"]["image_size"])


@dataclass(frozen=True, eq=False)
class Cell(Mapping):
    """One cell of the grid. Read-only, and a Mapping with the keys of the dict a cell was before
    (`cell["config"]`, `cell.get(...)`, `{**cell}`, equal to that dict), so every consumer (the store,
    racing, deploy, Ray's pickling) reads it as it read the dict. `config` is what `cell_id` hashes."""

    cell_id: str
    run_id: str
    dataset: str
    backbone: str
    strategy: str  # the strategy's label (the full strategy is config["strategy"])
    head: str
    fold: int
    n_folds: int
    seed: int
    config: dict

    def __getitem__(self, key: str) -> Any:
        if key not in CELL_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(CELL_KEYS)

    def __len__(self) -> int:
        return len(CELL_KEYS)

    @property
    def data_key(self) -> str:
        return data_key_of(self)

    @property
    def train_size(self) -> float | int:
        """The share (or number) of the fold's training patients the cell trains on (data/subsets.py)."""
        return size_of(self.config)


CELL_KEYS = tuple(f.name for f in fields(Cell))


class Grid:
    """Every cell of an experiment, after scikit-learn's ParameterGrid: iterating is one
    `itertools.product` over the axes data set x backbone x strategy x seed x fold x head (head
    innermost: cells differing only in head share training), in that order, which is the order of
    the store's to-do list. A data set's fold count is `n_folds_by[data_key]` when given (folds that
    come from the data, `cv: by_site`: one per site), else the config's (`n_folds_of`); the fold
    axis runs to the largest and each data set keeps its own first folds. `train_sizes` (learning
    curves) runs between backbone and strategy, smallest first, so an interrupted grid holds whole
    sizes. `precision` is
    precision_of the device that runs the grid (default: the config's device here)."""

    def __init__(self, cfg: ExperimentConfig, run_id: str, fingerprints: dict[str, str],
                 n_folds_by: dict[str, int] | None = None, precision: str | None = None) -> None:
        if precision is None:
            device = resolve_device(cfg.device) if cfg.executor == "local" else torch.device("cpu")
            precision = precision_of(cfg, device)
        self.cfg, self.run_id, self.fingerprints, self.precision = cfg, run_id, fingerprints, precision
        self.train = cfg.train.model_dump(exclude={"compile"})  # how it runs, like `device`: not what it computes
        self.numerics = numerics()
        sizes = [bb.image_size or default_image_size(bb.name) for bb in cfg.backbones]
        self.n_folds = {data_key(ds.display_name(), size): (n_folds_by or {}).get(data_key(ds.display_name(), size))
                        or n_folds_of(ds, cfg.folds) for ds in cfg.datasets for size in sizes}
        self.axes = {
            "dataset": list(cfg.datasets),
            "backbone": list(zip(cfg.backbones, sizes)),  # with its image size
            "train_size": list(cfg.train_sizes),  # learning curves (data/subsets.py); [1.0] without
            "strategy": [(s, strategy_label(s)) for s in cell_strategies(cfg)],  # with its label
            "seed": list(cfg.seeds),
            "fold": range(max(self.n_folds.values(), default=0)),  # each data set runs its own first n_folds
            "head": list(cfg.heads),  # innermost: cells differing only in head share training
        }

    def __iter__(self) -> Iterator[Cell]:
        for ds, (bb, size), train_size, (strategy, label), seed, fold, head in itertools.product(*self.axes.values()):
            n_folds = self.n_folds[data_key(ds.display_name(), size)]
            if fold < n_folds:
                config = self.config(ds, bb, size, strategy, head, fold, n_folds, seed, train_size)
                yield Cell(cell_id(config), self.run_id, ds.display_name(), bb.name, label, head, fold, n_folds, seed,
                           config)

    def __len__(self) -> int:
        a = self.axes
        folds = sum(self.n_folds[data_key(ds.display_name(), size)] for ds in a["dataset"] for _, size in a["backbone"])
        return folds * len(a["train_size"]) * len(a["strategy"]) * len(a["seed"]) * len(a["head"])

    def config(self, ds, bb, size: int, strategy: dict, head: str, fold: int, n_folds: int, seed: int,
               train_size: float | int = FULL) -> dict:
        """What a cell computes, hashed into its id: every key and value here is in the id of every
        cell already stored, so a change here makes each of them run again."""
        cfg = self.cfg
        config = {
            "dataset": {**ds.model_dump(), "fingerprint": self.fingerprints[data_key(ds.display_name(), size)]},
            "backbone": {**bb.model_dump(), "image_size": size},
            "strategy": strategy,
            "head": head, "fold": fold, "n_folds": n_folds, "seed": seed, "train": self.train,
            "results_version": RESULTS_VERSION, "precision": self.precision,
            "numerics": self.numerics,
        }
        if cfg.test_datasets:  # what a cell predicts besides its test fold is part of it
            config["test_datasets"] = [{**t.model_dump(), "fingerprint": self.fingerprints[
                data_key(t.display_name(), size)]} for t in cfg.test_datasets]
        if cfg.cv != "kfold":
            config["cv"] = cfg.cv
        if cfg.halving:  # it can change the choice, so it is part of the cell
            config["halving"] = True
        if not is_full(train_size):  # the full size writes nothing: cells stored before sizes existed resume
            config["train_size"] = train_size
            config["subset_rule"] = SUBSET_RULE  # how the subset is drawn: a new rule never reuses old cells
        return config


def expand(cfg: ExperimentConfig, run_id: str, fingerprints: dict[str, str],
           n_folds_by: dict[str, int] | None = None, precision: str | None = None) -> list[Cell]:
    """Every cell of the grid, in order (Grid): read-only Mappings, JSON-serialisable as dicts, with
    their ids. `n_folds_by` gives the fold count of data sets whose folds come from the data
    (`cv: by_site`: one per site); `precision` is precision_of the device that runs the grid
    (default: the config's device here)."""
    return list(Grid(cfg, run_id, fingerprints, n_folds_by, precision))


def model_key(cell: dict) -> tuple:
    """What the frozen weights depend on: the cache key of a backbone. Random-init weights depend on
    the cell's seed (the model is built right after `set_seed`), pretrained ones do not."""
    b = cell["config"]["backbone"]
    random_init = not b["pretrained"] and not b["checkpoint"] and not b.get("weights")
    return (b["name"], b["pretrained"], b["checkpoint"], b.get("weights"), b.get("sha256"), b["image_size"],
            cell["config"]["seed"] if random_init else None)


@dataclass
class CellResult:
    metrics: dict[str, float]
    predictions: tuple
    info: dict
    seconds: float
    state_dict: dict | None = None
    head_model: Any = None  # the fitted feature head (heads.HEADS), kept with the state dict (keep_model)
    extra: list = field(default_factory=list)  # (kind, data set, idx, y, probs): inner_val and external predictions


def run_cell(cell: dict, data: PreparedData, settings: TrainSettings, rt: Runtime,
             keep_model: bool = False) -> CellResult:
    """Train and evaluate one cell: outer fold `fold` of `n_folds`, with the inner split for early
    stopping (and the SVM's C). Everything that happens is recorded in `info`."""
    t0 = time.perf_counter()
    c = cell["config"]
    table, groups = data.table, data.groups
    test_idx = data.splits(c["n_folds"], c["seed"])[c["fold"]][1]
    train_idx = data.train_fold(c["n_folds"], c["seed"], c["fold"], size_of(c))
    assert_disjoint(train_idx, test_idx, table, groups, duplicates=data.duplicates.get("policy") != "ignore")
    info: dict[str, Any] = {"n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
                            "n_train_patients": n_patients_in(train_idx, groups),
                            "train_class_counts": np.bincount(table.labels[train_idx],
                                                              minlength=table.num_classes).tolist()}
    head = c["head"]
    # Training is a function of the cell without its head (train_for_cell never sees it): the memo
    # only saves cells that differ in head from training the same network again.
    fit_key = training_key(c)
    memo = rt.fit_memo if rt.fit_memo is not None else {}
    if fit_key in memo:
        strategy, result, picked = memo[fit_key]
        info["shared_training_with_other_head"] = True
    else:
        strategy, result, picked = train_for_cell(c, data, train_idx, settings, rt)
        memo.clear()  # keep one: the next cell with the same training is the next head
        memo[fit_key] = (strategy, result, picked)
    if picked:
        info["auto_depth" if c["strategy"]["name"] == AUTO_DEPTH else "choice"] = picked
    fit_idx, val_idx = data.fit_val(c["n_folds"], c["seed"], c["fold"], settings.val_fraction, size_of(c))
    class_weight = c["train"]["class_weight"]
    # one rule for both heads (models/heads.py): the same class weighting, argmax under the same priors
    info.update({"class_weight": class_weight, "decision_rule": DECISION_RULES[class_weight]})
    feature_head = None
    head_cls = head_class(head)
    if head_cls.on_features:
        feats = lambda idx: result.features(table, idx)  # noqa: E731
        feature_head = head_cls(class_weight=class_weight, seed=c["seed"]).fit(
            feats(fit_idx), table.labels[fit_idx], feats(val_idx), table.labels[val_idx], table.num_classes,
            groups=None if groups is None else groups[fit_idx])
        key = head_cls.info_key
        info[key] = feature_head.chosen_
        info.setdefault("grids", {})[key] = feature_head.grid_
        if feature_head.edge_:
            info.setdefault("grid_edges", {})[key] = feature_head.edge_
        probs = full_proba(feature_head, feats(test_idx), table.num_classes)
        other = lambda tbl, idx: full_proba(feature_head, result.features(tbl, idx), table.num_classes)  # noqa: E731
    else:
        probs = result.predict_proba(table, test_idx)
        other = result.predict_proba
    # the inner validation split's predictions (operating points are chosen there, never on the test
    # fold) and each external set's, by the same model without refitting
    extra = ([("inner_val", cell["dataset"], val_idx, table.labels[val_idx], other(table, val_idx))]
             if len(val_idx) else [])
    for name, ext in data.external.items():
        every = np.arange(len(ext))
        extra.append(("external", name, every, ext.labels, other(ext, every)))
    if not np.isfinite(probs).all():  # never metrics of NaN predictions
        raise TrainingError(f"the trained model predicts inf/NaN probabilities (lr {settings.lr:g}): the run "
                            "diverged. Lower train.lr or keep train.grad_clip on.")
    y = table.labels[test_idx]
    metrics = clinical_metrics(y, probs, table.class_names, positive=data.positive)
    collapsed = collapse(y, probs, table.class_names)
    if collapsed:
        info["collapsed"] = collapsed
    record_training(info, result, strategy, settings)
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()} if keep_model else None
    preds = (test_idx, [table.paths[i] for i in test_idx], y, probs)
    return CellResult(metrics, preds, info, time.perf_counter() - t0, state,
                      feature_head if keep_model else None, extra)


def n_patients_in(idx: np.ndarray, groups: np.ndarray | None) -> int:
    """Patients (groups; images without them) among table positions `idx`: a learning curve's x."""
    return int(len(np.unique(groups[idx].astype(str)))) if groups is not None else int(len(idx))


def record_training(info: dict, result, strategy, settings: TrainSettings) -> None:
    """What a cell's training did, into its `info`: epochs, the strategy, the probe's C."""
    # budget: a best epoch that is the last one run says more epochs might have helped (diagnose); a
    # convex probe runs no epochs (one fit to convergence), so the question does not arise (None)
    convex = any("probe_C" in h for h in result.history)
    last = bool(result.history) and result.best_epoch == len(result.history) - 1
    info.update({"best_epoch": result.best_epoch, "history": result.history, "epochs_run": len(result.history),
                 "epochs_scheduled": settings.epochs, "best_epoch_is_last": None if convex else last,
                 "strategy_label": strategy.label(), "bn_statistics": result.bn_statistics,
                 "trainable_fraction": result.trainable_fraction, "cache_hits": result.cache_hits})
    if result.history:
        info["trainable_blocks"] = [h["trainable_blocks"] for h in result.history]
    probe = [h for h in result.history if "probe_C" in h]
    if probe:  # the (last) probe's C, the grid searched and whether it is still at a bound
        info["probe_C"] = probe[-1]["probe_C"]
        info.setdefault("grids", {})["probe_C"] = probe[-1]["probe_C_grid"]
        if probe[-1]["probe_C_edge"]:
            info.setdefault("grid_edges", {})["probe_C"] = probe[-1]["probe_C_edge"]


def training_key(c: dict) -> str:
    """What a cell's training depends on: its config without the head."""
    return cell_id({k: v for k, v in c.items() if k != "head"})


def train_for_cell(c: dict, data: PreparedData, train_idx: np.ndarray, settings: TrainSettings, rt: Runtime):
    """The training part of a cell: (strategy used, FitResult, record of the choice made on inner splits
    or None). It takes no head: every head is fitted on the one network its strategy trained, so a
    cell's numbers never depend on which heads are listed, in what order, or on the executor."""
    fit_idx, val_idx = data.fit_val(c["n_folds"], c["seed"], c["fold"], settings.val_fraction, size_of(c))
    return train_cell(c, data.table, data.groups, train_idx, fit_idx, val_idx, settings, rt)


# --------------------------------------------------------------------------- recording and showing outcomes
@dataclass
class RunSummary:
    run_id: str
    total: int
    skipped: int
    done: int
    failed: int
    seconds: float
    store: str
    duplicates: dict = field(default_factory=dict)
    best_models: list[str] = field(default_factory=list)
    collapsed: list[str] = field(default_factory=list)  # diagnose.describe of each flagged cell
    pruned: dict[str, str] = field(default_factory=dict)  # racing: {group key: "candidate: why it stopped"}
    elsewhere: int = 0  # cells of this run's to-do list that other processes sharing the store finished


def _warn(line: str) -> None:
    """One warning, one line wherever it goes (soft_wrap: a terminal wraps it, a log keeps it whole
    for grep, where rich would break it at 80 columns)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def record(store: Store, cell: dict, outcome: CellResult | str, summary: RunSummary) -> str:
    """Write one finished cell (or its error) to the store; the only place cells are written."""
    if isinstance(outcome, CellResult):
        outcome.info.setdefault("medtune_version", __version__)
        store.save_cell(cell, "done", outcome.metrics, outcome.predictions, outcome.seconds, info=outcome.info,
                        extra=outcome.extra)
        summary.done += 1
        if outcome.info.get("collapsed"):  # said where the run is watched, not only in the store
            summary.collapsed.append(describe(cell, outcome.info["collapsed"]))
            _warn(summary.collapsed[-1])
        return "done"
    store.save_cell(cell, "failed", error=outcome)
    summary.failed += 1
    return "failed"


def execute(cell: dict, data: PreparedData, settings: TrainSettings, rt: Runtime,
            keep_model: bool = False) -> CellResult | str:
    """Run a cell; a user-fixable problem or a crash inside the cell becomes its recorded error."""
    try:
        return run_cell(cell, data, settings, rt, keep_model)
    except torch.cuda.OutOfMemoryError:
        return (f"out of memory on {rt.device} (batch_size {settings.batch_size}, image size "
                f"{cell['config']['backbone']['image_size']}). Lower train.batch_size or the backbone's image_size.")
    except MedtuneError as exc:
        return str(exc)
    except (RuntimeError, ValueError) as exc:
        if "out of memory" in str(exc).lower():
            return f"out of memory: {exc}. Lower train.batch_size or image_size."
        if "overflow" in str(exc).lower():
            return (f"numeric overflow while training (lr {settings.lr:g}): {exc}. The run diverged; "
                    "lower train.lr or keep train.grad_clip on.")
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"


class GridProgress:
    """Progress that fits where it runs. On a terminal, rich's live bar. Anywhere else (a pipe, a file,
    a CI log), where a live bar prints nothing until it stops, one flushed line per finished cell:
    its labels, status, balanced accuracy, seconds, cells done / total and the ETA, so a log of a
    long grid is never silent. Both executors report through this one class.

    N in "[n/N]" is the cells left when this run (or racing round) started; n counts those finished
    since, here or by another process sharing the store. Only the process that ran a cell prints its
    line, so across the logs of runs sharing a store each finished cell is printed once.

    The ETA prices each remaining cell at the mean seconds of the finished cells of its kind
    (backbone, strategy, head), an unseen kind at the mean of all, and turns cell-seconds into wall
    clock at the rate so far (so parallel Ray workers count). A plain mean over all cells ran low
    for the whole second half of a grid that runs the cheap linear probes first."""

    def __init__(self, cells: list[dict], title: str, enabled: bool = True, stream=None) -> None:
        import sys

        self.total, self.title, self.enabled = len(cells), title, enabled
        self.stream = stream or sys.stdout
        self.live = enabled and self.stream.isatty()
        self.done = 0
        self.left = [cell_kind(c) for c in cells]  # the kinds still to finish (with repeats)
        self.seconds: dict[tuple, list[float]] = {}  # finished cells' seconds by kind
        self.t0 = self.last = time.perf_counter()
        self.said_waiting = False

    def __enter__(self) -> "GridProgress":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # the ETA column is this class's estimate, not rich's mean rate (see the class docstring)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=self.total, eta="–")
        elif self.enabled:
            print(self.title, file=self.stream, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.stop()

    def starting(self, cell: dict) -> None:
        if self.live:
            self.bar.update(self.task, description=labels(cell))

    def finished(self, cell: dict, outcome: "CellResult | str") -> None:
        now = time.perf_counter()
        seconds = outcome.seconds if isinstance(outcome, CellResult) else now - self.last
        self.last, self.done = now, self.done + 1
        kind = cell_kind(cell)
        if kind in self.left:
            self.left.remove(kind)
        self.seconds.setdefault(kind, []).append(seconds)
        eta = format_seconds(self.eta(now)) if self.done < self.total else "done"
        if self.live:
            self.bar.update(self.task, advance=1, description=f"{labels(cell)}: {status_text(outcome)}", eta=eta)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {labels(cell)}: {status_text(outcome)}, {seconds:.1f} s; "
                  f"ETA {eta}", file=self.stream, flush=True)

    def elsewhere(self, cell: dict) -> None:
        """A cell another process sharing the store finished: it counts, it is not printed here."""
        self.done += 1
        if (kind := cell_kind(cell)) in self.left:
            self.left.remove(kind)
        if self.live:
            self.bar.update(self.task, advance=1)

    def waiting(self, n: int, store: str) -> None:
        """Said once: every cell left is running in another process; this one waits for them."""
        if self.said_waiting:
            return
        self.said_waiting = True
        text = f"waiting for {n} cell(s) that other runs sharing {store} are computing"
        if self.live:
            self.bar.update(self.task, description=text)
        elif self.enabled:
            print(text, file=self.stream, flush=True)

    def eta(self, now: float) -> float:
        """Seconds of wall clock left (see the class docstring)."""
        spent = sum(map(sum, self.seconds.values()))
        mean_all = spent / max(sum(map(len, self.seconds.values())), 1)
        priced = sum(float(np.mean(self.seconds[k])) if k in self.seconds else mean_all for k in self.left)
        return (now - self.t0) * priced / spent if spent > 0 else mean_all * len(self.left)


def cell_kind(cell: dict) -> tuple:
    """What a cell's cost depends on most: backbone, strategy, head and training-set size (not fold or seed)."""
    return cell["backbone"], cell["strategy"], cell["head"], size_of(cell.get("config") or {})


def labels(cell: dict) -> str:
    size = size_of(cell.get("config") or {})
    return (f"{cell['dataset']} {cell['backbone']} {cell['strategy']} {cell['head']} seed {cell['seed']} "
            f"fold {cell['fold']}" + ("" if is_full(size) else f" size {size_label(size)}"))


def status_text(outcome: "CellResult | str") -> str:
    if isinstance(outcome, CellResult):
        return f"balanced_accuracy {outcome.metrics.get('balanced_accuracy', float('nan')):.3f}"
    first = next((line for line in outcome.splitlines() if line.strip()), "")
    return f"FAILED: {first[:160]}"


def format_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


