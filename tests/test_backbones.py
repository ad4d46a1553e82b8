import pytest
import torch

from medtune.models.backbones import blocks, create_backbone, feature_chain, preprocessing
from medtune.models.weights import embedded_weights_path
from medtune.errors import BackboneError


def test_embedded_lite0_has_real_imagenet_weights():
    """The embedded state dict is mapped positionally onto tf_efficientnet_lite0: every tensor of the
    body equals the package's file (the classifier is reset for the new task)."""
    path = embedded_weights_path("efficientnet_lite0")
    assert path is not None and path.is_file()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = create_backbone("efficientnet_lite0", num_classes=3)
    ours = model.state_dict()
    assert torch.equal(ours["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(ours["blocks.3.0.conv_pw.weight"], raw["_blocks.5._expand_conv.weight"])
    assert model.get_classifier().out_features == 3
    assert preprocessing(model)["mean"] == [0.5, 0.5, 0.5]


def test_unknown_backbone_names_suggest_close_names():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet5O'.*Did you mean.*resnet50"):
        create_backbone("resnet5O")


def test_missing_hub_weights_are_an_error_not_random_init():
    with pytest.raises(BackboneError, match=r"pretrained weights for 'resnet18'.*checkpoint.*pretrained: false"):
        create_backbone("resnet18", pretrained=True)


@pytest.mark.parametrize("name,expected", [
    ("resnet50",
     ["conv1+bn1"] + [f"layer{s}.{b}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for b in range(n)] + ["head"]),
    ("efficientnet_lite0", None),
])
def test_block_split_stem_to_head(name, expected):
    model = create_backbone(name, pretrained=False, num_classes=2)
    bl = blocks(model)
    assert bl[-1].name == "head"
    assert set(bl[-1].param_names) == {
        n for n, _ in model.get_classifier().named_parameters(prefix=bl[-1].param_names[0].rsplit(".", 1)[0])}
    names = [n for b in bl for n in b.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # every parameter, once
    if expected:
        assert [b.name for b in bl] == expected


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50", "resnet101", "inception_v3", "densenet121",
                                  "resnetv2_50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_study_backbones_split_into_blocks(name):
    """Random init (hub weights are unreachable here): the split must still be stem -> head and,
    where the net is a plain chain, the chain reproduces forward_features."""
    model = create_backbone(name, pretrained=False, num_classes=2)
    bl = blocks(model)
    assert len(bl) >= 6 and bl[-1].name in ("head", "fc")
    chain = feature_chain(model, image_size=75 if name == "inception_v3" else 64)
    assert chain is not None
    # blocks appear in order along the chain: freezing the first k blocks caches a growing prefix
    cuts = [chain.frozen_units(frozenset(n for b in bl[:k] for n in b.param_names)) for k in range(len(bl))]
    assert cuts == sorted(cuts) and cuts[0] == 0 and cuts[-1] == len(chain.units)
