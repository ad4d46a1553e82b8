"""The contract of every registered strategy, run for real on a tiny timm model and synthetic data.

What defines each method is checked on the weights themselves: frozen tensors are bit-identical
after training, the set of tensors that receive gradients each epoch follows the schedule, and
each method's own rule (L2-SP's penalty, Auto-RGN's learning rates, BitFit's tensor set) holds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from medtune.backbones import blocks, create_backbone
from medtune.strategies import REGISTRY, AutoRGN, AutoSNR, L2SP, create_strategy, is_norm
from medtune.train import Augment, FeatureCache, Runtime, TrainSettings, fit, set_seed
from conftest import DEVICE, TINY

SETTINGS = TrainSettings(epochs=2, batch_size=8, lr=3e-3, val_fraction=0.0, views=2, amp="off", patience=10,
                         warmup_epochs=0)
DEFAULTS = {"auto_depth": None}  # runner-level strategy: tested in test_runner.py


def make(name: str):
    params = {"lp_ft": {"lp_epochs": 1}, "partial_ft": {"blocks": 2}, "blockwise_ft": {"blocks": 1},
              "surgical": {"block": "middle"}}.get(name, {})
    return create_strategy(name, **params)


def recording(strategy):
    """The same strategy, also recording which tensors have a gradient at every step."""
    log: list[tuple[int, frozenset]] = []
    base = type(strategy)

    def after_backward(self, groups, step_in_epoch):
        base.after_backward(self, groups, step_in_epoch)
        log.append((step_in_epoch, frozenset(g["name"] for g in groups if g["params"][0].grad is not None)))

    cls = dataclasses.make_dataclass(f"Rec{base.__name__}", [], bases=(base,), frozen=True,
                                     namespace={"after_backward": after_backward})
    return cls(**strategy.params()), log


def epochs_of(log):
    out, current = [], None
    for step, names in log:
        if step == 0:
            current = set()
            out.append(current)
        current |= names
    return out


def train(strategy, table, settings=SETTINGS, seed=0):
    set_seed(seed)
    model = create_backbone(TINY, pretrained=False, num_classes=table.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    idx = np.arange(len(table))
    rt = Runtime(torch.device(DEVICE), FeatureCache(), (TINY, table.image_size), None)
    result = fit(model, table, idx, idx[:0], strategy, settings, rt, seed=seed)
    return model, start, result


def changed(model, start):
    now = model.state_dict()
    return {k for k in start if not torch.equal(now[k].cpu(), start[k])}


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n not in DEFAULTS))
def test_frozen_blocks_are_bit_identical_and_gradients_follow_the_schedule(name, tiny_table):
    strategy, log = recording(make(name))
    model, start, result = train(strategy, tiny_table)
    bl = blocks(model)
    n = len(bl)
    total = strategy.total_epochs(SETTINGS.epochs)
    schedule = [strategy.lr_scales(e, n) for e in range(total)]
    assert all(len(s) == n for s in schedule)
    moved = changed(model, start)
    for bi, block in enumerate(bl):
        frozen_all_along = all(s[bi] == 0 for s in schedule)
        if frozen_all_along:
            # parameters and BatchNorm running statistics of a frozen block stay as they were
            prefix = {p.rsplit(".", 1)[0] for p in block.param_names}
            touched = {k for k in moved if k.rsplit(".", 1)[0] in prefix}
            assert not touched, f"{name}: frozen block {block.name} changed: {sorted(touched)[:3]}"
    assert bl[-1].param_names[0] in moved, "the head always trains"
    # per epoch, the tensors with a gradient are exactly those of the blocks the schedule trains
    per_epoch = epochs_of(log)
    assert len(per_epoch) == len(result.history) == total
    by_name = dict(model.named_parameters())
    for e, names in enumerate(per_epoch):
        expected = {p for bi, b in enumerate(bl) if schedule[e][bi] > 0 for p in b.param_names}
        if name == "bitfit":
            expected = {p for p in expected if p.endswith("bias") or is_norm(p, by_name[p], model) or p in bl[-1].param_names}
        if name in ("auto_rgn", "auto_snr"):
            expected = {p for p in expected if not is_norm(p, by_name[p], model)}
            assert names <= expected  # Auto-SNR may freeze more tensors for the epoch
            if name == "auto_rgn":
                assert names == expected
            continue
        assert names == expected, f"{name} epoch {e}: {sorted(names ^ expected)[:4]}"


def test_training_lowers_the_loss(tiny_table):
    plain = Augment(hflip=False, degrees=0, translate=0, scale=0, brightness=0, contrast=0)
    settings = dataclasses.replace(SETTINGS, epochs=6, lr=1e-3, augment=plain, views=1)
    for name in ("linear_probe", "full_ft", "partial_ft"):
        _, _, result = train(make(name), tiny_table, settings)
        losses = [h["train_loss"] for h in result.history]
        assert losses[-1] < losses[0], f"{name}: {losses}"


def test_gradual_unfreeze_adds_one_block_per_epoch_from_the_top(tiny_table):
    strategy, log = recording(create_strategy("gradual_unfreeze", every=1))
    model, _, _ = train(strategy, tiny_table, dataclasses.replace(SETTINGS, epochs=3))
    bl = blocks(model)
    per_epoch = epochs_of(log)
    for e, names in enumerate(per_epoch):
        trained_blocks = {bi for bi, b in enumerate(bl) if set(b.param_names) & names}
        assert trained_blocks == set(range(len(bl) - 1 - e, len(bl)))


def test_lp_ft_switches_from_head_only_to_everything(tiny_table):
    strategy, log = recording(create_strategy("lp_ft", lp_epochs=2, ft_lr_scale=0.1))
    model, _, result = train(strategy, tiny_table, dataclasses.replace(SETTINGS, epochs=1))
    head = set(blocks(model)[-1].param_names)
    per_epoch = epochs_of(log)
    assert [len(e) for e in per_epoch][:2] == [len(head)] * 2 and per_epoch[0] == head
    assert per_epoch[2] == {n for n, _ in model.named_parameters()}
    assert [h["cut"] for h in result.history][:2] == [-1, -1] and result.history[2]["cut"] == 0


def test_lp_ft_fine_tunes_with_the_statistics_the_probe_was_fitted_on(tiny_table):
    """LP-FT's fine-tuning phase must start from the probed function: BatchNorm keeps its running
    statistics (full_ft, for contrast, updates them), while its affine parameters do train."""
    settings = dataclasses.replace(SETTINGS, epochs=1)
    stats = lambda names: {k for k in names if k.endswith(("running_mean", "running_var"))}  # noqa: E731
    model, start, _ = train(create_strategy("lp_ft", lp_epochs=1), tiny_table, settings)
    assert not stats(changed(model, start))
    assert any(k.endswith("bn1.weight") for k in changed(model, start))
    model, start, _ = train(create_strategy("full_ft"), tiny_table, settings)
    assert stats(changed(model, start))


def test_bn_statistics_update_keep_and_update_all(tiny_table):
    """`update` (the default) re-estimates the statistics of trained blocks only; `keep` never moves
    them while the affine parameters still train; `update_all` moves frozen blocks' too, and then the
    frozen body cannot be cached."""
    settings = dataclasses.replace(SETTINGS, epochs=1)
    stats = lambda names: {k for k in names if k.endswith(("running_mean", "running_var"))}  # noqa: E731

    def run(strategy, bn):
        model, start, res = train(strategy, tiny_table, dataclasses.replace(settings, bn_statistics=bn))
        return stats(changed(model, start)), changed(model, start), res

    moved, _, res = run(create_strategy("full_ft"), "update")
    assert moved and res.bn_statistics == "update"
    moved, everything, res = run(create_strategy("full_ft"), "keep")
    assert not moved and res.bn_statistics == "keep"
    assert any(k.endswith("bn1.weight") for k in everything)  # the affine parameters train
    moved, _, res = run(create_strategy("linear_probe"), "update")
    assert not moved and res.history[0]["cut"] == -1  # frozen body: cached pooled features
    moved, _, res = run(create_strategy("linear_probe"), "update_all")
    assert {k for k in moved if k.startswith("bn1.")} and res.history[0]["cut"] == 0  # nothing cached


def test_l2_sp_penalty_is_zero_at_start_and_grows_with_distance():
    model = create_backbone(TINY, pretrained=False, num_classes=2)
    head = set(blocks(model)[-1].param_names)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n not in head}
    s = L2SP(alpha=0.5, beta=0.0)
    assert float(s.penalty(model, start).detach()) == 0.0
    w = model.conv_stem.weight
    with torch.no_grad():
        w.add_(0.1)
    assert float(s.penalty(model, start).detach()) == pytest.approx(0.5 * 0.5 * (0.1 ** 2) * w.numel(), rel=1e-4)
    with torch.no_grad():
        w.add_(0.1)
    assert float(s.penalty(model, start).detach()) == pytest.approx(0.5 * 0.5 * (0.2 ** 2) * w.numel(), rel=1e-4)
    # the head is penalised towards 0 with beta, not towards a start value
    s2 = L2SP(alpha=0.0, beta=2.0)
    head_sq = sum(float(p.pow(2).sum()) for n, p in model.named_parameters() if n in head)
    assert float(s2.penalty(model, start).detach()) == pytest.approx(head_sq, rel=1e-5)


def groups_with(grads_and_weights, base_lr=0.1):
    groups = []
    for i, (g, w) in enumerate(grads_and_weights):
        p = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))
        p.grad = torch.tensor(g, dtype=torch.float32)
        groups.append({"params": [p], "name": f"t{i}", "block": 0, "lr": base_lr, "norm": False, "is_head": False})
    return groups


def test_auto_rgn_learning_rates_are_base_times_rgn_over_max():
    # RGN = ||g|| / ||w||: 5/5 = 1.0, 1/2 = 0.5, 0.3/3 = 0.1
    groups = groups_with([([3.0, 4.0], [3.0, 4.0]), ([1.0], [2.0]), ([0.3], [3.0])])
    AutoRGN(measure_batches=1).after_backward(groups, 0)
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.05, 0.01])
    # later steps of the epoch keep the measured weights
    for g in groups:
        g["lr"] = 0.2
    AutoRGN(measure_batches=1).after_backward(groups, 1)
    assert [g["lr"] for g in groups] == pytest.approx([0.2, 0.1, 0.02])


def test_auto_snr_freezes_low_signal_tensors():
    # a constant gradient has zero variance: huge SNR; a zero-mean alternating one has SNR 1 -> below 1.5
    groups = groups_with([([[1.0], [1.0]], [[1.0], [1.0]]), ([[1.0], [-1.0]], [[1.0], [1.0]])])
    AutoSNR(threshold=1.5, measure_batches=1).after_backward(groups, 0)
    assert groups[0]["lr"] == pytest.approx(0.1) and groups[1]["lr"] == 0.0
    assert groups[1]["params"][0].grad is None


def test_every_strategy_has_a_summary_and_citation():
    for name, cls in REGISTRY.items():
        assert cls.summary and cls.citation and cls.__doc__, name


def test_gradient_criteria_leave_the_new_head_at_the_base_rate():
    groups = groups_with([([3.0, 4.0], [3.0, 4.0]), ([100.0], [1.0])])
    groups[1]["is_head"] = True  # a random head with a huge relative gradient
    AutoRGN(measure_batches=1).after_backward(groups, 0)
    assert groups[0]["lr"] == pytest.approx(0.1) and groups[1]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("criterion", [AutoRGN(measure_batches=2), AutoSNR(measure_batches=2, threshold=0.0)])
def test_gradient_criteria_skip_an_overflowed_fp16_step(criterion):
    """Under fp16 the GradScaler's first steps often overflow (inf gradients, step skipped); measured,
    they made every Auto-RGN rate NaN and the weights NaN (seen on a GPU). The next finite step counts."""
    groups = groups_with([([3.0, 4.0], [3.0, 4.0]), ([1.0, 1.0], [1.0, 2.0])])
    groups[0]["params"][0].grad = torch.tensor([float("inf"), 1.0])
    criterion.after_backward(groups, 0)
    assert all(math.isfinite(g["lr"]) for g in groups)
    for g, grad in zip(groups, ([3.0, 4.0], [1.0, 2.0])):
        g["lr"] = 0.1
        g["params"][0].grad = torch.tensor(grad)
    criterion.after_backward(groups, 1)
    assert all(math.isfinite(g["lr"]) and g["lr"] > 0 for g in groups)
    assert groups[0]["criterion_n"] == 1 and groups[1]["criterion_n"] == 2
    # the next epoch's average starts afresh even when its first step overflows
    groups[1]["params"][0].grad = torch.tensor([float("inf"), 1.0])
    criterion.after_backward(groups, 0)
    groups[1]["params"][0].grad = torch.tensor([1.0, 2.0])
    criterion.after_backward(groups, 1)
    assert groups[1]["criterion_n"] == 1
