"""The one training loop, read top to bottom.

A strategy's `phases` say, epoch by epoch, how fast each unit trains. The loop freezes what is at
0, gets its inputs from `features.Inputs` (the frozen prefix's cached output, or the views
themselves), and takes AdamW steps at lr x warm-up/cosine x the unit's scale. An epoch in which
only the linear classifier trains is a convex problem: the probe is fitted to convergence
(`models/probe.py`) instead. Early stopping keeps the epoch with the lowest loss on the inner
validation split. Device and precision live in `training/precision.py`, views and cache in `training/features.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.backbones import chain as unit_chain, classifier_param_names, feature_chain
from medtune.config import TrainConfig
from medtune.data.loaders import ImageTable
from medtune.errors import TrainingError
from medtune.training.features import (POOLED, FeatureCache, Forward, Inputs, Runtime, shared_cache)  # noqa: F401 - re-exported
from medtune.evaluation.metrics import balanced_accuracy
from medtune.training.precision import (Stepper, autocast_dtype, compile_pays, cpu_lanes, in_lanes,  # noqa: F401
                               inference_batch_size, prepare_model, resolve_device, set_seed)
from medtune.models.probe import fit_linear_probe, load_into
from medtune.training.strategies import Phase, Strategy, is_norm

TrainSettings = TrainConfig  # the one definition of every training hyperparameter


def fit(model: nn.Module, table: ImageTable, train_idx: np.ndarray, val_idx: np.ndarray, strategy: Strategy,
        settings: TrainSettings, rt: Runtime, seed: int = 0) -> "FitResult":
    """Train `model` on table[train_idx] with early stopping on table[val_idx]; returns the best epoch's model."""
    epochs = fit_epochs(model, table, train_idx, val_idx, strategy, settings, rt, seed)
    while True:
        try:
            next(epochs)
        except StopIteration as done:
            return done.value


def fit_epochs(model: nn.Module, table: ImageTable, train_idx: np.ndarray, val_idx: np.ndarray, strategy: Strategy,
               settings: TrainSettings, rt: Runtime, seed: int = 0) -> Iterator[dict]:
    """`fit`, pausing after each evaluated epoch: yields that epoch's history row, returns the
    FitResult. Successive halving (grid/select.py) advances several of these a few epochs at a time."""
    run = start_fit(model, table, train_idx, val_idx, strategy, settings, rt, seed)
    bn = settings.bn_statistics
    phases = strategy.phases(settings.epochs)
    for p, phase in enumerate(phases):
        bn = phase.bn or settings.bn_statistics
        chain = unit_chain(model, phase.unit)
        bad_epochs, probed = 0, False
        for e in range(phase.epochs):
            epoch = len(run.history)
            scale = epoch_scales(run, chain, phase, e)
            frozen = frozenset(n for n, s in scale.items() if s == 0)
            # a frozen block whose BatchNorm follows the batch (update_all) is no pure function of the image
            cut = run.fwd.cut(frozen, settings.cache and bn != "update_all")
            probe = bn != "update_all" and run.fwd.cut(frozen, True) == POOLED
            if probe and probed:  # the probe is fitted once per phase, not once per epoch
                continue
            probed = probed or probe
            choose_inputs(run, phases, p, cut, probe)
            if probe:  # only the classifier trains: fit it to convergence, once for the phase
                fit_probe(model, run.inputs, table, train_idx, val_idx, settings, seed, run.history)
                run.trained |= classifier_param_names(model)
            else:
                train_epoch(run, phase, e, epoch, scale, bn)
            val_loss, val_probs = validate_epoch(run, chain, scale, bn, probe)
            if len(val_idx) and val_loss < run.best[0] - 1e-6:
                run.best, bad_epochs = (val_loss, epoch, copy.deepcopy(model.state_dict())), 0
                run.best_val = (run.inputs.cut, run.inputs.rt.model_key, val_probs)
            else:
                bad_epochs += 1
            yield run.history[-1]
            if p == len(phases) - 1 and len(val_idx) and bad_epochs >= settings.patience:
                break  # early stopping only inside the last phase: an LP phase must not end the run
    return finish_fit(run, bn)


@dataclass
class Fitting:
    """One fit in progress: what `start_fit` set up once, and what the epochs accumulate."""

    model: nn.Module
    table: ImageTable
    train_idx: np.ndarray
    val_idx: np.ndarray
    strategy: Strategy
    settings: TrainSettings
    rt: Runtime
    t0: float
    gen: torch.Generator  # the epochs' order and the views' augmentation draw from it, in that order
    hits_before: int
    fwd: Forward
    compiled: bool
    rest: Callable  # fwd.rest, compiled where it pays
    groups: list[dict]  # the optimizer's per-tensor groups
    may_train: set[str]  # the tensors the strategy lets train at all
    start_state: dict[str, torch.Tensor]  # the pretrained tensors (L2-SP's reference)
    y_all: torch.Tensor
    weight: torch.Tensor | None  # class weights of the loss
    steps: int  # per epoch
    stepper: Stepper
    history: list[dict] = field(default_factory=list)
    best: tuple = (math.inf, -1, None)  # validation loss, epoch, state dict
    best_val: tuple | None = None  # the best epoch's validation pass: (cut, model key, probabilities)
    trained: set[str] = field(default_factory=set)  # tensors that received a gradient (or were probed)
    first_loss: float | None = None
    inputs: Inputs | None = None


def start_fit(model: nn.Module, table: ImageTable, train_idx: np.ndarray, val_idx: np.ndarray, strategy: Strategy,
              settings: TrainSettings, rt: Runtime, seed: int) -> Fitting:
    """Seed, adapt the model to the strategy, prepare it for the device, build the optimizer."""
    t0 = time.perf_counter()
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    strategy.adapt(model)  # LoRA/SSF add their tensors here (seeded); merged back at the end
    hits_before = rt.cache.hits if rt.cache else 0
    prepare_model(model, rt.device, rt.amp_dtype, settings.amp, settings.channels_last)
    fwd = Forward(model, feature_chain(model, image_size=min(64, table.image_size)) if settings.cache else None)
    compiled = compile_pays(rt.device, settings.compile)
    rest = torch.compile(fwd.rest) if compiled else fwd.rest  # the trained part; recompiles per cut
    optimizer = build_optimizer(model, strategy, settings)
    groups = optimizer.param_groups
    may_train = {g["name"] for g in groups if strategy.trains_tensor(g["name"], g["is_head"], g["norm"])}
    start_state = {n: p.detach().clone() for n, p in model.named_parameters() if n not in classifier_param_names(model)}
    y_all = torch.as_tensor(table.labels, device=rt.device)
    weight = (class_weights(table.labels[train_idx], table.num_classes).to(rt.device)
              if class_weight_mode(settings) else None)
    steps = max(1, math.ceil(len(train_idx) / settings.batch_size))
    return Fitting(model, table, train_idx, val_idx, strategy, settings, rt, t0, gen, hits_before, fwd, compiled,
                   rest, groups, may_train, start_state, y_all, weight, steps, Stepper(optimizer, rt.amp_dtype))


def epoch_scales(run: Fitting, chain, phase: Phase, e: int) -> dict[str, float]:
    """Each tensor's learning-rate scale in epoch `e` of the phase (0 for a tensor the strategy never
    lets train); a tensor at 0 stops requiring a gradient."""
    scales = unit_scales(chain, phase.scales(e, chain), run.strategy)
    scale = {n: s if n in run.may_train else 0.0 for n, s in scales.items()}
    for g in run.groups:
        g["params"][0].requires_grad_(scale[g["name"]] > 0)
    return scale


def choose_inputs(run: Fitting, phases: list[Phase], p: int, cut: int, probe: bool) -> None:
    """The epoch's inputs: the pooled features for a probe (under BatchNorm statistics refreshed on
    the training images when phase `p` asks and a later phase normalises with batch statistics), else
    the output of the frozen prefix up to `cut`; kept from the last epoch when that is the same."""
    settings, table = run.settings, run.table
    if probe and phases[p].refresh_bn and any((q.bn or settings.bn_statistics) == "update"
                                              for q in phases[p + 1:] if q.epochs):
        run.inputs = Inputs(table, run.fwd, POOLED, settings, refresh_statistics(run))
    elif run.inputs is None or run.inputs.cut != (POOLED if probe else cut):
        run.inputs = Inputs(table, run.fwd, POOLED if probe else cut, settings, run.rt)


def refresh_statistics(run: Fitting) -> Runtime:
    """Re-estimate the BatchNorm statistics on the training images (`refresh_bn_statistics`) and
    return the runtime under which features of the refreshed model are cached. The refresh is a
    pure function of the start weights, the images and the settings below, so while nothing has
    trained yet (LP-FT's first phase) its statistics are cached too: the candidates of a
    learning-rate choice on one fold pay the pass over every view of the training images once and
    load its result bit for bit. After any training the weights are the fit's own: nothing is shared."""
    settings, table, train_idx, rt = run.settings, run.table, run.train_idx, run.rt

    def refresh() -> dict[str, torch.Tensor]:
        refresh_bn_statistics(run.model, Inputs(table, run.fwd, 0, settings, rt), train_idx, settings.batch_size)
        return {k: v.detach().clone() for k, v in run.model.state_dict().items() if is_statistic(k)}

    if run.trained or rt.cache is None:
        refresh()
        return dataclasses.replace(rt, cache=None)
    images = hashlib.sha1(np.asarray(train_idx, np.int64).tobytes()).hexdigest()[:16]
    key = (*rt.model_key, "bn refreshed on", images, settings.batch_size)
    statistics = rt.cache.get((*key, table.fingerprint(), settings.views, settings.augment, str(rt.amp_dtype),
                               settings.amp, "statistics"), refresh)
    run.model.load_state_dict(statistics, strict=False)
    return dataclasses.replace(rt, model_key=key)  # the refreshed model's features, under their own key


def is_statistic(name: str) -> bool:
    """A BatchNorm buffer that `refresh_bn_statistics` sets."""
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def train_epoch(run: Fitting, phase: Phase, e: int, epoch: int, scale: dict[str, float], bn: str) -> None:
    """One epoch of AdamW steps over the training images in a seeded order (a trailing batch of one
    left out); appends the epoch's history row with its mean training loss."""
    set_train_mode(run.model, bn)
    order = run.train_idx[epoch_order(run.table.labels[run.train_idx], run.gen)]
    running, seen = 0.0, 0
    for step in range(run.steps):
        idx = order[step * run.settings.batch_size:(step + 1) * run.settings.batch_size]
        if len(idx) < 2 and step > 0:  # a trailing batch of one breaks BatchNorm; skip it
            continue
        loss = train_step(run, idx, phase, e, epoch, step, scale)
        running, seen = running + loss.item() * len(idx), seen + len(idx)
    check_finite(run.groups, scale, epoch, rate(run.settings.lr, scale))
    run.history.append({"epoch": epoch, "train_loss": running / max(seen, 1)})


def train_step(run: Fitting, idx: np.ndarray, phase: Phase, e: int, epoch: int, step: int,
               scale: dict[str, float]) -> torch.Tensor:
    """One minibatch: the loss (plus the strategy's penalty), a divergence check, the backward pass,
    the scheduled per-tensor rates, the strategy's gradient hook, clipping and the AdamW step.
    Returns the cross-entropy loss."""
    settings, groups, inputs, steps = run.settings, run.groups, run.inputs, run.steps
    x, y = inputs.batch(idx, train=True, gen=run.gen), run.y_all[torch.as_tensor(idx, device=run.rt.device)]
    with inputs.autocast():
        loss = F.cross_entropy(run.rest(x, inputs.cut).float(), y, weight=run.weight)
        total_loss = loss + run.strategy.penalty(run.model, run.start_state)
    value = float(total_loss.detach())
    run.first_loss = value if run.first_loss is None else run.first_loss
    if not math.isfinite(value) or value > 100 * max(run.first_loss, 1.0):  # NaN, inf or 100x the start
        raise TrainingError(f"the loss diverged to {value:.4g} at epoch {epoch}, step {step} (it started "
                            f"at {run.first_loss:.4g}; {rate(settings.lr, scale)}). Lower train.lr or keep "
                            "train.grad_clip on.")
    run.stepper.backward(total_loss)
    lr_t = settings.lr * cosine_lr(e * steps + step, phase.epochs * steps, int(settings.warmup_epochs * steps))
    for g in groups:
        g["lr"] = lr_t * scale[g["name"]]
    run.stepper.true_gradients()  # strategies and clipping see the true gradients
    run.strategy.after_backward(groups, step)
    run.trained |= {g["name"] for g in groups if g["params"][0].grad is not None}
    if settings.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.grad is not None], settings.grad_clip)
    run.stepper.step()
    return loss


def validate_epoch(run: Fitting, chain, scale: dict[str, float], bn: str, probe: bool) -> tuple[float, np.ndarray]:
    """The validation loss and balanced accuracy of the epoch just trained, with how it was trained,
    added to its history row; returns the validation loss and the predicted probabilities."""
    inputs = run.inputs
    val_loss, val_bacc, probs = evaluate(run.fwd, inputs, run.table, run.val_idx, run.rt, run.weight)
    run.history[-1].update({"val_loss": val_loss, "val_balanced_accuracy": val_bacc, "cut": inputs.cut, "bn": bn,
                            "elapsed_seconds": round(time.perf_counter() - run.t0, 3),  # since the fit started
                            "precision": str(inputs.dtype).removeprefix("torch.") if inputs.dtype else "float32",
                            "compiled": run.compiled and not probe,
                            "trainable_blocks": sum(1 for b in chain if any(scale[n] > 0 for n in b.param_names))})
    return val_loss, probs


def finish_fit(run: Fitting, bn: str) -> "FitResult":
    """The best epoch's weights (the last epoch's without a validation split), in eval mode, with an
    adapter merged back into plain weights."""
    model, settings, table, trained, fwd = run.model, run.settings, run.table, run.trained, run.fwd
    if run.best[2] is not None:
        model.load_state_dict(run.best[2])
    model.eval()
    sizes = {n: q.numel() for n, q in model.named_parameters()}
    fraction = sum(sizes[n] for n in trained) / sum(sizes.values())  # of the adapted model's parameters
    changed = run.strategy.merge(model)  # an adapter folded into plain weights: a plain timm model again
    if changed:
        trained = (trained & {n for n, _ in model.named_parameters()}) | changed
        fwd = Forward(model, feature_chain(model, image_size=min(64, table.image_size)) if settings.cache else None)
    names = {n for n, _ in model.named_parameters()}
    result = FitResult(model, run.history, run.best[1], time.perf_counter() - run.t0, fwd, settings, run.rt,
                       frozenset(names - trained), fraction,
                       (run.rt.cache.hits if run.rt.cache else 0) - run.hits_before, bn)
    if run.best[2] is not None and not changed and run.best_val[:2] == (result.cut(), run.rt.model_key):
        result.known = (table, run.val_idx, run.best_val[2])  # the same weights, inputs and code path
    return result


@dataclass
class FitResult:
    """A trained model and how it was trained; it predicts (`predict_proba`, `features`) from the
    deepest prefix that never trained, cached where the settings allow."""

    model: nn.Module
    history: list[dict]
    best_epoch: int
    seconds: float
    forward: Forward
    settings: TrainSettings
    rt: Runtime
    # bit-identical to the start weights (and their BatchNorm statistics unless update_all)
    never_trained: frozenset[str]
    trainable_fraction: float  # share of the parameters (by count) that received a gradient
    cache_hits: int = 0  # cache entries (frozen-prefix outputs, refreshed statistics) an earlier fit computed
    bn_statistics: str = "update"  # as applied in the last phase
    # (table, idx, probabilities) the best epoch's validation pass computed with these very weights,
    # from the same cut: asked again (a choice's inner scores, the stored inner_val predictions), they
    # are returned, not recomputed
    known: tuple | None = field(default=None, repr=False)
    _inputs: dict = field(default_factory=dict, repr=False)

    def cut(self) -> int:
        """Where prediction starts: the deepest prefix that never trained (cached where allowed)."""
        return self.forward.cut(self.never_trained, self.settings.cache and self.bn_statistics != "update_all")

    def inputs(self, table: ImageTable) -> Inputs:
        key = table.fingerprint()
        if key not in self._inputs:
            self._inputs = {key: Inputs(table, self.forward, self.cut(), self.settings, self.rt)}
        return self._inputs[key]

    def predict_proba(self, table: ImageTable, idx: np.ndarray) -> np.ndarray:
        if self.known is not None and table is self.known[0] and np.array_equal(idx, self.known[1]):
            return self.known[2].copy()
        return predict_proba(self.forward, self.inputs(table), idx, self.rt)

    def features(self, table: ImageTable, idx: np.ndarray) -> np.ndarray:
        """Penultimate (pre-logits) features, what the SVM head is fitted on."""
        return predict_proba(self.forward, self.inputs(table), idx, self.rt, features=True)


def fit_probe(model: nn.Module, inputs: Inputs, table: ImageTable, train_idx: np.ndarray, val_idx: np.ndarray,
              settings: TrainSettings, seed: int, history: list[dict]) -> None:
    """The linear probe on every view of the training images' pooled features (the training
    distribution), C chosen on the validation split's plain view."""
    x, pos = inputs.all_views(train_idx)
    x_val = inputs.cached[0, torch.as_tensor(val_idx)].float().numpy()
    # a balanced sampler's counterpart in a convex fit is the balanced class weight
    balanced = class_weight_mode(settings)
    res = fit_linear_probe(x.numpy(), table.labels[pos], x_val, table.labels[val_idx], table.num_classes,
                           balanced, seed)
    load_into(model.get_classifier(), res)
    history.append({"epoch": len(history), "train_loss": math.nan, "probe_C": res.C, "probe_C_grid": res.grid,
                    "probe_C_edge": res.edge})


def unit_scales(chain, scales: list[float], strategy: Strategy) -> dict[str, float]:
    """Per-tensor learning-rate scales from one scale per unit of the chain."""
    if len(scales) != len(chain):
        raise TrainingError(f"strategy {strategy.label()} returned {len(scales)} scales for {len(chain)} units")
    return {n: s for b, s in zip(chain, scales) for n in b.param_names}


def build_optimizer(model: nn.Module, strategy: Strategy, settings: TrainSettings) -> torch.optim.AdamW:
    """One AdamW group per tensor, built once, so optimizer state survives unfreezing and per-tensor
    strategies (Auto-RGN, BitFit) can act on single tensors."""
    head = classifier_param_names(model)
    groups = [{"params": [p], "name": n, "is_head": n in head, "norm": is_norm(n, p, model),
               "weight_decay": settings.weight_decay if p.ndim > 1 and strategy.decays_weights else 0.0}
              for n, p in model.named_parameters()]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=settings.lr, fused=fused or None)


def class_weight_mode(settings: TrainSettings) -> str | None:
    """"balanced" or None, from `train.class_weight` (one rule for the loss and the SVM head)."""
    return None if settings.class_weight == "none" else settings.class_weight


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights (scikit-learn's "balanced": n / (k n_c))."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Warm-up then cosine to zero; a pure function of the step within a phase (nanoGPT style)."""
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(labels: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """A permutation of the training positions. Imbalance is met by the class-weighted loss, not by
    resampling (measured better on 1:5 data: benchmarks/results/imbalance_synthetic.md)."""
    return torch.randperm(len(labels), generator=gen).numpy()


def rate(lr: float, scale: dict[str, float]) -> str:
    """The rate a phase trains at, as a divergence message names it: a phase whose largest scale is not
    1 (LP-FT's fine-tuning at ft_lr_scale) says so, else "lower train.lr" reads as the wrong number."""
    top = max(scale.values(), default=1.0)
    return f"lr {lr:g}" if top == 1 else f"lr {lr * top:g} = train.lr {lr:g} x this phase's scale {top:g}"


def check_finite(groups: list[dict], scale: dict[str, float], epoch: int, lr: str) -> None:
    """A step can overflow the weights without raising (CUDA's fused AdamW takes any lr): the next
    loss would be NaN, but after the last step there is no next loss to look at."""
    trained = [g["params"][0].detach() for g in groups if scale[g["name"]] > 0]
    if trained and not bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()):  # one sync
        raise TrainingError(f"the weights became inf/NaN at epoch {epoch} ({lr}): the run diverged. "
                            "Lower train.lr or keep train.grad_clip on.")


def set_train_mode(model: nn.Module, bn_statistics: str) -> None:
    """Train mode, with BatchNorm as `bn_statistics` asks:
    update: BatchNorm of trained blocks normalises with batch statistics; frozen blocks keep theirs,
      so a frozen block really is frozen.
    keep: every BatchNorm normalises with its running statistics (eval mode), so the model validated
      and tested is the one trained. Measured (5 folds, balanced accuracy): on the demo grid (160
      training images a fold, lr 3e-4) full_ft 0.53 +- 0.09 with update (training loss still 0.46
      after 8 epochs) and 0.96 +- 0.06 with keep, partial_ft 0.88 and 0.80; on BUSI at lr 1e-3 for 3
      epochs the other way round: full_ft 0.80 +- 0.01 with update, 0.64 +- 0.20 with keep, partial_ft
      0.83 and 0.76. Without batch statistics a high learning rate is not tamed: keep needs a lower one.
    update_all: every BatchNorm uses batch statistics, frozen blocks too."""
    model.train()
    if bn_statistics == "update_all":
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())  # recursing: SSF's scale and shift live in a submodule
            if bn_statistics == "keep" or (params and not any(p.requires_grad for p in params)):
                m.eval()


@torch.no_grad()
def refresh_bn_statistics(model: nn.Module, images: "Inputs", idx: np.ndarray, batch_size: int) -> None:
    """Re-estimate every BatchNorm's running statistics on every view of table[idx] (AdaBN, Li et al.
    2016): forward passes with only BatchNorm in train mode, its momentum off so the statistics are
    the mean over the batches, in a fixed order. No weight changes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    was = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    views = images.s.views
    order = [(v, s) for v in range(views) for s in range(0, len(idx), batch_size)]
    for v, s in order:
        part = torch.as_tensor(idx[s:s + batch_size])
        if len(part) < 2:  # a batch of one has no variance
            continue
        with images.autocast():
            model(images.images(part, torch.full_like(part, v)))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was)


@torch.no_grad()
def evaluate(fwd: Forward, inputs: Inputs, table: ImageTable, idx: np.ndarray, rt: Runtime,
             weight: torch.Tensor | None) -> tuple[float, float, np.ndarray | None]:
    """Validation loss, balanced accuracy and the probabilities (view 0, eval mode)."""
    if len(idx) == 0:
        return math.nan, math.nan, None
    probs = predict_proba(fwd, inputs, idx, rt)
    y = table.labels[idx]
    p = torch.as_tensor(probs)
    loss = F.nll_loss(torch.log(p.clamp_min(1e-12)), torch.as_tensor(y),
                      weight=None if weight is None else weight.cpu())
    return float(loss), balanced_accuracy(y, probs), probs


@torch.no_grad()
def predict_proba(fwd: Forward, inputs: Inputs, idx: np.ndarray, rt: Runtime, features: bool = False) -> np.ndarray:
    """Class probabilities (or penultimate features) for table[idx], view 0, eval mode."""
    if len(idx) == 0:  # keep the shape: run one image, return none
        return predict_proba(fwd, inputs, np.arange(1), rt, features)[:0]
    was = fwd.model.training
    fwd.model.eval()
    gen = torch.Generator().manual_seed(0)  # view 0 draws nothing from it
    bs = inference_batch_size(rt.device, inputs.table.image_size)

    def one(part: np.ndarray) -> torch.Tensor:
        x = inputs.batch(part, train=False, gen=gen)
        with torch.no_grad(), inputs.autocast():  # both are per thread
            if features:
                return fwd.features(x, inputs.cut).float().cpu()
            return torch.softmax(fwd.rest(x, inputs.cut).float(), 1).cpu()

    out = in_lanes(one, [idx[s:s + bs] for s in range(0, len(idx), bs)], cpu_lanes(rt.device))
    fwd.model.train(was)
    return torch.cat(out).numpy()
