"""Strategies that set each tensor's rate from its gradients during training: Auto-RGN and Auto-SNR
(Lee et al., ICLR 2023), on one shared per-epoch measurement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from medtune.training.strategies.base import Phase, Strategy, everything, register


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
    summary: ClassVar[str] = ("Tensors whose gradient signal-to-noise ratio is below a threshold are frozen "
                              "for the epoch.")
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
