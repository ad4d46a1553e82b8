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

from medtune.models.backbones import blocks, chain, classifier_param_names, create_backbone
from medtune.config import AugmentConfig
from medtune.training.strategies import REGISTRY, AutoRGN, AutoSNR, L2SP, create_strategy, depth, is_norm
from medtune.training.loop import FeatureCache, Runtime, TrainSettings, fit, fit_epochs, set_seed
from conftest import DEVICE, TINY

SETTINGS = TrainSettings(epochs=2, batch_size=8, lr=3e-3, val_fraction=0.0, views=2, amp="off", patience=10,
                         warmup_epochs=0)
DEFAULTS = {"auto_depth": None}  # runner-level strategy: tested in test_runner.py
BACKBONES = [TINY, "vit_tiny_patch16_224"]  # a CNN and a transformer
ADAPTERS = {"lora": ".lora_", "ssf": ".ssf_"}  # strategies that add tensors: what their names contain


def replace(settings, **changes):
    return settings.model_copy(update=changes)


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


def train(strategy, table, settings=SETTINGS, seed=0, backbone=TINY):
    set_seed(seed)
    model = create_backbone(backbone, pretrained=False, num_classes=table.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    idx = np.arange(len(table))
    rt = Runtime(torch.device(DEVICE), FeatureCache(), (backbone, table.image_size), None)
    result = fit(model, table, idx, idx[:0], strategy, settings, rt, seed=seed)
    return model, start, result


def schedule(strategy, model, epochs):
    """Per epoch: (only the classifier trains, the set of tensors the schedule trains)."""
    out = []
    for phase in strategy.phases(epochs):
        units = chain(model, phase.unit)
        for e in range(phase.epochs):
            names = {n for b, s in zip(units, phase.scales(e, units)) if s > 0 for n in b.param_names}
            out.append((names <= classifier_param_names(model), names))
    return out


def changed(model, start):
    now = model.state_dict()
    return {k for k in start if not torch.equal(now[k].cpu(), start[k])}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n not in DEFAULTS))
def test_frozen_blocks_are_bit_identical_and_gradients_follow_the_schedule(name, backbone, tiny_table):
    strategy, log = recording(make(name))
    model, start, result = train(strategy, tiny_table, backbone=backbone)
    bl = blocks(model)
    plan = schedule(strategy, model, SETTINGS.epochs)
    moved = changed(model, start)
    scheduled = set().union(*(names for _, names in plan))
    for block in bl:
        if not set(block.param_names) & scheduled:
            # parameters and BatchNorm running statistics of a frozen block stay as they were
            prefix = {p.rsplit(".", 1)[0] for p in block.param_names}
            touched = {k for k in moved if k.rsplit(".", 1)[0] in prefix}
            assert not touched, f"{name}: frozen block {block.name} changed: {sorted(touched)[:3]}"
    assert bl[-1].param_names[0] in moved, "the head always trains"
    # a head-only stretch is one convex probe fit (no SGD steps); in every other epoch the tensors
    # with a gradient are exactly those the schedule trains
    sgd = [names for i, (probe, names) in enumerate(plan) if not probe]
    per_epoch = epochs_of(log)
    n_probes = sum(1 for i, (probe, _) in enumerate(plan) if probe and (i == 0 or not plan[i - 1][0]))
    assert len(per_epoch) == len(sgd) and len(result.history) == len(sgd) + n_probes
    by_name = dict(model.named_parameters())
    for e, (names, expected) in enumerate(zip(per_epoch, sgd)):
        if name == "bitfit":
            expected = {p for p in expected
                        if p.endswith("bias") or is_norm(p, by_name[p], model) or p in bl[-1].param_names}
        if name in ADAPTERS:
            # the adapter's own tensors and the classifier get gradients, nothing else (the model
            # was merged back after training, so its names are the plain model's)
            head = classifier_param_names(model)
            assert head <= names and all(ADAPTERS[name] in p or p in head for p in names), sorted(names)[:4]
            assert len(names) > len(head)
            continue
        if name in ("auto_rgn", "auto_snr"):
            expected = {p for p in expected if not is_norm(p, by_name[p], model)}
            assert names <= expected  # Auto-SNR may freeze more tensors for the epoch
            if name == "auto_rgn":
                assert names == expected
            continue
        assert names == expected, f"{name} epoch {e}: {sorted(names ^ expected)[:4]}"
    # the trained fraction recorded for the cell is what `medtune list depths` shows for the schedule
    if name not in ("auto_rgn", "auto_snr"):
        assert result.trainable_fraction == pytest.approx(depth(strategy, model, SETTINGS.epochs)["trainable_fraction"])


def test_training_lowers_the_loss(tiny_table):
    plain = AugmentConfig(hflip=False, degrees=0, translate=0, scale=0, brightness=0, contrast=0)
    settings = replace(SETTINGS, epochs=6, lr=1e-3, augment=plain, views=1)
    for name in ("full_ft", "partial_ft"):
        _, _, result = train(make(name), tiny_table, settings)
        losses = [h["train_loss"] for h in result.history]
        assert losses[-1] < losses[0], f"{name}: {losses}"


def test_gradual_unfreeze_adds_one_stage_per_epoch_from_the_top(tiny_table):
    strategy, log = recording(create_strategy("gradual_unfreeze", every=1))
    model, _, result = train(strategy, tiny_table, replace(SETTINGS, epochs=3))
    st = chain(model, "stages")
    per_epoch = epochs_of(log)  # epoch 0 (head only) is the probe fit: no SGD steps
    assert result.history[0]["cut"] == -1 and "probe_C" in result.history[0]
    real = [i for i, b in enumerate(st[:-1]) if not b.neck]  # conv_head+bn2 trains with the stage below it
    assert [b.name for b in st if b.neck] == ["conv_head+bn2"]
    for e, names in enumerate(per_epoch, start=1):
        trained_stages = {bi for bi, b in enumerate(st) if set(b.param_names) & names}
        assert trained_stages == set(range(real[-e], len(st)))


def test_lp_ft_probes_then_trains_everything(tiny_table):
    strategy, log = recording(create_strategy("lp_ft", lp_epochs=2, ft_lr_scale=0.1))
    model, _, result = train(strategy, tiny_table, replace(SETTINGS, epochs=1))
    per_epoch = epochs_of(log)
    assert result.history[0]["cut"] == -1 and "probe_C" in result.history[0]  # one convex fit for the LP phase
    assert len(per_epoch) == 1 and per_epoch[0] == {n for n, _ in model.named_parameters()}
    assert result.history[1]["cut"] == 0


def test_lp_ft_and_full_ft_use_the_same_batchnorm_rule_by_default(tiny_table):
    """Equal terms: LP-FT follows the experiment's bn_statistics like full_ft; a strategy parameter
    `bn_statistics` names a different rule for that strategy alone, and the cell records it."""
    stats = lambda names: {k for k in names if k.endswith(("running_mean", "running_var"))}  # noqa: E731
    for bn in ("update", "keep"):
        settings = replace(SETTINGS, epochs=1, bn_statistics=bn)
        m1, s1, lp = train(create_strategy("lp_ft", lp_epochs=1), tiny_table, settings)
        m2, s2, full = train(create_strategy("full_ft"), tiny_table, settings)
        assert lp.bn_statistics == full.bn_statistics == bn
        assert bool(stats(changed(m1, s1))) == bool(stats(changed(m2, s2))) == (bn == "update")
    model, start, res = train(create_strategy("lp_ft", lp_epochs=1, bn_statistics="keep"), tiny_table,
                              replace(SETTINGS, epochs=1, bn_statistics="update"))
    assert res.bn_statistics == "keep" and not stats(changed(model, start))
    assert any(k.endswith("bn1.weight") for k in changed(model, start))  # the affine parameters still train


def probe_epoch(strategy, table, settings, cache):
    """The model right after LP-FT's probe (fit_epochs pauses after each evaluated epoch)."""
    set_seed(0)
    model = create_backbone(TINY, pretrained=False, num_classes=table.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    idx = np.arange(len(table))
    epochs = fit_epochs(model, table, idx, idx[:0], strategy, settings,
                        Runtime(torch.device(DEVICE), cache, (TINY, 48), None))
    assert "probe_C" in next(epochs)
    return model, start


def test_lp_ft_fits_its_probe_on_the_statistics_fine_tuning_starts_from(tiny_table):
    """Under `update`, fine-tuning normalises with the training images' batch statistics, so LP-FT
    first re-estimates the running statistics on them and fits the probe on those features (Kumar
    et al.'s use_new_bn_stats). Without the refresh the probe sees the start statistics; under `keep`
    nothing is refreshed. The refreshed statistics and features are cached under their own key: a second
    fit on the same images reuses them, and the pretrained statistics' features are untouched."""
    stats = lambda names: {k for k in names if k.endswith(("running_mean", "running_var"))}  # noqa: E731
    settings = replace(SETTINGS, epochs=1, bn_statistics="update")
    cache = FeatureCache()
    model, start = probe_epoch(create_strategy("lp_ft", lp_epochs=1), tiny_table, settings, cache)
    moved = changed(model, start)
    hits = cache.hits
    again, _ = probe_epoch(create_strategy("lp_ft", lp_epochs=1), tiny_table, settings, cache)
    assert cache.hits == hits + 2  # the refreshed statistics and their features, each computed once
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert stats(moved) and not (
        {k for k in moved if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        - classifier_param_names(model))  # only statistics and the probed head changed
    model, start = probe_epoch(create_strategy("lp_ft", lp_epochs=1, refresh_bn=False), tiny_table,
                               settings, FeatureCache())
    assert not stats(changed(model, start))
    model, start = probe_epoch(create_strategy("lp_ft", lp_epochs=1), tiny_table,
                               replace(settings, bn_statistics="keep"), FeatureCache())
    assert not stats(changed(model, start))
    # a linear probe after LP-FT, sharing the cache, gets the pretrained statistics' features
    _, _, after = train(create_strategy("linear_probe"), tiny_table, replace(settings, val_fraction=0.0))
    rt = Runtime(torch.device(DEVICE), cache, (TINY, 48), None)
    set_seed(0)
    shared = fit(create_backbone(TINY, pretrained=False, num_classes=tiny_table.num_classes), tiny_table,
                 np.arange(len(tiny_table)), np.arange(0), create_strategy("linear_probe"), settings, rt)
    idx = np.arange(len(tiny_table))
    assert np.array_equal(shared.predict_proba(tiny_table, idx), after.predict_proba(tiny_table, idx))


def test_the_refreshed_statistics_are_computed_once_for_the_candidates_of_a_rate_choice(tiny_table, monkeypatch):
    """The candidates of a learning-rate choice start LP-FT from the same weights on the same images,
    so the refresh pass (every view of the training images) runs once and the others load its
    statistics, bit for bit; without a cache every fit refreshes."""
    import medtune.training.loop as loop
    calls = []
    real = loop.refresh_bn_statistics
    monkeypatch.setattr(loop, "refresh_bn_statistics", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    settings = replace(SETTINGS, epochs=1, bn_statistics="update")
    cache = FeatureCache()
    first, _ = probe_epoch(create_strategy("lp_ft", lp_epochs=1), tiny_table, settings, cache)
    second, _ = probe_epoch(create_strategy("lp_ft", lp_epochs=1), tiny_table, replace(settings, lr=1e-4), cache)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    probe_epoch(create_strategy("lp_ft", lp_epochs=1), tiny_table, settings, None)
    assert len(calls) == 2


def test_refresh_bn_statistics_is_the_mean_over_the_views_and_changes_no_weight(tiny_table):
    from medtune.training.features import Forward, Inputs
    from medtune.training.loop import refresh_bn_statistics
    set_seed(0)
    model = create_backbone(TINY, pretrained=False, num_classes=tiny_table.num_classes)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = replace(SETTINGS, batch_size=len(tiny_table))  # one batch per view: the mean is exact
    inputs = Inputs(tiny_table, Forward(model, None), 0, settings,
                    Runtime(torch.device(DEVICE), None, (TINY, 48), None))
    idx = np.arange(len(tiny_table))
    with torch.no_grad():
        stem = [model.conv_stem(inputs.images(torch.as_tensor(idx), torch.full((len(idx),), v))) for v in range(2)]
    model.eval()
    refresh_bn_statistics(model, inputs, idx, settings.batch_size)
    expected = torch.stack([h.mean(dim=(0, 2, 3)) for h in stem]).mean(0)
    assert torch.allclose(model.bn1.running_mean, expected, atol=1e-5)
    assert model.bn1.momentum == 0.1 and not any(m.training for m in model.modules())  # as it was
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_bn_statistics_update_keep_and_update_all(tiny_table):
    """`update` (the default) re-estimates the statistics of trained blocks only; `keep` never moves
    them while the affine parameters still train; `update_all` moves frozen blocks' too, and then the
    frozen body cannot be cached."""
    settings = replace(SETTINGS, epochs=1)
    stats = lambda names: {k for k in names if k.endswith(("running_mean", "running_var"))}  # noqa: E731

    def run(strategy, bn):
        model, start, res = train(strategy, tiny_table, replace(settings, bn_statistics=bn))
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


def test_auto_snr_uses_the_unbiased_variance_of_the_reference_code():
    """Lee et al.'s code divides by torch.var (unbiased). For the gradient rows (1, -1) the unbiased
    variance is 2, so SNR = mean(1/2, 1/2) = 0.5 and the default 0.95 threshold freezes the tensor;
    the biased variance (1) would give SNR 1.0 and train it."""
    g = torch.tensor([[1.0], [-1.0]])
    assert AutoSNR().statistic(g, g) == pytest.approx(0.5, rel=1e-6)
    groups = groups_with([([[1.0], [-1.0]], [[1.0], [1.0]])])
    AutoSNR(measure_batches=1).after_backward(groups, 0)
    assert groups[0]["lr"] == 0.0


def test_frozen_and_unfrozen_strategies_draw_the_same_views(tiny_table):
    """Equal terms: a cached (frozen-prefix) strategy and one that trains from the input see, for the
    same seed, the same training images: the cached prefix output of a batch is the prefix applied to
    the images the uncached path draws, and view 0 is the plain image."""
    from medtune.training.features import Forward, Inputs

    model = create_backbone(TINY, pretrained=False, num_classes=tiny_table.num_classes).eval()
    from medtune.models.backbones import feature_chain

    fwd = Forward(model, feature_chain(model, 48))
    settings = replace(SETTINGS, views=4, channels_last=False)
    rt = Runtime(torch.device("cpu"), FeatureCache(), (TINY, tiny_table.image_size), None)
    cut = 3
    raw, cached = Inputs(tiny_table, fwd, 0, settings, rt), Inputs(tiny_table, fwd, cut, settings, rt)
    idx = np.arange(len(tiny_table))[::2]
    x = raw.batch(idx, train=True, gen=torch.Generator().manual_seed(7))
    h = cached.batch(idx, train=True, gen=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(fwd.prefix(x, cut), h, atol=1e-4, rtol=1e-4)
    views = torch.randint(0, 4, (len(idx),), generator=torch.Generator().manual_seed(7))
    assert (views > 0).any() and (views == 0).any()  # the batch mixes plain and augmented views
    plain = (tiny_table.images[idx].float() / 255 - raw.mean) / raw.std
    same = torch.isclose(x, plain, atol=1e-6).flatten(1).all(1)
    assert torch.equal(same, views == 0)  # view 0 is the plain image; views > 0 are augmented


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


def test_no_import_cycles_in_the_core():
    """Imports point one way, also inside functions: no module of the core (data, synthetic, splits,
    quality, backbones, strategies, features, precision, probe, the training loop) is on an import cycle."""
    from tests.test_imports import import_graph

    graph = import_graph()

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph.get(start, ()))

    core = ["data.loaders", "data.synthetic", "data.table", "data.folds", "data.splits", "data.quality",
            "models.backbones", "training.strategies.__init__", "training.features", "training.precision",
            "models.probe", "training.loop"]
    assert set(core) <= set(graph)
    assert [m for m in core if reaches(m, m)] == []


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "convnext_atto"])
def test_transformers_cache_their_frozen_prefix_at_the_configured_size(backbone, tiny_table):
    """Token maps are cached like feature maps: a frozen prefix of a ViT (or ConvNeXt) at 48 px is
    computed once and reused by the next fit of the same backbone."""
    cache = FeatureCache()
    rt = Runtime(torch.device(DEVICE), cache, (backbone, tiny_table.image_size), None)
    idx = np.arange(len(tiny_table))
    cuts = []
    for _ in range(2):
        set_seed(0)
        model = create_backbone(backbone, pretrained=False, num_classes=tiny_table.num_classes)
        res = fit(model, tiny_table, idx, idx[:0], create_strategy("partial_ft", blocks=1), SETTINGS, rt)
        cuts.append(res.history[0]["cut"])
    assert cuts[0] == cuts[1] > 0 and cache.misses == 1 and cache.hits >= 1


def test_adding_a_strategy_is_one_registered_class(tmp_path, monkeypatch):
    """A new method is one `Strategy` subclass stating its schedule: registered, it is a valid `strategies:`
    entry, its cells run and store the share it trained; neither the trainer nor the grid learns its name."""
    import json
    from typing import ClassVar

    import yaml

    import medtune
    from conftest import tiny_config
    from medtune.evaluation.store import Store
    from medtune.training.strategies import REGISTRY, Phase, Strategy, everything, head_only

    @dataclasses.dataclass(frozen=True)
    class HeadThenAll(Strategy):
        name: ClassVar[str] = "head_then_all"
        summary: ClassVar[str] = "the head alone for the first epoch, then every block (a test strategy)"
        citation: ClassVar[str] = "none"

        def phases(self, epochs: int) -> list[Phase]:
            return [self.phase(1, head_only), self.phase(max(epochs - 1, 1), everything())]

    monkeypatch.setitem(REGISTRY, HeadThenAll.name, HeadThenAll)  # unregistered when the test ends
    raw = yaml.safe_load(tiny_config(tmp_path, strategies=["linear_probe", "head_then_all"]).read_text())
    raw["train"].update(epochs=2, patience=2)
    summary = medtune.run(raw, progress=False)
    assert summary.failed == 0 and summary.done == 4, summary
    with Store(raw["store"]) as s:
        cells = s.cells()
    info = {r.strategy: json.loads(r.info_json) for r in cells.itertuples() if r.fold == 0}
    assert info["head_then_all"]["trainable_fraction"] == pytest.approx(1.0)
    assert info["linear_probe"]["trainable_fraction"] < 0.5


@pytest.mark.parametrize("name, reused", [("full_ft", True), ("partial_ft", True), ("lora", False)])
def test_the_inner_validation_predictions_are_the_best_epochs_own(tiny_table, monkeypatch, name, reused):
    """The best epoch's validation pass already predicted the inner validation images with the very
    weights and inputs the fit returns, so asking for them again (the choice's inner scores, the cell's
    stored inner_val predictions) costs no forward pass and gives the same numbers bit for bit. An
    adapter merged into the weights changes them by rounding: then they are computed again."""
    import medtune.training.loop as loop
    settings = replace(SETTINGS, epochs=2, amp="auto")
    set_seed(0)
    model = create_backbone(TINY, pretrained=False, num_classes=tiny_table.num_classes)
    idx = np.arange(len(tiny_table))
    val_idx = idx[::3]
    fit_idx = np.setdiff1d(idx, val_idx)
    rt = Runtime(torch.device(DEVICE), FeatureCache(), (TINY, 48), None)
    result = fit(model, tiny_table, fit_idx, val_idx, create_strategy(name), settings, rt)
    fresh = loop.predict_proba(result.forward, result.inputs(tiny_table), val_idx, rt)
    calls = []
    real = loop.predict_proba
    monkeypatch.setattr(loop, "predict_proba", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert np.array_equal(result.predict_proba(tiny_table, val_idx), fresh)
    assert (not calls) == reused
    result.predict_proba(tiny_table, val_idx[:-1])  # other images are predicted
    assert calls
