"""LoRA and SSF: what they adapt, that merging is exact, and that a grid of transformers and a
modern CNN runs every strategy with them, caches frozen prefixes and deploys the merged model."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.models import adapters
from medtune.models.backbones import blocks, create_backbone
from medtune.training.strategies import REGISTRY, create_strategy, depth
from tests.conftest import PROB_ATOL, PYTHON, cli_env, tiny_png_config, write_png

pytest.importorskip("peft")  # the `peft` extra (in dev)

VIT, CONVNEXT = "vit_tiny_patch16_224", "convnext_atto"


def model_of(name: str):
    torch.manual_seed(0)
    return create_backbone(name, pretrained=False, num_classes=3).eval()


def perturb(model, marker: str) -> None:
    """Move the adapter's tensors off their start values (LoRA's B starts at zero: a no-op)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if marker in n:
                p.add_(0.05 * torch.randn_like(p))


def test_lora_targets_attention_on_a_vit_and_ungrouped_convs_on_a_cnn_never_the_stem_or_head():
    vit = model_of(VIT)
    assert adapters.lora_modules(vit, "auto") == [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    cnn = model_of(CONVNEXT)
    names = adapters.lora_modules(cnn, "auto")
    mods = dict(cnn.named_modules())
    assert names and not any(n.startswith(("stem", "head")) for n in names)
    assert all(getattr(mods[n], "groups", 1) == 1 for n in names)
    assert not any(n.endswith("conv_dw") for n in names)  # ConvNeXt's depthwise 7x7 convolutions stay
    assert any(n.endswith("mlp.fc1") for n in names)


@pytest.mark.parametrize("name", [VIT, CONVNEXT])
@pytest.mark.parametrize("strategy", ["lora", "ssf"])
def test_merged_model_is_the_plain_architecture_and_predicts_what_the_adapted_one_did(name, strategy):
    plain = model_of(name)
    keys = set(plain.state_dict())
    s = create_strategy(strategy)
    model = copy.deepcopy(plain)
    s.adapt(model)
    perturb(model, {"lora": ".lora_", "ssf": ".ssf_"}[strategy])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before_merge = model(x)
        changed = s.merge(model)
        after = model(x)
    assert set(model.state_dict()) == keys  # loads into a freshly created model: bundle, export, predict
    assert type(model) is type(plain) and "peft_config" not in vars(model)
    torch.testing.assert_close(after, before_merge, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(after, plain(x), atol=1e-4)  # the adapter did something
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert moved == changed
    stem = set(blocks(plain)[0].param_names)
    if strategy == "lora":
        assert not moved & stem and all(k.endswith(".weight") for k in moved)


def test_ssf_on_batchnorm_in_train_mode_is_a_scale_and_shift_of_its_output():
    """The reparametrisation equals the paper's operation: gamma * BN(x) + beta with batch
    statistics, before the activation timm fuses into its BatchNorm."""
    import torch.nn.functional as F

    model = create_backbone("test_efficientnet", pretrained=False, num_classes=2).train()
    bn = model.bn1
    w, b = bn.weight.detach().clone(), bn.bias.detach().clone()
    torch.manual_seed(0)
    adapters.add_ssf(model)
    gamma = bn.parametrizations.weight[0].ssf_scale
    beta = bn.parametrizations.bias[0].ssf_shift
    assert gamma is bn.parametrizations.bias[0].ssf_scale  # one scale for weight and bias
    x = torch.randn(8, w.numel(), 4, 4)
    expected = (F.batch_norm(x, None, None, w, b, training=True, eps=bn.eps) * gamma.view(1, -1, 1, 1)
                + beta.view(1, -1, 1, 1))
    torch.testing.assert_close(bn(x), bn.act(expected))


def test_list_depths_states_the_parameter_share_of_each_peft_strategy():
    out = subprocess.run([PYTHON, "-m", "medtune", "list", "depths", VIT, "--random-init", "--json"],
                         capture_output=True, text=True, env=cli_env(), check=True)
    rows = {r["strategy"]: r for r in json.loads(out.stdout)["depths"]}
    full, probe = rows["full_ft"]["trainable_fraction"], rows["linear_probe"]["trainable_fraction"]
    for name in ("lora", "ssf", "bitfit"):
        assert probe < rows[name]["trainable_fraction"] < 0.1 * full, name
        assert rows[name]["trainable_params"] > 0
    # LoRA's count is its A and B matrices plus the head: rank 8 on each block's qkv (192 -> 576)
    model = create_backbone(VIT, pretrained=False, num_classes=2)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert rows["lora"]["trainable_params"] == len(model.blocks) * 8 * (192 + 576) + head
    assert (depth(create_strategy("lora", rank=4), model)["trainable_params"]
            == len(model.blocks) * 4 * (192 + 576) + head)


@pytest.fixture(scope="module")
def modern_grid(tmp_path_factory):
    """Every strategy on a ViT and a ConvNeXt (tiny, random init), 2 folds, 1 epoch."""
    import medtune

    root = tmp_path_factory.mktemp("modern")
    data = root / "data"
    for c, cls in enumerate(("benign", "malignant")):
        for i in range(10):
            write_png(data / cls / f"P{c}{i:02d}_{i}.png", seed=1000 * c + i, size=32)
    store = root / "modern.sqlite"
    raw = tiny_png_config(data, store)
    strategies = [*sorted(REGISTRY), "auto_depth"]  # every registered strategy, and the selector
    params = {"lp_ft": {"lp_epochs": 1}, "partial_ft": {"blocks": 1}, "blockwise_ft": {"blocks": 1},
              "surgical": {"block": "middle"}, "gradual_unfreeze": {"every": 1},
              "auto_depth": {"candidates": ["linear_probe", "lora", "ssf"], "inner_folds": 2}}
    raw.update(backbones=[{"name": VIT, "pretrained": False, "image_size": 32},
                          {"name": CONVNEXT, "pretrained": False, "image_size": 32}],
               strategies=[{"name": n, **params.get(n, {})} for n in strategies], folds=2, keep_best=True)
    raw["train"] = {**raw.get("train", {}), "epochs": 2}
    summary = medtune.run(raw, progress=False)
    return raw, store, summary, strategies


def test_every_strategy_runs_on_a_vit_and_a_convnext_and_adapters_use_the_cache(modern_grid):
    from medtune.evaluation.store import Store, read_cells

    raw, store, summary, strategies = modern_grid
    assert summary.failed == 0 and summary.done == 2 * 2 * len(strategies)
    with Store(store) as s:
        cells = read_cells(s)
    by = {}
    for _, c in cells.iterrows():
        by.setdefault((c.backbone, c.strategy), []).append(c["info"])
    for b in (VIT, CONVNEXT):
        for st in ("lora", "ssf"):
            assert (b, st) in by, (b, st)
        # LoRA leaves the stem frozen: its output comes from the cache, which linear_probe etc. filled
        lora = by[(b, "lora")]
        assert all(h["cut"] > 0 for i in lora for h in i["history"])
        assert any(i["cache_hits"] > 0 for i in lora)
        assert all(0 < i["trainable_fraction"] < 0.2 for i in lora + by[(b, "ssf")])
        picks = [i["auto_depth"]["picked"] for (bb, st), cells in by.items() if bb == b and st.startswith("auto_depth")
                 for i in cells]
        assert len(picks) == 2 and set(picks) <= {"linear_probe", "lora", "ssf"}


def test_predict_on_the_deployed_lora_model_reproduces_its_stored_predictions(modern_grid, tmp_path):
    """Declared primary: the ViT's LoRA group is deployed from the grid's own fold models (merged
    weights in a plain timm state dict), and `medtune predict` gives back each fold's stored output."""
    import medtune
    from medtune.deploy.bundle import load_bundle
    from medtune.deploy.predict import predict
    from medtune.evaluation.store import Store

    from medtune.evaluation.evidence import to_risk

    raw, _, _, _ = modern_grid
    # its own store: the verdict is the store's, and the module's store also holds the ConvNeXt's LoRA
    store = tmp_path / "vit.sqlite"
    vit_only = {**raw, "backbones": raw["backbones"][:1], "strategies": ["lora"], "primary": "lora", "keep_best": True,
                "store": str(store)}
    summary = medtune.run(vit_only, progress=False)
    best = Path(f"{store}.models/best")
    meta = json.loads((best / "model.json").read_text())
    assert meta["strategy"] == "lora" and meta["backbone"] == VIT
    load_bundle(best)
    for e in meta["folds"]:
        with Store(store) as s:
            p = s.predictions([e["cell_id"]])
        df = predict(best, list(p.path), fold=e["fold"])
        # predict maps the class-weighted model's equal-prior output back to its training prevalence
        np.testing.assert_allclose(df[[f"p_{n}" for n in meta["class_names"]]].to_numpy(),
                                   to_risk(np.array(p.probs.tolist()), e["priors"]), atol=PROB_ATOL)
    assert summary.failed == 0


def test_lora_without_peft_is_a_config_error_that_says_what_to_install(monkeypatch):
    from medtune.errors import ConfigError

    monkeypatch.setattr(adapters, "peft_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"strategy 'lora'.*pip install 'medtune\[peft\]'"):
        create_strategy("lora")


def test_lora_attention_targets_on_a_cnn_fail_when_the_config_loads_naming_the_backbone():
    from medtune.config import load_config
    from medtune.errors import ConfigError

    raw = {"datasets": [{"name": "d", "source": "synthetic"}], "backbones": [VIT, CONVNEXT],
           "strategies": [{"name": "lora", "targets": ["conv", "attention"]}]}
    with pytest.raises(ConfigError,
                       match=rf"backbone '{CONVNEXT}': lora\(targets='attention'\) finds no layer.*targets='conv'"):
        load_config(raw=raw)
    load_config(raw={**raw, "backbones": [VIT]})  # a transformer has both
    auto = {**raw, "strategies": ["linear_probe", {"name": "auto_depth", "candidates": [
        "linear_probe", {"name": "lora", "targets": "attention"}]}]}
    with pytest.raises(ConfigError, match=rf"backbone '{CONVNEXT}'"):
        load_config(raw=auto)


def test_report_states_each_strategys_trainable_share_next_to_full_fine_tuning(modern_grid, tmp_path):
    from medtune.evaluation.evidence import efficiency_table, group_table, read_evidence
    from medtune.report.html import build_report

    _, store, _, _ = modern_grid
    ev = read_evidence(store)
    t = group_table(ev, n_boot=50)
    eff = efficiency_table(ev, t, "tiny_us")
    vit = eff[eff.backbone == VIT]
    share = vit["trainable params"].str.rstrip("%").astype(float)
    assert share["full_ft"] == pytest.approx(100.0) and vit.loc["full_ft", "AUC / full_ft"] == "100%"
    assert 0 < share["lora"] < 20 and 0 < share["ssf"] < share["lora"] and share["linear_probe"] < share["ssf"]
    out = build_report(store, tmp_path / "report", n_boot=50)
    html = Path(out["html"]).read_text()
    assert "What each strategy trains, and what it keeps of full fine-tuning" in html
