"""Grad-CAM maps and overlays (pytorch-grad-cam), and the gallery the report shows.

The target layer is the last spatial feature map the classifier sees: timm's `feature_info[-1]`
(the last stage: `layer4`, `Mixed_7c`, `features.norm5`, ...), moved on to the final
norm/conv that `forward_features` still applies after it where a family has one (EfficientNet's
`bn2` after `conv_head`, ResNetV2's pre-activation `norm`, ConvNeXt's `norm_pre` where it has
one), because that is what gets pooled.

Transformers are not NCHW, and pytorch-grad-cam reads any 4-d activation as (B, C, H, W), so a
layout it does not know gives a map of the wrong axes without an error. `cam_target` therefore
returns, with the layer, the `reshape_transform` pytorch-grad-cam documents for them: ViT-style
token models (B, prefix + h*w, C) drop the prefix tokens and fold the patch tokens into their
grid; NHWC models (Swin) are permuted. A ViT's target is the last block's `norm1`, not the last
block: after the last block only the class token reaches the head, so the patch tokens there get
no gradient.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from medtune.errors import ConfigError

# forward_features of these families ends with a module after the last stage; CAM it instead.
TAIL_MODULES = ("bn2", "norm")

# timm's token models whose blocks all see (B, prefix + h*w, C), prefix = `num_prefix_tokens`
# (class, distillation and register tokens first): ViT (and DeiT, DINOv2, registers), BEiT, EVA,
# ViT-RelPos. Not CaiT or XCiT: their class token joins after the blocks (it is not in them).
TOKEN_FAMILIES = (timm.models.vision_transformer.VisionTransformer, timm.models.beit.Beit, timm.models.eva.Eva,
                  timm.models.vision_transformer_relpos.VisionTransformerRelPos)

Reshape = Callable[[torch.Tensor], torch.Tensor]


def cam_target(model: nn.Module, image_size: tuple[int, int] | None = None) -> tuple[str, nn.Module, Reshape | None]:
    """(name, module, reshape_transform) Grad-CAM uses: the one place that knows each family's
    layer and layout. The transform turns the layer's output (and its gradient) into (B, C, h, w);
    None where it already is. `image_size` (H, W) of the input fixes a ViT's patch grid: medtune's
    ViTs take any input size (`dynamic_img_size`), so the grid timm built the model for (224 px)
    is not the one a 64 px input gives."""
    if isinstance(model, TOKEN_FAMILIES):
        name = f"blocks.{len(model.blocks) - 1}.norm1"
        return name, model.get_submodule(name), partial(tokens_to_nchw, prefix=model.num_prefix_tokens,
                                                        grid=_patch_grid(model, image_size))
    if getattr(model, "output_fmt", None) == "NHWC":  # Swin, Swin V2, MambaOut: stages run channels-last
        norm = getattr(model, "norm", None)
        name = ("norm" if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else
                model.feature_info[-1]["module"])
        return name, model.get_submodule(name), nhwc_to_nchw
    return (*_nchw_target(model), None)


def target_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the layer whose activations and gradients Grad-CAM uses (`cam_target`
    without the reshape, for callers that only name the layer)."""
    name, module, _ = cam_target(model)
    return name, module


def tokens_to_nchw(tokens: torch.Tensor, prefix: int, grid: Callable[[int], tuple[int, int]]) -> torch.Tensor:
    """(B, prefix + h*w, C) -> (B, C, h, w). The prefix tokens (class, distillation, registers)
    have no place in the image; the patch tokens are the patch grid in row-major order."""
    patches = tokens[:, prefix:]
    h, w = grid(patches.shape[1])
    return patches.reshape(patches.shape[0], h, w, patches.shape[2]).permute(0, 3, 1, 2)


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _patch_grid(model: nn.Module, image_size: tuple[int, int] | None) -> Callable[[int], tuple[int, int]]:
    """n patch tokens -> (h, w): the grid of `image_size` where given, else the grid the model was
    built for, else a square (medtune's inputs are square); an error rather than a scrambled map."""
    pe = model.patch_embed
    options = []
    if image_size is not None:
        size = (int(image_size[0]), int(image_size[1]))
        options.append(tuple(pe.dynamic_feat_size(size)) if hasattr(pe, "dynamic_feat_size")
                       else (size[0] // pe.patch_size[0], size[1] // pe.patch_size[1]))
    options.append(tuple(pe.grid_size))

    def grid(n: int) -> tuple[int, int]:
        for h, w in options + [(math.isqrt(n), math.isqrt(n))]:
            if h * w == n:
                return h, w
        raise ValueError(f"{type(model).__name__}: {n} patch tokens fit no patch grid ({options}) for Grad-CAM")

    return grid


def _nchw_target(model: nn.Module) -> tuple[str, nn.Module]:
    """CNNs: the last stage, or the norm/conv forward_features applies after it."""
    for name in TAIL_MODULES:
        mod = getattr(model, name, None)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return name, mod
    # ConvNeXt, DaViT, EdgeNeXt, RDNet with head_norm_first: the final norm (else an Identity)
    norm_pre = getattr(model, "norm_pre", None)
    if isinstance(norm_pre, nn.Module) and not isinstance(norm_pre, nn.Identity):
        return "norm_pre", norm_pre
    info = getattr(model, "feature_info", None)
    if info:
        name = info[-1]["module"]
        return name, model.get_submodule(name)
    # not a timm model: the last module with parameters before the classifier
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    last = None
    for name, mod in model.named_modules():
        if mod is clf:
            break
        if isinstance(mod, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            last = (name, mod)
    if last is None:
        raise ValueError(f"{type(model).__name__}: no convolutional layer found for Grad-CAM")
    return last


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the float input the network was trained on."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def grad_cam_installed() -> bool:
    """Grad-CAM comes with the `report` extra; a minimal install trains and predicts without it."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return False
    return True


def require_grad_cam() -> None:
    if not grad_cam_installed():
        raise ConfigError("Grad-CAM needs the `grad-cam` package, which comes with the report extra: "
                          "pip install 'medtune[report]' (or run without --cam).")


def cam_maps(model: nn.Module, x: torch.Tensor, classes: list[int], batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps in [0, 1], (N, H, W), for class `classes[i]` of image `x[i]` (normalised input)."""
    require_grad_cam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = model.eval().float().to(memory_format=torch.contiguous_format)
    _, layer, reshape = cam_target(model, tuple(x.shape[-2:]))
    out = []
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        for start in range(0, len(x), batch_size):
            part = x[start:start + batch_size].float().contiguous()
            targets = [ClassifierOutputTarget(int(c)) for c in classes[start:start + batch_size]]
            out.append(cam(input_tensor=part, targets=targets))
    return np.concatenate(out) if out else np.zeros((0, *x.shape[-2:]))


def overlay(image: torch.Tensor | np.ndarray, mask: np.ndarray, weight: float = 0.4) -> np.ndarray:
    """uint8 (3, H, W) image + map in [0, 1] -> uint8 (H, W, 3) heat-map overlay (jet colours)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(image).transpose(1, 2, 0).astype(np.float32) / 255.0
    return show_cam_on_image(rgb, mask.astype(np.float32), use_rgb=True, image_weight=1 - weight)


def save_overlay(path: str | Path, image: torch.Tensor | np.ndarray, mask: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, mask)).save(path)
    return path


def gallery(model: nn.Module, images: torch.Tensor, labels: np.ndarray, probs: np.ndarray, paths: list[str],
            class_names: list[str], mean: list[float], std: list[float], out_dir: str | Path,
            per_kind: int = 2) -> list[dict]:
    """For each true class, the `per_kind` most confident correct and wrong predictions, with
    Grad-CAM for the predicted class; PNGs and `gallery.json` in `out_dir`.

    Wrong ones are chosen by confidence too: a confident mistake is what a clinician must see.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(1)
    conf = probs.max(1)
    chosen: list[tuple[int, str]] = []
    for c in range(len(class_names)):
        for kind, ok in (("correct", True), ("wrong", False)):
            idx = np.flatnonzero((labels == c) & ((pred == labels) == ok))
            chosen += [(int(i), kind) for i in idx[np.argsort(-conf[idx])][:per_kind]]
    if not chosen:
        return []
    sel = [i for i, _ in chosen]
    maps = cam_maps(model, normalise(images[sel], mean, std), [int(pred[i]) for i in sel])
    entries = []
    for (i, kind), mask in zip(chosen, maps):
        name = f"{class_names[labels[i]]}_{kind}_{i}.png"
        save_overlay(out_dir / name, images[i], mask)
        entries.append({"file": name, "kind": kind, "true": class_names[labels[i]],
                        "predicted": class_names[pred[i]], "confidence": float(conf[i]), "path": paths[i]})
    (out_dir / "gallery.json").write_text(json.dumps(entries, indent=1))
    return entries
