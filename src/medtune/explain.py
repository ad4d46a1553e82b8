"""Grad-CAM maps and overlays (pytorch-grad-cam), and the gallery the report shows.

The target layer is the last spatial feature map the classifier sees: timm's `feature_info[-1]`
(the last stage: `layer4`, `Mixed_7c`, `features.norm5`, ...), moved on to the final
norm/conv that `forward_features` still applies after it where a family has one (EfficientNet's
`bn2` after `conv_head`, ResNetV2's pre-activation `norm`), because that is what gets pooled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from medtune.errors import ConfigError

# forward_features of these families ends with a module after the last stage; CAM it instead.
TAIL_MODULES = ("bn2", "norm")


def target_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the layer whose activations and gradients Grad-CAM uses."""
    for name in TAIL_MODULES:
        mod = getattr(model, name, None)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return name, mod
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
    _, layer = target_layer(model)
    out = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
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
