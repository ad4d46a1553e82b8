"""Parameter-efficient adapters as model surgery: LoRA (through Hugging Face `peft`) and SSF.

Both add a few trainable tensors to a pretrained timm model in place and, after training, fold
them back into the plain weights (`merge_*`), so what the feature cache, the bundle, `export` and
`predict` see is an ordinary timm model with its ordinary state-dict keys. The strategies that
use them (`lora`, `ssf` in training/strategies/peft.py) only name the tensors that train.

What is adapted, and why:
- LoRA (Hu et al., ICLR 2022): a low-rank update B A (rank r, scaled alpha / r, B starting at
  zero so training starts from the pretrained network) beside chosen Linear and Conv2d layers.
  `targets="attention"` is the paper's choice for transformers (the attention projections:
  timm's fused `qkv`); `"conv"` every ungrouped convolution and Linear layer of a CNN. `"auto"`
  is attention when the model has attention, conv otherwise. Depthwise (grouped) convolutions
  are left out (a low-rank update of a 3x3 per-channel kernel has no meaning, and peft cannot
  merge it), and so is the stem, the first depth unit: its kernel sees 3 input channels (nothing
  to reduce) and keeping it frozen lets its output come from the cache.
- SSF (Lian et al., NeurIPS 2022): a per-channel scale gamma and shift beta after every layer
  with an affine output (normalisation layers, Linear and convolutions with a bias), gamma ~
  N(1, 0.02) and beta ~ N(0, 0.02) as in the authors' code. It is applied as a reparametrisation
  of the layer's own weight and bias (weight -> gamma * weight, bias -> gamma * bias + beta),
  which equals scaling and shifting the layer's output, BatchNorm's batch statistics included,
  and merges exactly. A convolution without a bias is covered by the BatchNorm after it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from medtune.models.backbones import blocks, forget, head_param_names
from medtune.errors import ConfigError

LORA_TARGETS = ("auto", "attention", "conv")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _frozen_modules(model: nn.Module) -> set[str]:
    """Modules never adapted: the head's and the stem's (the first depth unit)."""
    keep = set(head_param_names(model)) | set(blocks(model)[0].param_names)
    return {n.rsplit(".", 1)[0] for n in keep if "." in n}


def has_attention(model: nn.Module) -> bool:
    return any(name.endswith(".qkv") and isinstance(m, nn.Linear) for name, m in model.named_modules())


def lora_modules(model: nn.Module, targets: str) -> list[str]:
    """Names of the layers LoRA adapts on `model` for `targets` (see the module docstring)."""
    if targets not in LORA_TARGETS:
        raise ConfigError(f"lora targets must be one of {', '.join(LORA_TARGETS)}, not {targets!r}")
    if targets == "auto":
        targets = "attention" if has_attention(model) else "conv"
    skip = _frozen_modules(model)
    out = []
    for name, m in model.named_modules():
        if name in skip:
            continue
        if targets == "attention":
            projections = ("qkv", "q", "k", "v", "q_proj", "k_proj", "v_proj")
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in projections:
                out.append(name)
        elif isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            out.append(name)
    if not out:
        raise ConfigError(f"lora(targets={targets!r}) finds no layer to adapt in {type(model).__name__}; "
                          "use targets='conv' for a CNN or 'attention' for a transformer")
    return out


def peft_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def require_peft():
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("the lora strategy needs Hugging Face peft: pip install 'medtune[peft]'") from exc
    return peft


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str) -> None:
    """Inject LoRA layers in place (peft's `inject_adapter_in_model`: the model stays a timm model)."""
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_modules(model, targets),
                             bias="none")
    peft.inject_adapter_in_model(config, model)
    forget(model)


def merge_lora(model: nn.Module) -> set[str]:
    """Fold every LoRA update into its base layer and put the base layer back where it was; returns
    the names of the weights that changed."""
    from peft.tuners.lora import LoraLayer

    changed = set()
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, m.get_base_layer())
            changed.add(f"{name}.weight")
    if "peft_config" in vars(model):  # what peft left on the model: a plain model again
        del model.peft_config
    forget(model)
    return changed


class _Scale(nn.Module):
    """weight -> gamma * weight (per output channel)."""

    def __init__(self, gamma: nn.Parameter) -> None:
        super().__init__()
        self.ssf_scale = gamma

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.ssf_scale.view(-1, *([1] * (w.ndim - 1))).to(w.dtype)


class _ScaleShift(nn.Module):
    """bias -> gamma * bias + beta."""

    def __init__(self, gamma: nn.Parameter, beta: nn.Parameter) -> None:
        super().__init__()
        self.ssf_scale, self.ssf_shift = gamma, beta

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b * self.ssf_scale.to(b.dtype) + self.ssf_shift.to(b.dtype)


def ssf_modules(model: nn.Module) -> list[str]:
    """Layers with an affine output (weight and bias, one value per output channel), head excluded."""
    skip = {n.rsplit(".", 1)[0] for n in head_param_names(model)}
    out = []
    for name, m in model.named_modules():
        if name in skip or not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, *NORM_TYPES)):
            continue
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter) and w.shape[0] == b.shape[0]:
            out.append(name)
    return out


def add_ssf(model: nn.Module) -> None:
    """Reparametrise every affine layer's weight and bias by a shared per-channel scale and a shift."""
    for name in ssf_modules(model):
        m = model.get_submodule(name)
        n = m.bias.shape[0]
        gamma = nn.Parameter(torch.empty(n, device=m.bias.device).normal_(1.0, 0.02))
        beta = nn.Parameter(torch.empty(n, device=m.bias.device).normal_(0.0, 0.02))
        parametrize.register_parametrization(m, "weight", _Scale(gamma))
        parametrize.register_parametrization(m, "bias", _ScaleShift(gamma, beta))
    forget(model)


def merge_ssf(model: nn.Module) -> set[str]:
    """Write the scaled weights and shifted biases into the layers and drop the reparametrisation."""
    changed = set()
    for name, m in list(model.named_modules()):
        if parametrize.is_parametrized(m):
            for tensor in ("weight", "bias"):
                parametrize.remove_parametrizations(m, tensor, leave_parametrized=True)
                changed.add(f"{name}.{tensor}")
    forget(model)
    return changed
