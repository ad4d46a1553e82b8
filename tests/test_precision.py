"""Mixed precision where it pays: which part of a fit runs in bf16 is a fixed rule, not a timing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.backbones import create_backbone
from medtune.strategies import create_strategy
from medtune.train import FeatureCache, Runtime, TrainSettings, fit, has_depthwise_conv, trained_part_dtype

CPU_BF16 = Runtime(torch.device("cpu"), None, (), torch.bfloat16)


@pytest.fixture(scope="module")
def nets():
    return {name: create_backbone(name, pretrained=False, num_classes=3) for name in ("test_efficientnet", "test_resnet")}


def test_depthwise_networks_train_small_maps_in_fp32_on_a_cpu(nets):
    lite, resnet = nets["test_efficientnet"], nets["test_resnet"]
    assert has_depthwise_conv(lite) and not has_depthwise_conv(resnet)
    assert trained_part_dtype(CPU_BF16, lite, 7) is None          # top blocks on cached 7x7 maps
    assert trained_part_dtype(CPU_BF16, lite, 64) is None         # a 128 px image after the stem
    assert trained_part_dtype(CPU_BF16, lite, 112) is torch.bfloat16  # a 224 px image after the stem
    assert trained_part_dtype(CPU_BF16, resnet, 7) is torch.bfloat16
    cuda = Runtime(torch.device("cuda"), None, (), torch.bfloat16)
    assert trained_part_dtype(cuda, lite, 7) is torch.bfloat16
    off = Runtime(torch.device("cpu"), None, (), None)
    assert trained_part_dtype(off, resnet, 112) is None


@pytest.mark.parametrize("name, amp, expected", [("test_efficientnet", "auto", "float32"),
                                                ("test_resnet", "auto", "bfloat16"),
                                                ("test_efficientnet", "on", "bfloat16")])  # `on` = everywhere
def test_a_fit_on_bf16_cached_features_records_and_uses_the_phase_precision(name, amp, expected, tiny_table):
    """The cache holds bf16 maps; a phase judged fp32 must convert them and still train."""
    settings = TrainSettings(epochs=2, batch_size=8, val_fraction=0.0, views=2, amp=amp, warmup_epochs=0)
    model = create_backbone(name, pretrained=False, num_classes=tiny_table.num_classes)
    rt = Runtime(torch.device("cpu"), FeatureCache(), (name, tiny_table.image_size), torch.bfloat16)
    idx = np.arange(len(tiny_table))
    result = fit(model, tiny_table, idx, idx[:0], create_strategy("partial_ft", blocks=1), settings, rt)
    assert [h["precision"] for h in result.history] == [expected, expected]
    assert all(h["cut"] != 0 for h in result.history)  # the prefix came from the cache
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
