"""Grad-CAM: the target layer per backbone family, maps, overlays and the gallery."""

import json

import numpy as np
import pytest
import timm
import torch

from medtune.models.backbones import create_backbone
from medtune.report.explain import cam_maps, cam_target, gallery, normalise, overlay, target_layer


@pytest.mark.parametrize("arch, expected", [
    ("tf_efficientnet_lite0", "bn2"),       # after conv_head: what gets pooled
    ("resnet50", "layer4"),
    ("densenet121", "features.norm5"),
    ("inception_v3", "Mixed_7c"),
    ("resnetv2_50", "norm"),                # pre-activation net: the final norm
    ("vgg16", "features.30"),               # features[-1], as pytorch-grad-cam advises for VGG
    ("vit_tiny_patch16_224", "blocks.11.norm1"),  # before the last block: after it only the class token counts
    ("deit_tiny_distilled_patch16_224", "blocks.11.norm1"),
    ("vit_small_patch14_reg4_dinov2", "blocks.11.norm1"),
    ("swin_tiny_patch4_window7_224", "norm"),    # NHWC final norm, what the head pools
    ("test_mambaout", "stages.3"),              # NHWC, its norm is in the head after pooling
    ("convnext_atto", "stages.3"),              # norm_pre is an Identity here
])
def test_target_layer_is_last_feature_map(arch, expected):
    with torch.device("meta"):  # no weights allocated: only the module tree is inspected
        model = timm.create_model(arch, pretrained=False, num_classes=3)
    name, module = target_layer(model)
    assert name == expected
    assert module is model.get_submodule(name)


def test_convnext_with_a_final_norm_uses_it():
    with torch.device("meta"):
        model = timm.create_model("convnext_atto", pretrained=False, num_classes=3, head_norm_first=True)
    assert target_layer(model)[0] == "norm_pre"


@pytest.mark.parametrize("arch, kwargs, prefix", [
    ("vit_tiny_patch16_224", {}, 1),                        # class token
    ("deit_tiny_distilled_patch16_224", {}, 2),              # class + distillation token
    ("vit_small_patch14_reg4_dinov2", {}, 5),                # class + 4 registers
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
])
def test_token_reshape_drops_prefix_and_folds_patches_row_major(arch, kwargs, prefix):
    """Token prefix + k (k = 0 .. h*w-1) must land at row k // w, column k % w of the (h, w) grid
    of the input actually given (a 64 x 96 input to a 224 px model: not timm's 14 x 14 grid)."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=2, **kwargs)
    assert model.num_prefix_tokens == prefix
    patch = model.patch_embed.patch_size[0]
    h, w = 64 // patch, 96 // patch
    _, _, reshape = cam_target(model, (h * patch, w * patch))
    n, c = prefix + h * w, 3
    tokens = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(2, n, c)  # each token holds its index
    grid = reshape(tokens)
    assert grid.shape == (2, c, h, w)
    assert torch.equal(grid[0, 0], prefix + torch.arange(h * w, dtype=torch.float32).view(h, w))
    with pytest.raises(ValueError, match="patch grid"):
        reshape(torch.zeros(1, prefix + 7, c))  # 7 patches fit no grid: an error, not a scrambled map


def test_nchw_families_need_no_reshape_and_nhwc_ones_are_permuted():
    with torch.device("meta"):
        convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=2)
        swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=2)
    assert cam_target(convnext)[2] is None
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # NHWC: H=3, W=4, C=5
    assert torch.equal(cam_target(swin)[2](x), x.permute(0, 3, 1, 2))


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


# --------------------------------------------------------------------------- transformers
def _vit():
    """medtune's ViT (dynamic_img_size): at 64 px a 4 x 4 patch grid, not the 14 x 14 it was built for."""
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", pretrained=False, num_classes=2).eval()


def _family_model(family):
    torch.manual_seed(0)
    if family == "vit":
        return _vit()
    if family == "vit_reg4":  # DINOv2-style register tokens: 5 prefix tokens to drop
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64,
                                 reg_tokens=4).eval()
    if family == "swin":  # timm's SwinTransformer, slimmed (1.4M parameters, not 28M) to stay fast on a CPU.
        # 128 px: 32 x 32 patches -> 4 x 4 in the last stage, windows of 4. At 64 px (2 x 2) a random
        # net's class evidence is often negative at all four places: an all-zero map
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=2, img_size=128,
                                 window_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)).eval()
    return timm.create_model("convnext_atto", pretrained=False, num_classes=2).eval()


def _manual_grad_cam(model, layer, layout, x, classes):
    """Grad-CAM by hand from the layer's output in its own layout (pytorch-grad-cam's scaling):
    channel weights = gradient averaged over positions, map = ReLU(sum of weighted channels)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    saved = {}

    def keep(module, args, out):
        out.retain_grad()
        saved["out"] = out

    handle = layer.register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    logits[torch.arange(len(x)), torch.tensor(classes)].sum().backward()
    act, grad = saved["out"].detach(), saved["out"].grad
    if layout == "tokens":  # (B, prefix + h*w, C), patches row-major
        side = int((act.shape[1] - model.num_prefix_tokens) ** 0.5)
        act, grad = ([t[:, model.num_prefix_tokens:].reshape(len(t), side, side, -1) for t in (act, grad)])
        pos_axes, chan_axis = (1, 2), 3
    elif layout == "nhwc":
        pos_axes, chan_axis = (1, 2), 3
    else:
        pos_axes, chan_axis = (2, 3), 1
    cam = torch.relu((grad.mean(pos_axes, keepdim=True) * act).sum(chan_axis)).numpy()
    return scale_cam_image(scale_cam_image(cam, (x.shape[-1], x.shape[-2])))


@pytest.mark.parametrize("family, layout", [("vit", "tokens"), ("vit_reg4", "tokens"), ("swin", "nhwc"),
                                            ("convnext", "nchw")])
def test_cam_maps_per_family_match_a_manual_grad_cam(family, layout):
    """Maps are the input's size, finite, in [0, 1], not constant, and the Grad-CAM computed by hand
    in the layer's own layout: a map from axes read wrongly (tokens as NCHW, NHWC as NCHW) differs."""
    model = _family_model(family)
    size = 128 if family == "swin" else 64
    images = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    images[0, :, size // 16:size * 3 // 8, size // 16:size * 3 // 8] = 255
    images[1, :, size * 5 // 8:size * 15 // 16, size * 5 // 8:size * 15 // 16] = 255
    x = normalise(images, [0.5] * 3, [0.25] * 3)
    classes = [0, 1]
    maps = cam_maps(model, x, classes)
    assert maps.shape == (2, size, size)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert all(m.std() > 1e-3 for m in maps)
    _, layer, _ = cam_target(model)
    np.testing.assert_allclose(maps, _manual_grad_cam(model, layer, layout, x, classes), atol=1e-4)


@pytest.mark.parametrize("family", ["vit", "vit_reg4", "vit_gap"])
def test_vit_cam_marks_the_one_patch_that_differs(family):
    """Without position embeddings a ViT is symmetric in its patches: on a blank image with one
    bright patch, every other patch token is identical at every layer, so the map is one value
    there and another on the bright patch. The map's extreme must be on that patch (row 1, column 2
    of the 4 x 4 grid); a transposed grid, a prefix token left in or a patch dropped puts it elsewhere."""
    if family == "vit_gap":  # no class token: the head averages the patch tokens
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64,
                                  class_token=False, global_pool="avg").eval()
    else:
        model = _family_model(family)
    with torch.no_grad():
        model.pos_embed.zero_()
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    images[:, :, 16:32, 32:48] = 255
    maps = cam_maps(model, normalise(images, [0.5] * 3, [0.25] * 3), [0, 1])
    for m in maps:
        assert m.std() > 1e-3
        away = np.abs(m - m[0, 0])  # distance from the background value
        row, col = np.unravel_index(away.argmax(), away.shape)
        assert 16 <= row < 32 and 32 <= col < 48, (row, col)


def test_gallery_runs_on_a_vit(tmp_path):
    model = _vit()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8, generator=gen)
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[.9, .1], [.3, .7], [.2, .8], [.6, .4]])
    entries = gallery(model, images, labels, probs, [f"img{i}.png" for i in range(4)], ["benign", "malignant"],
                      [0.5] * 3, [0.25] * 3, tmp_path, per_kind=1)
    assert {(e["true"], e["kind"]) for e in entries} == {("benign", "correct"), ("benign", "wrong"),
                                                         ("malignant", "correct"), ("malignant", "wrong")}
    assert all((tmp_path / e["file"]).stat().st_size > 100 for e in entries)
