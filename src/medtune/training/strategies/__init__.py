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

The package, one module per family, all registered on import (this module imports every one):
`base` (Phase, Strategy, the registry, create_strategy, parse_label, the scale helpers), `freezing`
(linear_probe, full_ft, partial_ft, blockwise_ft, surgical), `schedules` (gradual_unfreeze, lp_ft,
discriminative_lr), `regularised` (l2_sp), `gradient` (auto_rgn, auto_snr), `peft` (bitfit, lora,
ssf) and `depths` (what a strategy trains on a model, the standard depth settings). Import from
`medtune.training.strategies`, which exports every public name.
"""

from medtune.training.strategies.base import (BN_MODES, REGISTRY, UNITS, Phase, Scales, Strategy, create_strategy,
                                              everything, head_only, is_norm, list_strategies, parse_label, register,
                                              top_k)
from medtune.training.strategies.freezing import BlockwiseFT, FullFT, LinearProbe, PartialFT, Surgical
from medtune.training.strategies.schedules import LPFT, DiscriminativeLR, GradualUnfreeze
from medtune.training.strategies.regularised import L2SP
from medtune.training.strategies.gradient import AutoRGN, AutoSNR, _GradientCriterion  # noqa: F401 - as before
from medtune.training.strategies.peft import SSF, BitFit, LoRA
from medtune.training.strategies.depths import (PEFT_DEPTHS, STANDARD_DEPTHS, depth, scheduled_params, trains_backbone,
                                                uses_learning_rate)

__all__ = [
    "BN_MODES", "REGISTRY", "UNITS", "Phase", "Scales", "Strategy", "create_strategy", "everything", "head_only",
    "is_norm", "list_strategies", "parse_label", "register", "top_k",
    "BlockwiseFT", "FullFT", "LinearProbe", "PartialFT", "Surgical",
    "LPFT", "DiscriminativeLR", "GradualUnfreeze",
    "L2SP",
    "AutoRGN", "AutoSNR",
    "SSF", "BitFit", "LoRA",
    "PEFT_DEPTHS", "STANDARD_DEPTHS", "depth", "scheduled_params", "trains_backbone", "uses_learning_rate",
]
