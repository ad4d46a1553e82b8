"""Strategies that add a penalty to the loss: L2-SP, fine-tuning pulled back towards the pretrained
weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from medtune.training.strategies.base import Phase, Strategy, everything, register


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
