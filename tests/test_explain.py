"""Grad-CAM: the target layer per backbone family, maps, overlays and the gallery."""

import json

import numpy as np
import pytest
import timm
import torch

from medtune.explain import cam_maps, gallery, normalise, overlay, target_layer


@pytest.mark.parametrize("arch, expected", [
    ("tf_efficientnet_lite0", "bn2"),       # after conv_head: what gets pooled
    ("resnet50", "layer4"),
    ("densenet121", "features.norm5"),
    ("inception_v3", "Mixed_7c"),
    ("resnetv2_50", "norm"),                # pre-activation net: the final norm
    ("vgg16", "features.30"),               # features[-1], as pytorch-grad-cam advises for VGG
])
def test_target_layer_is_last_feature_map(arch, expected):
    with torch.device("meta"):  # no weights allocated: only the module tree is inspected
        model = timm.create_model(arch, pretrained=False, num_classes=3)
    name, module = target_layer(model)
    assert name == expected
    assert module is model.get_submodule(name)


def _tiny_model():
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=2).eval()


def test_cam_maps_are_per_image_maps_in_unit_range():
    """Two images that differ only in where a bright square is must get different maps."""
    model = _tiny_model()
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    images[0, :, 4:24, 4:24] = 255
    images[1, :, 40:60, 40:60] = 255
    x = normalise(images, [0.5] * 3, [0.25] * 3)
    with torch.no_grad():
        classes = model(x).argmax(1).tolist()
    maps = cam_maps(model, x, classes)
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0
    assert not np.allclose(maps[0], maps[1])
    ov = overlay(images[0], maps[0])
    assert ov.shape == (64, 64, 3) and ov.dtype == np.uint8


def test_gallery_writes_correct_and_wrong_cases(tmp_path):
    model = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (8, 3, 48, 48), dtype=torch.uint8, generator=gen)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([[.9, .1], [.8, .2], [.3, .7], [.6, .4], [.2, .8], [.4, .6], [.7, .3], [.1, .9]])
    entries = gallery(model, images, labels, probs, [f"img{i}.png" for i in range(8)], ["benign", "malignant"],
                      [0.5] * 3, [0.25] * 3, tmp_path, per_kind=1)
    kinds = {(e["true"], e["kind"]) for e in entries}
    assert kinds == {("benign", "correct"), ("benign", "wrong"), ("malignant", "correct"), ("malignant", "wrong")}
    # the most confident of each kind: benign correct = image 0 (0.9), malignant wrong = image 6 (0.7)
    by = {(e["true"], e["kind"]): e for e in entries}
    assert by["benign", "correct"]["path"] == "img0.png" and by["malignant", "wrong"]["path"] == "img6.png"
    assert json.loads((tmp_path / "gallery.json").read_text()) == entries
    assert all((tmp_path / e["file"]).stat().st_size > 100 for e in entries)
