"""Fine-tuning strategies: each is a schedule of phases over the backbone's chain of depth units.

A strategy states its whole schedule in one method, `phases(epochs)`: a list of `Phase`s, each
with its number of epochs, the learning-rate scale of every unit stem -> head (0.0 = frozen; the
head's scale is its true rate), the chain the scales are over (`blocks` in the papers' units,
`stages`, `layers` for fractions of layers, or `classifier`: the network and its final linear
classifier, the linear probe's) and its BatchNorm rule (None = the experiment's).
A strategy may add a penalty to the loss (`penalty`), act on per-tensor learning rates or
gradients after the backward pass (`after_backward`), keep some tensors of a trained unit frozen
(`trains_tensor`: BitFit's biases, an adapter's own tensors), and change the model before
training and fold the change back after it (`adapt`/`merge`: LoRA, SSF; models/adapters.py). That is the
whole contract; the one training loop in `training/loop.py` does the rest, and nothing there
special-cases a strategy.

Every strategy is a frozen dataclass whose fields are its hyperparameters, registered under the
snake_case key used in YAML, the CLI, the store and the report.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from medtune.models import adapters
from medtune.models.backbones import Block
from medtune.errors import ConfigError

REGISTRY: dict[str, type["Strategy"]] = {}
BN_MODES = ("update", "keep", "update_all")
UNITS = ("blocks", "stages", "layers", "classifier")
Scales = Callable[[int, Sequence[Block]], list[float]]  # (epoch in phase, chain) -> stem..head


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one rule: `scales(epoch_in_phase, chain)` over the `unit` chain;
    `bn` the BatchNorm mode (None = the experiment's `train.bn_statistics`). The learning-rate
    schedule (warm-up + cosine) restarts at every phase. `refresh_bn`: before this phase's linear
    probe, re-estimate the BatchNorm statistics on the training images when the next phase normalises
    with batch statistics, so that the probe is fitted on the features the next phase starts from."""

    epochs: int
    scales: Scales
    unit: str = "blocks"
    bn: str | None = None
    refresh_bn: bool = False


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
        if strategy.bn_statistics not in (None, *BN_MODES):
            raise ValueError(f"bn_statistics must be one of {', '.join(BN_MODES)} (or unset: the experiment's)")
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
    """Decides which units train, how fast, in which phases. `bn_statistics` (every strategy's
    parameter, unset by default) gives this strategy a BatchNorm rule other than the experiment's."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    decays_weights: ClassVar[bool] = True  # AdamW weight decay on weight tensors (L2-SP replaces it)
    bn_statistics: str | None = None

    def validate(self) -> None:
        """Raise ValueError on impossible hyperparameters (called by `create_strategy`)."""

    def phases(self, epochs: int) -> list[Phase]:
        raise NotImplementedError

    def phase(self, epochs: int, scales: Scales, unit: str = "blocks") -> Phase:
        return Phase(epochs, scales, unit, self.bn_statistics)

    def penalty(self, model: nn.Module, start_state: dict[str, Tensor]) -> Tensor | float:
        return 0.0

    def after_backward(self, groups: list[dict], step_in_epoch: int) -> None:
        """Called after each backward pass with the optimizer's per-tensor groups (keys `params`,
        `name`, `lr`, `is_head`, `norm`), whose `lr` the trainer has just set from the schedule."""

    def trains_tensor(self, name: str, is_head: bool, is_norm: bool) -> bool:
        """Whether tensor `name` may train when its unit's scale is above 0 (a tensor that may not
        gets no gradient at all, so it costs nothing and stays bit-identical)."""
        return True

    def adapt(self, model: nn.Module) -> None:
        """Change `model` in place before training (add an adapter's tensors); seeded by the fit."""

    def merge(self, model: nn.Module) -> set[str]:
        """Fold what `adapt` added back into plain weights after training; the names of the
        model's tensors that changed by it."""
        return set()

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """Registry key plus non-default hyperparameters: the strategy's name in tables."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        extra = [f"{k}={v}" for k, v in self.params().items() if v != defaults[k]]
        return f"{self.name}({', '.join(extra)})" if extra else self.name


def everything(scale: float = 1.0) -> Scales:
    return lambda epoch, chain: [scale] * len(chain)


def head_only(epoch: int, chain: Sequence[Block]) -> list[float]:
    return [0.0] * (len(chain) - 1) + [1.0]


def top_k(chain: Sequence[Block], k: int) -> list[float]:
    """The head plus the top `k` units below it, counting units of the chain that are not necks
    (a neck above a trained unit, such as EfficientNet's conv_head, trains with it)."""
    real = [i for i, b in enumerate(chain[:-1]) if not b.neck]
    start = len(chain) - 1 if k <= 0 else (real[-k] if k <= len(real) else 0)
    return [0.0] * start + [1.0] * (len(chain) - start)


@register
@dataclass(frozen=True)
class LinearProbe(Strategy):
    """Only the new linear classifier trains, fitted to convergence on the frozen penultimate
    features (models/probe.py: logistic regression, C chosen on the inner validation split); on VGG those
    are fc7's, so the pretrained fc block stays frozen (`classifier` unit)."""

    name: ClassVar[str] = "linear_probe"
    summary: ClassVar[str] = "Backbone frozen; only the new classifier head trains (fitted to convergence)."
    citation: ClassVar[str] = "Kumar et al., ICLR 2022; Davila et al. 2024"

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, head_only, unit="classifier")]


@register
@dataclass(frozen=True)
class FullFT(Strategy):
    name: ClassVar[str] = "full_ft"
    summary: ClassVar[str] = "Every block trains at the same learning rate."
    citation: ClassVar[str] = "Davila et al. 2024"

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, everything())]


@register
@dataclass(frozen=True)
class PartialFT(Strategy):
    """Bal-Ghaoui et al. 2023 fine-tune "the last X% of layers" (15% best for ResNet50 and
    InceptionV3): `fraction` counts parameterised layers (conv, linear, norm) from the top, as Keras
    counts a model's layers, at tensor granularity. `blocks` counts the papers' blocks instead
    (residual bottlenecks, dense blocks, ...) and wins when set."""

    name: ClassVar[str] = "partial_ft"
    summary: ClassVar[str] = "The last p of the layers (or the last k blocks) and the head train; the rest is frozen."
    citation: ClassVar[str] = "Bal-Ghaoui et al. 2023"
    blocks: int | None = None
    fraction: float = 0.15

    def validate(self) -> None:
        if self.blocks is not None and self.blocks < 0:
            raise ValueError("blocks must be >= 0")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")

    def phases(self, epochs: int) -> list[Phase]:
        if self.blocks is not None:
            return [self.phase(epochs, lambda e, chain: top_k(chain, self.blocks))]
        return [self.phase(epochs, self.last_layers, unit="layers")]

    def last_layers(self, epoch: int, chain: Sequence[Block]) -> list[float]:
        """ceil(fraction x all layers, the head's included) layers from the top, and the head."""
        n_layers = len(chain) - 1 + chain[-1].n_layers
        body = max(0, math.ceil(self.fraction * n_layers) - chain[-1].n_layers)
        return [0.0] * (len(chain) - 1 - body) + [1.0] * (body + 1)


@register
@dataclass(frozen=True)
class BlockwiseFT(Strategy):
    """Kandel & Castelli 2020 fine-tune the fc block plus the top N convolutional blocks (VGG's
    pool-delimited blocks; on other nets the papers' blocks); a grid over N answers "how deeply"."""

    name: ClassVar[str] = "blockwise_ft"
    summary: ClassVar[str] = "The top N blocks and the head train; a grid over N gives the depth curve."
    citation: ClassVar[str] = "Kandel & Castelli 2020"
    blocks: int = 1

    def validate(self) -> None:
        if self.blocks < 0:
            raise ValueError("blocks must be >= 0")

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, lambda e, chain: top_k(chain, self.blocks))]


@register
@dataclass(frozen=True)
class GradualUnfreeze(Strategy):
    """Howard & Ruder 2018 (ULMFiT): head first, then one more layer group (stage) every `every`
    epochs from the top down, until all train. Used by Cheng & Chiang 2023 and Davila et al. 2024."""

    name: ClassVar[str] = "gradual_unfreeze"
    summary: ClassVar[str] = "Head first, then one more stage unfrozen every m epochs, top down."
    citation: ClassVar[str] = "Howard & Ruder 2018; Cheng & Chiang 2023; Davila et al. 2024"
    every: int = 1

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError("every must be >= 1")

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, lambda e, chain: top_k(chain, e // self.every), unit="stages")]


@register
@dataclass(frozen=True)
class LPFT(Strategy):
    """Kumar et al., ICLR 2022: a linear probe first (fitted to convergence on the pooled features),
    then full fine-tuning from the probed head at `ft_lr_scale` times the learning rate, which keeps
    pretrained features from being distorted by a random head.

    BatchNorm follows the experiment's rule like every strategy's. Under `keep` the network stays in
    eval mode throughout, as in the authors' reported runs (`use_net_val_mode`). Under `update` (the
    default) fine-tuning normalises with batch statistics, not the pretrained running statistics the
    probe would otherwise be fitted on, so with `refresh_bn` (default) the statistics are first
    re-estimated on the training images and the probe is fitted on those features (the authors'
    `use_new_bn_stats` variant; those features are cached per fold, not shared with other folds). Without
    it, on BUSI (Lite0 @224, outer folds 0 and 1, lr 3e-4) the first fine-tuning epoch's training
    loss was 2.5-2.9 (the probe's validation loss 0.50-0.62), inner validation balanced accuracy fell
    from 0.77-0.82 to 0.30-0.52, and early stopping kept the probe: LP-FT became the linear probe.
    With it (fold 0) the training loss went from 0.57 to 0.44 and the validation loss fell every epoch."""

    name: ClassVar[str] = "lp_ft"
    summary: ClassVar[str] = "Linear probe to convergence, then full fine-tuning with a smaller learning rate."
    citation: ClassVar[str] = "Kumar et al., ICLR 2022"
    lp_epochs: int = 10
    ft_lr_scale: float = 0.1
    refresh_bn: bool = True

    def validate(self) -> None:
        if self.lp_epochs < 1 or self.ft_lr_scale <= 0:
            raise ValueError("lp_epochs must be >= 1 and ft_lr_scale > 0")

    def phases(self, epochs: int) -> list[Phase]:
        probe = dataclasses.replace(self.phase(self.lp_epochs, head_only, unit="classifier"), refresh_bn=self.refresh_bn)
        return [probe, self.phase(epochs, everything(self.ft_lr_scale))]


@register
@dataclass(frozen=True)
class DiscriminativeLR(Strategy):
    """Layer-wise learning-rate decay (Howard & Ruder 2018): layer group (stage) i of n trains at
    lr * decay^(n-1-i), so the head gets the full rate and the stem the smallest."""

    name: ClassVar[str] = "discriminative_lr"
    summary: ClassVar[str] = "All stages train; stage i at lr * decay^(n-1-i)."
    citation: ClassVar[str] = "Howard & Ruder 2018; Davila et al. 2024"
    decay: float = 0.5

    def validate(self) -> None:
        if not 0 < self.decay <= 1:
            raise ValueError("decay must be in (0, 1]")

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, lambda e, ch: [self.decay ** (len(ch) - 1 - i) for i in range(len(ch))], "stages")]


@register
@dataclass(frozen=True)
class L2SP(Strategy):
    """Li, Grandvalet & Davoine, ICML 2018: full fine-tuning with alpha/2 ||w - w0||^2 on the
    pretrained weights (the starting point as reference) plus beta/2 ||w_head||^2 on the new head.
    The penalty replaces weight decay (decaying towards 0 would fight it)."""

    name: ClassVar[str] = "l2_sp"
    summary: ClassVar[str] = "Full fine-tuning pulled back towards the pretrained weights (L2 to the start point)."
    citation: ClassVar[str] = "Li, Grandvalet & Davoine, ICML 2018"
    decays_weights: ClassVar[bool] = False
    alpha: float = 0.01
    beta: float = 0.01

    def validate(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError("alpha and beta must be >= 0")

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, everything())]

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

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, everything())]

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
    tensor (unbiased variance over the tensor's first axis, as in the reference code); tensors below
    `threshold` are frozen for the epoch, the others train at the full rate."""

    name: ClassVar[str] = "auto_snr"
    summary: ClassVar[str] = "Tensors whose gradient signal-to-noise ratio is below a threshold are frozen for the epoch."
    citation: ClassVar[str] = "Lee et al., ICLR 2023 (Surgical fine-tuning)"
    threshold: float = 0.95

    def statistic(self, grad: Tensor, param: Tensor) -> float:
        if grad.ndim == 0 or grad.shape[0] < 2:
            return float("inf")
        var = grad.var(dim=0, keepdim=True)  # unbiased, torch.var's default, as the reference code
        # (Lee et al.'s `(grad * grad) / (torch.var(grad, dim=0, keepdim=True) + 1e-8)`). The biased one
        # makes mean(g^2 / var) >= 1 for every tensor, so a 0.95 threshold would freeze almost nothing.
        return float((grad * grad / (var + 1e-8)).mean())

    def weights(self, stats: list[float]) -> list[float]:
        return [1.0 if s >= self.threshold else 0.0 for s in stats]


@register
@dataclass(frozen=True)
class Surgical(Strategy):
    """Lee et al., ICLR 2023: fine-tune one chosen stage only (plus the new head): "first" is the
    stem plus the first stage (input-level shifts), "middle" the middle stage, "last" the last
    stage, or a stage index (0 = stem)."""

    name: ClassVar[str] = "surgical"
    summary: ClassVar[str] = "Only one chosen stage (first = stem + stage 1, middle or last) and the head train."
    citation: ClassVar[str] = "Lee et al., ICLR 2023 (Surgical fine-tuning)"
    block: str | int = "first"

    def validate(self) -> None:
        if isinstance(self.block, str) and self.block not in ("first", "middle", "last"):
            raise ValueError("block must be 'first', 'middle', 'last' or an integer index")

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, self.scales, unit="stages")]

    def scales(self, epoch: int, chain: Sequence[Block]) -> list[float]:
        body = [i for i, b in enumerate(chain[:-1]) if not b.neck]
        stem = [] if chain[0].name.startswith("block") else body[:1]  # VGG's block1 is no stem
        stage_ids = body[len(stem):]
        if isinstance(self.block, int):
            if not 0 <= self.block < len(chain) - 1:
                raise ConfigError(f"surgical block {self.block} is out of range: this backbone has stages "
                                  f"0..{len(chain) - 2}.")
            train = [self.block]
        else:
            train = {"first": stem + stage_ids[:1], "middle": [stage_ids[(len(stage_ids) - 1) // 2]],
                     "last": [stage_ids[-1]]}[self.block]
        return [1.0 if i in train or i == len(chain) - 1 else 0.0 for i in range(len(chain))]


@register
@dataclass(frozen=True)
class BitFit(Strategy):
    """Ben Zaken et al., ACL 2022 (BitFit), applied to CNNs: only bias terms and normalisation
    parameters train (plus the new head); every weight matrix and kernel keeps its pretrained
    values bit for bit."""

    name: ClassVar[str] = "bitfit"
    summary: ClassVar[str] = "Only biases and normalisation parameters (and the head) train."
    citation: ClassVar[str] = "Ben Zaken et al., ACL 2022"

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, everything())]

    def trains_tensor(self, name: str, is_head: bool, is_norm: bool) -> bool:
        return is_head or is_norm or name.endswith("bias")


@register
@dataclass(frozen=True)
class LoRA(Strategy):
    """Hu et al., ICLR 2022 (LoRA) through Hugging Face peft: a trainable low-rank update (rank
    `rank`, scale alpha / rank) beside the attention projections of a transformer or the ungrouped
    convolutions of a CNN (`targets`, models/adapters.py); the pretrained weights and the stem stay
    frozen, the new head trains. Merged into the weights after training."""

    name: ClassVar[str] = "lora"
    summary: ClassVar[str] = "Low-rank updates of attention / convolution weights (peft), merged after training."
    citation: ClassVar[str] = "Hu et al., ICLR 2022; Dutt et al., MIDL 2024"
    rank: int = 8
    alpha: float = 16.0
    targets: str = "auto"

    def validate(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or self.targets not in adapters.LORA_TARGETS:
            raise ValueError(f"rank >= 1, alpha > 0, targets one of {', '.join(adapters.LORA_TARGETS)}")
        if not adapters.peft_installed():  # said before the grid starts, not by every cell
            raise ValueError("needs Hugging Face peft: pip install 'medtune[peft]'")

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, everything())]

    def trains_tensor(self, name: str, is_head: bool, is_norm: bool) -> bool:
        return is_head or ".lora_" in name

    def adapt(self, model: nn.Module) -> None:
        adapters.add_lora(model, self.rank, self.alpha, self.targets)

    def merge(self, model: nn.Module) -> set[str]:
        return adapters.merge_lora(model)


@register
@dataclass(frozen=True)
class SSF(Strategy):
    """Lian et al., NeurIPS 2022 (SSF): a per-channel scale and shift after every affine layer
    (normalisation, biased Linear/conv), the pretrained weights frozen, the new head trained;
    merged exactly into the weights after training (models/adapters.py)."""

    name: ClassVar[str] = "ssf"
    summary: ClassVar[str] = "Per-channel scale and shift of every layer's output, merged after training."
    citation: ClassVar[str] = "Lian et al., NeurIPS 2022"

    def phases(self, epochs: int) -> list[Phase]:
        return [self.phase(epochs, everything())]

    def trains_tensor(self, name: str, is_head: bool, is_norm: bool) -> bool:
        return is_head or ".ssf_" in name

    def adapt(self, model: nn.Module) -> None:
        adapters.add_ssf(model)

    def merge(self, model: nn.Module) -> set[str]:
        return adapters.merge_ssf(model)


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


# --------------------------------------------------------------------------- depths
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
    chain = [Block(f"b{i}", (f"b{i}.weight",), n_layers=1) for i in range(999)] + [Block("head", ("head.weight",), n_layers=1)]
    return any(any(s > 0 for s in phase.scales(e, chain)[:-1])
               for phase in strategy.phases(epochs) for e in range(phase.epochs))


def uses_learning_rate(strategy: Strategy, epochs: int, bn_statistics: str) -> bool:
    """Whether the learning rate can change what a strategy learns. A strategy that only ever trains
    the classifier on frozen features (with BatchNorm statistics not following the batch) is fitted
    by the convex probe (`models/probe.py`), which has no learning rate: a learning-rate choice for it would
    train identical candidates."""
    return trains_backbone(strategy, epochs) or any(
        (phase.bn or bn_statistics) == "update_all" for phase in strategy.phases(epochs) if phase.epochs)
