"""Strategies whose rates change over the schedule or down the network: gradual unfreezing, LP-FT
(a probe phase, then fine-tuning at a smaller rate), discriminative (layer-wise decayed) rates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from medtune.training.strategies.base import Phase, Strategy, everything, head_only, register, top_k


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
        probe = dataclasses.replace(self.phase(self.lp_epochs, head_only, unit="classifier"),
                                    refresh_bn=self.refresh_bn)
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
