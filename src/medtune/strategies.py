"""Fine-tuning strategies: each is a schedule of learning-rate scales over the block chain.

A strategy answers, epoch by epoch, how fast each block trains (`lr_scales`, stem -> head,
0.0 = frozen), and may add a penalty to the loss (`penalty`) and adjust per-tensor learning
rates or gradients after the backward pass (`after_backward`). That is the whole contract; the
one training loop in `train.py` does the rest. The head (last block) is new for every task and
always trains.

Every strategy is a frozen dataclass whose fields are its hyperparameters, registered under the
snake_case key used in YAML, the CLI, the store and the report.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medtune.errors import ConfigError

REGISTRY: dict[str, type["Strategy"]] = {}


def register(cls: type["Strategy"]) -> type["Strategy"]:
    REGISTRY[cls.name] = cls
    return cls


def list_strategies() -> list[str]:
    return sorted(REGISTRY)


def create_strategy(name: str, **params: Any) -> "Strategy":
    """The one way in: `create_strategy("partial_ft", blocks=2)`. Bad names and keys are errors."""
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown strategy {name!r}.{hint} Known: {', '.join(list_strategies())}.")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(f"strategy {name!r} has no parameter {', '.join(unknown)}; its parameters are "
                          f"{', '.join(sorted(fields)) or 'none'}.")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    try:
        strategy = cls(**params)
        strategy.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
    return strategy


def is_norm(name: str, param: Tensor, model: nn.Module | None = None) -> bool:
    """Normalisation parameters (BatchNorm/GroupNorm/LayerNorm affine) by module type when the
    model is given, by name otherwise."""
    if model is not None:
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
    return any(t in name for t in ("bn", "norm", "downsample.1")) and param.ndim == 1


@dataclass(frozen=True)
class Strategy:
    """Decides, epoch by epoch, which blocks train and how fast."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    citation: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ValueError on impossible hyperparameters (called by `create_strategy`)."""

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        raise NotImplementedError

    def penalty(self, model: nn.Module, start_state: dict[str, Tensor]) -> Tensor | float:
        return 0.0

    def after_backward(self, groups: list[dict], step_in_epoch: int) -> None:
        """Called after each backward pass with the optimizer's per-tensor groups (keys `params`,
        `name`, `block`, `lr`), which the trainer has just set from the schedule and `lr_scales`."""

    def total_epochs(self, epochs: int) -> int:
        return epochs

    def phase_starts(self, epochs: int) -> list[int]:
        """Epochs at which the warm-up + cosine schedule restarts (a new training phase)."""
        return [0]

    def uses_weight_decay(self) -> bool:
        return True

    def keeps_bn_statistics(self) -> bool:
        """True: every BatchNorm normalises with its running statistics throughout (eval mode),
        also where its affine parameters train."""
        return False

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """Registry key plus non-default hyperparameters: the strategy's name in tables."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        extra = [f"{k}={v}" for k, v in self.params().items() if v != defaults[k]]
        return f"{self.name}({', '.join(extra)})" if extra else self.name

    def trains_backbone(self, epochs: int, n_blocks: int = 12) -> bool:
        return any(any(s > 0 for s in self.lr_scales(e, n_blocks)[:-1]) for e in range(self.total_epochs(epochs)))


def head_only(n_blocks: int) -> list[float]:
    return [0.0] * (n_blocks - 1) + [1.0]


def top_k(n_blocks: int, k: int) -> list[float]:
    """The head plus the top `k` blocks below it."""
    k = max(0, min(k, n_blocks - 1))
    return [0.0] * (n_blocks - 1 - k) + [1.0] * (k + 1)


@register
@dataclass(frozen=True)
class LinearProbe(Strategy):
    name: ClassVar[str] = "linear_probe"
    summary: ClassVar[str] = "Backbone frozen; only the new classifier head trains."
    citation: ClassVar[str] = "Kumar et al., ICLR 2022; Davila et al. 2024"

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return head_only(n_blocks)


@register
@dataclass(frozen=True)
class FullFT(Strategy):
    name: ClassVar[str] = "full_ft"
    summary: ClassVar[str] = "Every block trains at the same learning rate."
    citation: ClassVar[str] = "Davila et al. 2024"

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return [1.0] * n_blocks


@register
@dataclass(frozen=True)
class PartialFT(Strategy):
    """Bal-Ghaoui et al. 2023 fine-tune "the last X% of layers" (15% best for ResNet50 and
    InceptionV3): `fraction` counts parameterised blocks from the top. `blocks` gives the depth
    as a number of blocks instead. Exactly one of the two is used (`blocks` wins when set)."""

    name: ClassVar[str] = "partial_ft"
    summary: ClassVar[str] = "The last k blocks (or last p% of blocks) and the head train; the rest is frozen."
    citation: ClassVar[str] = "Bal-Ghaoui et al. 2023"
    blocks: int | None = None
    fraction: float = 0.15

    def validate(self) -> None:
        if self.blocks is not None and self.blocks < 0:
            raise ValueError("blocks must be >= 0")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")

    def depth(self, n_blocks: int) -> int:
        if self.blocks is not None:
            return self.blocks
        return max(1, math.ceil(self.fraction * (n_blocks - 1)))

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return top_k(n_blocks, self.depth(n_blocks))


@register
@dataclass(frozen=True)
class BlockwiseFT(Strategy):
    """Kandel & Castelli 2020 fine-tune the top N convolutional blocks; a grid over N answers
    "how deeply". Same schedule as partial_ft(blocks=N), kept under the study's own name."""

    name: ClassVar[str] = "blockwise_ft"
    summary: ClassVar[str] = "The top N blocks and the head train; a grid over N gives the depth curve."
    citation: ClassVar[str] = "Kandel & Castelli 2020"
    blocks: int = 1

    def validate(self) -> None:
        if self.blocks < 0:
            raise ValueError("blocks must be >= 0")

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return top_k(n_blocks, self.blocks)


@register
@dataclass(frozen=True)
class GradualUnfreeze(Strategy):
    """Howard & Ruder 2018 (ULMFiT): head first, then one more block every `every` epochs from the
    top down, until all train. Used by Cheng & Chiang 2023 and Davila et al. 2024."""

    name: ClassVar[str] = "gradual_unfreeze"
    summary: ClassVar[str] = "Head first, then one more block unfrozen every m epochs, top down."
    citation: ClassVar[str] = "Howard & Ruder 2018; Cheng & Chiang 2023; Davila et al. 2024"
    every: int = 1

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError("every must be >= 1")

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return top_k(n_blocks, epoch // self.every)


@register
@dataclass(frozen=True)
class LPFT(Strategy):
    """Kumar et al., ICLR 2022: a linear probe first (`lp_epochs`, on cached features, nearly
    free), then full fine-tuning from the probed head at `ft_lr_scale` times the learning rate,
    which keeps pretrained features from being distorted by a random head.

    BatchNorm keeps its running statistics in the fine-tuning phase too: the probe was fitted on
    features normalised with them, and switching to batch statistics at the phase boundary
    changes every feature at once. On BUSI (Lite0 @224, 5 folds) that switch sent the training
    loss from 0.47 at the end of the probe to 1.35-1.55 in the first fine-tuning epoch, above a
    random head's 0.92, and early stopping then kept the probe in every fold: LP-FT was LP."""

    name: ClassVar[str] = "lp_ft"
    summary: ClassVar[str] = "Linear probe to convergence, then full fine-tuning with a smaller learning rate."
    citation: ClassVar[str] = "Kumar et al., ICLR 2022"
    lp_epochs: int = 10
    ft_lr_scale: float = 0.1

    def validate(self) -> None:
        if self.lp_epochs < 1 or self.ft_lr_scale <= 0:
            raise ValueError("lp_epochs must be >= 1 and ft_lr_scale > 0")

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return head_only(n_blocks) if epoch < self.lp_epochs else [self.ft_lr_scale] * n_blocks

    def total_epochs(self, epochs: int) -> int:
        return self.lp_epochs + epochs

    def phase_starts(self, epochs: int) -> list[int]:
        return [0, self.lp_epochs]

    def keeps_bn_statistics(self) -> bool:
        return True


@register
@dataclass(frozen=True)
class DiscriminativeLR(Strategy):
    """Layer-wise learning-rate decay (Howard & Ruder 2018): block i of n trains at
    lr * decay^(n-1-i), so the head gets the full rate and the stem the smallest."""

    name: ClassVar[str] = "discriminative_lr"
    summary: ClassVar[str] = "All blocks train; block i at lr * decay^(n-1-i)."
    citation: ClassVar[str] = "Howard & Ruder 2018; Davila et al. 2024"
    decay: float = 0.5

    def validate(self) -> None:
        if not 0 < self.decay <= 1:
            raise ValueError("decay must be in (0, 1]")

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return [self.decay ** (n_blocks - 1 - i) for i in range(n_blocks)]


@register
@dataclass(frozen=True)
class L2SP(Strategy):
    """Li, Grandvalet & Davoine, ICML 2018: full fine-tuning with alpha/2 ||w - w0||^2 on the
    pretrained weights (the starting point as reference) plus beta/2 ||w_head||^2 on the new head.
    The penalty replaces weight decay (decaying towards 0 would fight it)."""

    name: ClassVar[str] = "l2_sp"
    summary: ClassVar[str] = "Full fine-tuning pulled back towards the pretrained weights (L2 to the start point)."
    citation: ClassVar[str] = "Li, Grandvalet & Davoine, ICML 2018"
    alpha: float = 0.01
    beta: float = 0.01

    def validate(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError("alpha and beta must be >= 0")

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return [1.0] * n_blocks

    def uses_weight_decay(self) -> bool:
        return False

    def penalty(self, model: nn.Module, start_state: dict[str, Tensor]) -> Tensor | float:
        sp, head = 0.0, 0.0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name in start_state:  # pretrained tensor: pull towards its start value
                sp = sp + (p - start_state[name]).pow(2).sum()
            else:  # new head: plain L2
                head = head + p.pow(2).sum()
        return 0.5 * self.alpha * sp + 0.5 * self.beta * head


@dataclass(frozen=True)
class _GradientCriterion(Strategy):
    """Shared by Auto-RGN and Auto-SNR (Lee et al., ICLR 2023): a per-tensor statistic of the
    gradient, averaged over the first `measure_batches` minibatches of every epoch, decides each
    tensor's learning rate for the epoch. Normalisation layers are left out (frozen), as in the
    authors' reference code; the new head is left out too and trains at the base rate."""

    measure_batches: int = 5

    def validate(self) -> None:
        if self.measure_batches < 1:
            raise ValueError("measure_batches must be >= 1")

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return [1.0] * n_blocks

    def statistic(self, grad: Tensor, param: Tensor) -> float:
        raise NotImplementedError

    def weights(self, stats: list[float]) -> list[float]:
        raise NotImplementedError

    def after_backward(self, groups: list[dict], step_in_epoch: int) -> None:
        # The new head is not a pretrained tensor to be judged: it trains at the base rate. (Left in,
        # a random head's statistic can dominate the normalisation; on BUSI, Auto-RGN then starved
        # the head and predicted the majority class in every fold.)
        groups = [g for g in groups if not g.get("is_head")]
        if step_in_epoch == 0:  # a new epoch's average starts here, even if this step is not measured
            for g in groups:
                g["criterion_n"] = 0
        if step_in_epoch < self.measure_batches:
            for g in groups:
                p = g["params"][0]
                if g.get("norm") or p.grad is None:
                    continue
                grad = p.grad.detach().float()
                if not bool(torch.isfinite(grad).all()):
                    continue  # an overflowed fp16 step (the GradScaler skips it) is no measurement
                value = self.statistic(grad, p.detach().float())
                k = g["criterion_n"]
                g["criterion"] = value if k == 0 else (g["criterion"] * k + value) / (k + 1)
                g["criterion_n"] = k + 1
            measured = [g for g in groups if "criterion" in g and not g.get("norm")]
            for g, w in zip(measured, self.weights([g["criterion"] for g in measured])):
                g["criterion_weight"] = w
        for g in groups:
            if g.get("norm"):
                g["lr"] = 0.0
                g["params"][0].grad = None
            elif "criterion_weight" in g:
                g["lr"] = g["lr"] * g["criterion_weight"]
                if g["criterion_weight"] == 0.0:
                    g["params"][0].grad = None


@register
@dataclass(frozen=True)
class AutoRGN(_GradientCriterion):
    """Lee et al., ICLR 2023 ("Surgical fine-tuning"), Auto-RGN: each tensor's learning rate is
    lr * RGN / max RGN, where RGN = ||g|| / ||w|| is its relative gradient norm, measured per
    tensor per epoch."""

    name: ClassVar[str] = "auto_rgn"
    summary: ClassVar[str] = "Per-tensor learning rate proportional to the relative gradient norm ||g||/||w||."
    citation: ClassVar[str] = "Lee et al., ICLR 2023 (Surgical fine-tuning)"

    def statistic(self, grad: Tensor, param: Tensor) -> float:
        return float(grad.norm() / param.norm().clamp_min(1e-12))

    def weights(self, stats: list[float]) -> list[float]:
        top = max(stats) if stats else 0.0
        return [s / top if top > 0 else 0.0 for s in stats]


@register
@dataclass(frozen=True)
class AutoSNR(_GradientCriterion):
    """Lee et al., ICLR 2023, Auto-SNR: the gradient signal-to-noise ratio mean(g^2 / var(g)) per
    tensor (variance over the tensor's first axis, as in the reference code); tensors below
    `threshold` are frozen for the epoch, the others train at the full rate."""

    name: ClassVar[str] = "auto_snr"
    summary: ClassVar[str] = "Tensors whose gradient signal-to-noise ratio is below a threshold are frozen for the epoch."
    citation: ClassVar[str] = "Lee et al., ICLR 2023 (Surgical fine-tuning)"
    threshold: float = 0.95

    def statistic(self, grad: Tensor, param: Tensor) -> float:
        if grad.ndim == 0 or grad.shape[0] < 2:
            return float("inf")
        var = grad.var(dim=0, keepdim=True, unbiased=False)
        return float((grad * grad / (var + 1e-8)).mean())

    def weights(self, stats: list[float]) -> list[float]:
        return [1.0 if s >= self.threshold else 0.0 for s in stats]


@register
@dataclass(frozen=True)
class Surgical(Strategy):
    """Lee et al., ICLR 2023: fine-tune one chosen block only (plus the new head). `block` is
    "first", "middle", "last" or a block index (0 = stem)."""

    name: ClassVar[str] = "surgical"
    summary: ClassVar[str] = "Only one chosen block (first, middle or last) and the head train."
    citation: ClassVar[str] = "Lee et al., ICLR 2023 (Surgical fine-tuning)"
    block: str | int = "first"

    def validate(self) -> None:
        if isinstance(self.block, str) and self.block not in ("first", "middle", "last"):
            raise ValueError("block must be 'first', 'middle', 'last' or an integer index")

    def index(self, n_blocks: int) -> int:
        body = n_blocks - 1
        if isinstance(self.block, int):
            if not 0 <= self.block < body:
                raise ConfigError(f"surgical block {self.block} is out of range: this backbone has blocks 0..{body - 1}.")
            return self.block
        return {"first": 0, "middle": body // 2, "last": body - 1}[self.block]

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        scales = head_only(n_blocks)
        scales[self.index(n_blocks)] = 1.0
        return scales


@register
@dataclass(frozen=True)
class BitFit(Strategy):
    """Ben Zaken et al., ACL 2022 (BitFit), applied to CNNs: only bias terms and normalisation
    parameters train (plus the new head); every weight matrix and kernel keeps its pretrained
    values bit for bit."""

    name: ClassVar[str] = "bitfit"
    summary: ClassVar[str] = "Only biases and normalisation parameters (and the head) train."
    citation: ClassVar[str] = "Ben Zaken et al., ACL 2022"

    def lr_scales(self, epoch: int, n_blocks: int) -> list[float]:
        return [1.0] * n_blocks

    def after_backward(self, groups: list[dict], step_in_epoch: int) -> None:
        for g in groups:
            if g["is_head"] or g["norm"] or g["name"].endswith("bias"):
                continue
            g["params"][0].grad = None  # AdamW skips tensors without a gradient: no decay either


def parse_label(label: str) -> Strategy:
    """`partial_ft(blocks=2)` -> PartialFT(blocks=2): the inverse of `Strategy.label()`."""
    import ast

    label = label.strip()
    if "(" not in label:
        return create_strategy(label)
    name, args = label.split("(", 1)
    call = ast.parse(f"f({args}", mode="eval").body
    params = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    return create_strategy(name.strip(), **params)
