"""Strategies that choose how deep to train and freeze the rest, at one rate for one phase: the
linear probe, full fine-tuning, the last p of the layers or the top N blocks, one chosen stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from medtune.models.backbones import Block
from medtune.errors import ConfigError
from medtune.training.strategies.base import Phase, Strategy, everything, head_only, register, top_k


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
