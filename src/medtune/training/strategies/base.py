"""The contract every strategy follows (`Strategy`, its `Phase`s), the registry of strategies by key,
`create_strategy` and `parse_label` (the one way in, from a name or a table label), and the scale
helpers the families build their schedules from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from torch import Tensor, nn

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
