"""Local checkpoints (.pth, .safetensors) through the config, and the embedded EfficientNet-Lite weights."""

import timm
import torch
from typer.testing import CliRunner

from medtune.models.backbones import create_backbone, timm_name
from medtune.models.weights import embedded_weights_path
from medtune.cli import app
from medtune.config import load_config
from medtune.errors import BackboneError

import pytest


def saved_model(tmp_path, fmt):
    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    state = model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style wrapper
    return model, path


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_from_config_loads_every_body_weight(tmp_path, fmt):
    source, path = saved_model(tmp_path, fmt)
    cfg = load_config(raw={"datasets": [{"source": "synthetic"}], "strategies": ["full_ft"],
                           "backbones": [{"name": "test_efficientnet", "checkpoint": str(path)}]})
    b = cfg.backbones[0]
    model = create_backbone(b.name, b.pretrained, 2, b.checkpoint)
    ref, got = source.state_dict(), model.state_dict()
    body = [k for k in ref if not k.startswith("classifier.")]
    assert body and all(torch.equal(ref[k], got[k]) for k in body)
    assert got["classifier.weight"].shape[0] == 2  # the 5-class head was replaced for this task
    # A fresh random init would differ: the check above is not vacuous.
    fresh = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    assert not all(torch.equal(ref[k], fresh[k]) for k in body if ref[k].is_floating_point())


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "r.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    with pytest.raises(BackboneError, match="r.pth.*does not match"):
        create_backbone("test_efficientnet", True, 2, path)
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("test_efficientnet", True, 2, tmp_path / "missing.pth")


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_embedded_lite_weights_map_positionally(name):
    path = embedded_weights_path(name)
    assert path is not None, f"install medtune[lite] ({name} weights package)"
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = create_backbone(name, True, 3)
    assert timm_name(name) == f"tf_{name}"
    got = list(model.state_dict().values())
    src = list(source.values())
    assert len(got) == len(src)
    # Every tensor except the replaced 1000-class head is the package's, shape and value.
    for a, b in zip(src[:-2], got[:-2]):
        assert a.shape == b.shape and torch.equal(a, b)
    assert got[-2].shape == (3, src[-2].shape[1])


def test_list_backbones_shows_lite_weights_installed():
    out = CliRunner().invoke(app, ["list", "backbones"], terminal_width=200).output
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        line = next(row for row in out.splitlines() if name in row)
        assert "embedded (installed)" in line, line
