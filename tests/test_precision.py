"""Mixed precision where it pays: which part of a fit runs in bf16 is a fixed rule, not a timing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medtune.models.backbones import create_backbone
from medtune.training.strategies import create_strategy
from medtune.training.features import FeatureCache, Runtime
from medtune.training.precision import FP32_DEPTHWISE_MAX_SIDE, depthwise_in_fp32, slow_bf16_depthwise
from medtune.training.loop import TrainSettings, fit

@pytest.fixture(scope="module")
def nets():
    return {name: create_backbone(name, pretrained=False, num_classes=3)
            for name in ("test_efficientnet", "test_resnet")}


def conv_output_dtypes(model, x, amp):
    """Output dtype of every convolution in one forward (bf16 autocast when `amp`)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.dtype))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


def test_strided_and_wide_depthwise_convolutions_run_in_fp32_under_bf16_autocast(nets):
    lite = copy.deepcopy(nets["test_efficientnet"])
    slow = {n for n, m in lite.named_modules() if slow_bf16_depthwise(m)}
    assert slow and all(".conv_dw" in n for n in slow)
    assert depthwise_in_fp32(lite) == len(slow)
    assert depthwise_in_fp32(lite) == 0  # idempotent
    assert depthwise_in_fp32(copy.deepcopy(nets["test_resnet"])) == 0  # no depthwise convolutions

    small = conv_output_dtypes(lite, torch.randn(2, 3, 32, 32), amp=True)
    assert {n for n, d in small.items() if d == torch.float32} == slow
    assert all(d == torch.bfloat16 for n, d in small.items() if n not in slow)
    # above FP32_DEPTHWISE_MAX_SIDE the casts cost more than they save: everything stays bf16
    side = 32 * FP32_DEPTHWISE_MAX_SIDE  # the slow convolutions sit after at least 4 stride-2 steps
    big = conv_output_dtypes(lite, torch.randn(1, 3, side, side), amp=True)
    assert all(d == torch.bfloat16 for d in big.values())

    # outside autocast the switched network computes exactly what the plain one does
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(lite.eval()(x), nets["test_efficientnet"].eval()(x))


@pytest.mark.parametrize("name, amp, expected, switched", [("test_efficientnet", "auto", "bfloat16", True),
                                                          ("test_resnet", "auto", "bfloat16", False),
                                                          ("test_efficientnet", "on", "bfloat16", False),
                                                          ("test_efficientnet", "off", "float32", False)])
def test_a_fit_on_cached_features_records_and_uses_the_precision(name, amp, expected, switched, tiny_table):
    """`auto` on a bf16 CPU: bf16 with the slow depthwise convolutions in fp32; `on`: bf16 everywhere."""
    settings = TrainSettings(epochs=2, batch_size=8, val_fraction=0.0, views=2, amp=amp, warmup_epochs=0)
    model = create_backbone(name, pretrained=False, num_classes=tiny_table.num_classes)
    rt = Runtime(torch.device("cpu"), FeatureCache(), (name, tiny_table.image_size),
                 None if amp == "off" else torch.bfloat16)
    idx = np.arange(len(tiny_table))
    result = fit(model, tiny_table, idx, idx[:0], create_strategy("partial_ft", blocks=1), settings, rt)
    assert [h["precision"] for h in result.history] == [expected, expected]
    assert all(h["cut"] != 0 for h in result.history)  # the prefix came from the cache
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert any("forward" in vars(m) for m in result.model.modules()) == switched


def test_no_grad_passes_in_lanes_give_the_same_features_in_order(tiny_table, monkeypatch):
    """Cache filling and prediction run batches side by side on a CPU; the result must not depend on it:
    same order, same augmentation draws, same numbers, and the caller's thread count is restored."""
    import medtune.training.features as features
    import medtune.training.precision as precision

    settings = TrainSettings(epochs=1, batch_size=8, val_fraction=0.0, views=3, amp="off", warmup_epochs=0)
    model = create_backbone("test_efficientnet", pretrained=False, num_classes=tiny_table.num_classes)
    monkeypatch.setattr(features, "inference_batch_size", lambda device, size: 5)  # several batches per view
    torch.set_num_threads(2)
    outputs = []
    for lanes in (1, 2):
        monkeypatch.setattr(features, "cpu_lanes", lambda device, n=lanes: n)
        rt = Runtime(torch.device("cpu"), FeatureCache(), ("test_efficientnet", tiny_table.image_size), None)
        result = fit(copy.deepcopy(model), tiny_table, np.arange(len(tiny_table)), np.arange(0),
                     create_strategy("linear_probe"), settings, rt, seed=0)
        feats = result.features(tiny_table, np.arange(len(tiny_table)))
        outputs.append((rt.cache.store, feats))
        assert torch.get_num_threads() == 2
    (cache1, feats1), (cache2, feats2) = outputs
    assert [k for k in cache1] == [k for k in cache2]
    for k in cache1:
        assert cache1[k].shape[0] == 3 and torch.allclose(cache1[k], cache2[k], atol=1e-5)
    np.testing.assert_allclose(feats1, feats2, atol=1e-5)
    assert precision.in_lanes(lambda x: x * x, list(range(7)), 2) == [x * x for x in range(7)]


def test_stepper_without_fp16_takes_the_plain_optimizer_step():
    """The loop's backward/step go through precision.Stepper: without fp16 it must equal a plain
    zero_grad / backward / step (and keep the true gradients for strategies and clipping)."""
    import torch

    from medtune.training.precision import Stepper

    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    stepper = Stepper(opt_a, None)
    assert stepper.scaler is None
    for _ in range(3):
        stepper.backward(a(x).square().mean())
        stepper.true_gradients()
        grad = a.weight.grad.clone()
        stepper.step()
        opt_b.zero_grad(set_to_none=True)
        b(x).square().mean().backward()
        assert torch.equal(grad, b.weight.grad)
        opt_b.step()
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, torch.nn.Linear(4, 2).weight)


def test_compile_is_off_by_rule_where_it_was_measured_not_to_pay_and_not_part_of_the_cell_key(tiny_table, tmp_path):
    """`compile: auto` follows COMPILE_PAYS (measured slower on a CPU: benchmarks/results/compile.json),
    the epoch records what applied, and the setting changes no cell id (rounding only, like `device`)."""
    from medtune.grid.cells import expand
    from medtune.config import ExperimentConfig
    from medtune.training.precision import COMPILE_PAYS, compile_pays

    cpu = torch.device("cpu")
    assert compile_pays(cpu, "auto") is COMPILE_PAYS["cpu"] is False
    assert compile_pays(cpu, "on") and not compile_pays(cpu, "off")
    assert TrainSettings(compile=False).compile == "off"  # YAML's `compile: off`
    with pytest.raises(ValueError, match="compile"):
        TrainSettings(compile="sometimes")
    settings = TrainSettings(epochs=1, batch_size=8, val_fraction=0.0, views=1, amp="off", warmup_epochs=0)
    rt = Runtime(cpu, FeatureCache(), ("test_resnet", tiny_table.image_size), None)
    model = create_backbone("test_resnet", pretrained=False, num_classes=tiny_table.num_classes)
    idx = np.arange(len(tiny_table))
    result = fit(model, tiny_table, idx, idx[:0], create_strategy("partial_ft", blocks=1), settings, rt)
    assert [h["compiled"] for h in result.history] == [False]

    raw = {"name": "k", "datasets": [{"name": "syn", "source": "synthetic"}],
           "backbones": [{"name": "test_resnet", "pretrained": False, "image_size": 48}],
           "strategies": ["full_ft"], "folds": 2}
    ids = [[c["cell_id"] for c in expand(ExperimentConfig.model_validate({**raw, "train": {"compile": mode}}), "r",
                                         {"syn@48": "f"})] for mode in ("auto", "on")]
    assert ids[0] == ids[1]


def test_compile_on_trains_the_compiled_forward_to_the_same_numbers(tiny_table):
    """`compile: on` runs the trained part through torch.compile (inductor) and records it; fp32, one
    epoch: the loss matches eager up to rounding."""
    settings = TrainSettings(epochs=1, batch_size=8, val_fraction=0.0, views=1, amp="off", warmup_epochs=0)
    losses = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)  # the same random init for both: fit seeds only after the model exists
        model = create_backbone("test_resnet", pretrained=False, num_classes=tiny_table.num_classes)
        rt = Runtime(torch.device("cpu"), FeatureCache(), ("test_resnet", tiny_table.image_size), None)
        idx = np.arange(len(tiny_table))
        result = fit(model, tiny_table, idx, idx[:0], create_strategy("partial_ft", blocks=1),
                     settings.model_copy(update={"compile": mode}), rt)
        assert [h["compiled"] for h in result.history] == [mode == "on"]
        losses[mode] = result.history[0]["train_loss"]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-3)


@pytest.mark.parametrize("cap, bf16", [("AVX512_CORE", False), ("avx2", False), ("AVX512_CORE_VNNI", False),
                                       ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True),
                                       (None, True)])
def test_amp_auto_on_a_bf16_cpu_honours_onednn_isa_cap(monkeypatch, cap, bf16):
    """A oneDNN ISA cap below AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA, the documented oneDNN switch) makes
    bf16 slow, so `amp: auto` resolves to fp32 there, as on a CPU without bf16; it is also how a store
    computed in fp32 on another machine is resumed on a bf16 one (the cell id holds the resolved dtype)."""
    from medtune.training import precision
    monkeypatch.setattr(precision, "cpu_flags", lambda: "fpu avx512f avx512_bf16 amx_bf16")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu = torch.device("cpu")
    assert precision.autocast_dtype(cpu, "auto") == (torch.bfloat16 if bf16 else None)
    assert precision.autocast_dtype(cpu, "on") == torch.bfloat16  # `on` is what the user asked for
    assert precision.autocast_dtype(cpu, "off") is None
