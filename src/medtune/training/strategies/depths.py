"""What a strategy trains, asked without training: the blocks and share of parameters it trains on a
model (`depth`, the depth tables), the standard depth settings, and whether it trains below the head
or depends on the learning rate at all."""

from __future__ import annotations

from typing import Any

from torch import nn

from medtune.models.backbones import Block
from medtune.training.strategies.base import Strategy, is_norm

STANDARD_DEPTHS = ("linear_probe", "partial_ft(fraction=0.05)", "partial_ft(fraction=0.15)", "partial_ft(fraction=0.3)",
                   "partial_ft(fraction=0.5)", *(f"blockwise_ft(blocks={n})" for n in range(1, 6)),
                   "surgical(block='first')", "surgical(block='middle')", "surgical(block='last')", "full_ft")


PEFT_DEPTHS = ("bitfit", "ssf", "lora")  # parameter-efficient: every unit, a few tensors of each


def scheduled_params(strategy: Strategy, model: nn.Module, epochs: int = 10) -> set[str]:
    """The parameters the schedule trains in some epoch, after the strategy's per-tensor rule
    (`trains_tensor`) but before any rule that depends on gradients (Auto-SNR's), which only the
    fit itself records. `model` must already be adapted for a strategy that adapts it."""
    from medtune.models.backbones import chain, classifier_param_names

    head = classifier_param_names(model)
    allowed = {n for n, p in model.named_parameters() if strategy.trains_tensor(n, n in head, is_norm(n, p, model))}
    out: set[str] = set()
    for phase in strategy.phases(epochs):
        units = chain(model, phase.unit)
        for e in range(phase.epochs):
            out |= {n for b, s in zip(units, phase.scales(e, units)) if s > 0 for n in b.param_names}
    return out & allowed


def depth(strategy: Strategy, model: nn.Module, epochs: int = 10) -> dict[str, Any]:
    """What a strategy trains on `model`, in the papers' blocks: each block trained in full or in
    part (`name (k/n tensors)`), and the fraction of the parameters (by count) that train (of the
    adapted model's, for an adapter: what an optimiser would hold)."""
    import copy

    from medtune.models.backbones import blocks, forget

    adapts = type(strategy).adapt is not Strategy.adapt  # only an adapter changes the model: copy for it alone
    adapted = copy.deepcopy(model) if adapts else model
    strategy.adapt(adapted)
    try:
        trained = scheduled_params(strategy, adapted, epochs)
        sizes = {n: p.numel() for n, p in adapted.named_parameters()}
        names = []
        plain = [b.name for b in blocks(model)]  # the plain model's block names (an adapter's tensors rename some)
        chain_ = blocks(adapted)
        for i, b in enumerate(chain_):
            k = sum(1 for n in b.param_names if n in trained)
            name = plain[i] if len(plain) == len(chain_) else b.name
            if k:
                names.append(name if k == len(b.param_names) else f"{name} ({k}/{len(b.param_names)} tensors)")
        return {"strategy": strategy.label(), "trainable_blocks": names, "n_blocks": len(blocks(adapted)),
                "trainable_fraction": sum(sizes[n] for n in trained) / sum(sizes.values()),
                "trainable_params": sum(sizes[n] for n in trained)}
    finally:
        if adapts:
            forget(adapted)


def trains_backbone(strategy: Strategy, epochs: int) -> bool:
    """Whether any phase trains something below the head, asked of a long generic chain (no model
    needed): the SVM head on a strategy that never does can skip training altogether."""
    chain = ([Block(f"b{i}", (f"b{i}.weight",), n_layers=1) for i in range(999)]
             + [Block("head", ("head.weight",), n_layers=1)])
    return any(any(s > 0 for s in phase.scales(e, chain)[:-1])
               for phase in strategy.phases(epochs) for e in range(phase.epochs))


def uses_learning_rate(strategy: Strategy, epochs: int, bn_statistics: str) -> bool:
    """Whether the learning rate can change what a strategy learns. A strategy that only ever trains
    the classifier on frozen features (with BatchNorm statistics not following the batch) is fitted
    by the convex probe (`models/probe.py`), which has no learning rate: a learning-rate choice for it would
    train identical candidates."""
    return trains_backbone(strategy, epochs) or any(
        (phase.bn or bn_statistics) == "update_all" for phase in strategy.phases(epochs) if phase.epochs)
