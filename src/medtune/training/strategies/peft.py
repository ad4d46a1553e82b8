"""Parameter-efficient strategies: every unit trains, but only a few tensors of each: BitFit's biases
and norms, or an adapter's own tensors (LoRA, SSF; models/adapters.py) merged back after training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from medtune.models import adapters
from medtune.training.strategies.base import Phase, Strategy, everything, register


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
