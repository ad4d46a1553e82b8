"""Depth in the papers' units: what each standard depth setting trains, checked on the real
architectures (random init) against counts made independently of medtune's block code."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from medtune.models.backbones import blocks, create_backbone, layers, stages
from medtune.training.strategies import create_strategy, depth, scheduled_params
from conftest import PYTHON, cli_env


def list_depths(name: str) -> dict[str, dict]:
    out = subprocess.run([PYTHON, "-m", "medtune", "list", "depths", name, "--random-init", "--json"],
                         capture_output=True, text=True, env=cli_env(), timeout=300, check=True).stdout
    return {r["strategy"]: r for r in json.loads(out)["depths"]}


@pytest.fixture(scope="module")
def resnet50():
    return create_backbone("resnet50", pretrained=False, num_classes=2)


def share(model, prefixes) -> float:
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return sum(v for n, v in sizes.items() if n.startswith(prefixes)) / sum(sizes.values())


def test_resnet50_blocks_are_bottlenecks(resnet50):
    names = [b.name for b in blocks(resnet50)]
    # 3 + 4 + 6 + 3 bottlenecks between the stem and the head
    assert names[0] == "conv1+bn1" and names[-1] == "head" and len(names) == 2 + 16
    assert names[1:4] == ["layer1.0", "layer1.1", "layer1.2"] and names[-2] == "layer4.2"
    assert [b.name for b in stages(resnet50)] == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4", "head"]


def test_layers_are_the_parameterised_modules_in_forward_order(resnet50):
    convs_norms = [n for n, m in resnet50.named_modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear))]
    chain = layers(resnet50)
    assert len(chain) == len(convs_norms) == 53 + 53 + 1  # Keras counts the same 107 weighted layers
    assert [b.name for b in chain[:3]] == ["conv1", "bn1", "layer1.0.conv1"]
    # the downsample branch runs after the main branch of a bottleneck in timm's forward
    assert chain[-2].name == "layer4.2.bn3" and chain[-1].name == "head"


def test_partial_fractions_train_strictly_nested_sets_below_layer4(resnet50):
    sets = [scheduled_params(create_strategy("partial_ft", fraction=p), resnet50) for p in (0.05, 0.15, 0.3)]
    assert sets[0] < sets[1] < sets[2]
    fractions = [depth(create_strategy("partial_ft", fraction=p), resnet50)["trainable_fraction"]
                 for p in (0.05, 0.15, 0.3)]
    assert fractions[0] < fractions[1] < fractions[2]
    assert fractions[0] < share(resnet50, ("layer4.", "fc."))
    # ceil(0.05 x 107) = 6 layers: fc and the last 5 of layer4.2 (bn3, conv3, bn2, conv2, bn1)
    expected = {f"layer4.2.{m}.{p}" for m in ("conv2", "conv3") for p in ("weight",)} | \
        {f"layer4.2.{m}.{p}" for m in ("bn1", "bn2", "bn3") for p in ("weight", "bias")} | {"fc.weight", "fc.bias"}
    assert sets[0] == expected


def test_cli_list_depths_resnet50_and_vgg16():
    r = list_depths("resnet50")
    f = [r[f"partial_ft(fraction={p})"]["trainable_fraction"] for p in (0.05, 0.15, 0.3)]
    model = create_backbone("resnet50", pretrained=False, num_classes=2)
    assert f[0] < f[1] < f[2] and f[0] < share(model, ("layer4.", "fc."))
    assert r["surgical(block='first')"]["trainable_blocks"] == ["conv1+bn1", "layer1.0", "layer1.1", "layer1.2", "head"]
    v = list_depths("vgg16")
    for n in range(1, 5):
        assert v[f"blockwise_ft(blocks={n})"]["trainable_blocks"] == [f"block{b}" for b in range(6 - n, 6)] + ["fc"]
    assert v["blockwise_ft(blocks=5)"]["trainable_blocks"] == [f"block{b}" for b in range(1, 6)] + ["fc"]
    # the probe is a linear classifier on fc7's features: VGG's fc6 and fc7 stay frozen (2 of the fc block's 6 tensors)
    assert v["linear_probe"]["trainable_blocks"] == ["fc (2/6 tensors)"]
    assert v["linear_probe"]["trainable_params"] == 4096 * 2 + 2
    vf = [v[f"partial_ft(fraction={p})"]["trainable_fraction"] for p in (0.05, 0.15, 0.3)]
    assert vf[0] < vf[1] < vf[2]  # the fraction splits the fc block (fc6, fc7, classifier)


def test_linear_probe_and_lp_fts_probe_fit_only_the_final_classifier_on_vgg():
    """VGG's fc block (fc6, fc7, classifier) heads its block chain, so head-only in blocks would have
    trained 89% of VGG16 under the probe's name, by SGD; the probe phases train the classifier alone,
    which makes them the convex probe (a learning-rate choice then has nothing to choose)."""
    from medtune.models.backbones import chain, classifier_param_names
    from medtune.training.strategies import uses_learning_rate

    model = create_backbone("vgg11", pretrained=False, num_classes=3)
    head = classifier_param_names(model)
    assert head == {"head.fc.weight", "head.fc.bias"}
    assert scheduled_params(create_strategy("linear_probe"), model) == head
    lp_ft = create_strategy("lp_ft", lp_epochs=2)
    probe = lp_ft.phases(4)[0]
    assert scheduled_params(lp_ft, model, epochs=4) == {n for n, _ in model.named_parameters()}  # then everything

    units = chain(model, probe.unit)
    trained = {n for b, sc in zip(units, probe.scales(0, units)) if sc > 0 for n in b.param_names}
    assert trained == head
    assert not uses_learning_rate(create_strategy("linear_probe"), 4, "update")
    # gradual unfreezing and the block counts still treat the fc block as VGG's head unit
    assert chain(model, "blocks")[-1].name == "fc" and "pre_logits.fc1.weight" in chain(model, "blocks")[-1].param_names


def test_vgg16_blocks_are_the_five_pool_delimited_conv_blocks_and_the_fc_block():
    model = create_backbone("vgg16", pretrained=False, num_classes=2)
    bl = blocks(model)
    assert [b.name for b in bl] == ["block1", "block2", "block3", "block4", "block5", "fc"]
    # VGG16: 2, 2, 3, 3, 3 convolutions per block (Simonyan & Zisserman, configuration D)
    assert [len(b.param_names) // 2 for b in bl[:5]] == [2, 2, 3, 3, 3]
    assert {n.split(".")[0] for n in bl[-1].param_names} == {"pre_logits", "head"}


@pytest.mark.parametrize("name, first", [("vit_tiny_patch16_224", "cls_token+pos_embed+patch_embed"),
                                         ("convnext_atto", "stem")])
def test_transformer_blocks_embedding_each_block_norm_head(name, first):
    model = create_backbone(name, pretrained=False, num_classes=2)
    names = [b.name for b in blocks(model)]
    assert names[0] == first and names[-1] == "head"
    if name.startswith("vit"):
        assert names[1:13] == [f"blocks.{i}" for i in range(12)] and names[13] == "norm"
    with torch.no_grad():  # at a size other than the weights' 224
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_docs_depth_table_is_current_for_resnet50(resnet50):
    """docs/depths.json (rendered into docs/strategies.md) is what the code computes today."""
    from pathlib import Path

    from medtune.training.strategies import PEFT_DEPTHS, STANDARD_DEPTHS, parse_label

    stored = json.loads((Path(__file__).resolve().parents[1] / "docs" / "depths.json").read_text())
    assert set(stored) == {"vgg16", "vgg19", "resnet50", "resnet101", "inception_v3", "densenet121", "resnetv2_50",
                           "efficientnet_lite0"}
    now = [{**depth(parse_label(label), resnet50), "strategy": label} for label in (*STANDARD_DEPTHS, *PEFT_DEPTHS)]
    assert stored["resnet50"] == now, "stale: run scripts/gen_depth_table.py, then gen_config_docs.py"


def test_vgg_partial_fractions_split_the_fc_block():
    """partial_ft(fraction) counts layers from the top: on VGG fc6 and fc7 are two of them, so 0.05
    (the classifier), 0.15 (fc7 + classifier) and 0.3 (the fc block and the last conv) differ;
    all three had trained the whole fc block (89% of VGG16)."""
    model = create_backbone("vgg11", pretrained=False, num_classes=2)
    sets = [scheduled_params(create_strategy("partial_ft", fraction=p), model) for p in (0.05, 0.15, 0.3)]
    assert sets[0] < sets[1] < sets[2]
    assert sets[0] == {"head.fc.weight", "head.fc.bias"}
    assert sets[1] == sets[0] | {"pre_logits.fc2.weight", "pre_logits.fc2.bias"}
    assert {"pre_logits.fc1.weight", "features.18.weight"} <= sets[2]
    assert [b.name for b in layers(model)][-3:] == ["pre_logits.fc1", "pre_logits.fc2", "classifier"]
