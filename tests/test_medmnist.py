"""MedMNIST: a local .npz, the official train/val/test split as one fold, merged k-fold, download errors."""

import sys
import types

import numpy as np
import pytest

import medtune
from medtune.data.loaders import load_dataset
from medtune.errors import DataError, MedtuneError
from medtune.evaluation.store import open_store

N = {"train": 16, "val": 4, "test": 8}


def write_npz(path, size=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in N.items():
        labels = np.arange(n) % 2
        # Distinct images (no accidental duplicates), brighter for class 1.
        x = rng.integers(0, 120, size=(n, size, size), dtype=np.uint8) + (labels * 100)[:, None, None].astype(np.uint8)
        arrays[f"{split}_images"] = x
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def config(npz, store, split, folds=2):
    return {
        "name": "mm",
        "datasets": [{"name": "breast", "source": "medmnist", "path": str(npz), "options": {"split": split}}],
        "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
        "strategies": ["linear_probe"],
        "folds": folds,
        "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1, "val_fraction": 0.2},
        "store": str(store),
    }


def test_npz_loads_with_split_kept(tmp_path):
    table = load_dataset(write_npz(tmp_path / "breastmnist.npz"), source="medmnist", image_size=32)
    assert len(table) == sum(N.values()) and table.images.shape[-1] == 32
    assert [int((table.split == s).sum()) for s in N] == list(N.values())


def test_official_split_is_one_fold_testing_on_test(tmp_path):
    npz = write_npz(tmp_path / "breastmnist.npz")
    summary = medtune.run(config(npz, tmp_path / "s.sqlite", "official", folds=3), progress=False)
    assert (summary.total, summary.done, summary.failed) == (1, 1, 0)
    with open_store(summary.store) as s:
        cells, preds = s.cells(), s.predictions()
    assert list(cells.n_folds) == [1]
    assert len(preds) == N["test"] and all("#test/" in p for p in preds.path)


def test_merged_split_is_kfold_over_everything(tmp_path):
    npz = write_npz(tmp_path / "breastmnist.npz")
    summary = medtune.run(config(npz, tmp_path / "s.sqlite", "merged", folds=2), progress=False)
    assert (summary.total, summary.done) == (2, 2)
    with open_store(summary.store) as s:
        preds = s.predictions()
    assert sorted(preds["sample"]) == list(range(sum(N.values())))  # every image tested exactly once


def test_bad_split_value_and_official_without_split(tmp_path):
    npz = write_npz(tmp_path / "breastmnist.npz")
    with pytest.raises(MedtuneError, match="official or merged"):
        medtune.run(config(npz, tmp_path / "s.sqlite", "random"), progress=False)
    cfg = config(npz, tmp_path / "s.sqlite", "official")
    cfg["datasets"] = [{"name": "syn", "source": "synthetic", "options": {"n_patients": 8, "split": "official"}}]
    with pytest.raises(MedtuneError, match="needs a source with its own train/test split"):
        medtune.run(cfg, progress=False)


def fake_medmnist(monkeypatch, download):
    """A stand-in for the `medmnist` package: its INFO record and a dataset class whose
    constructor downloads (or fails to), exactly the two things medtune uses."""
    info = types.ModuleType("medmnist.info")
    info.INFO = {"breastmnist": {"python_class": "BreastMNIST", "label": {"0": "malignant", "1": "normal, benign"},
                                 "url_64": "https://zenodo.org/records/10519652/files/breastmnist_64.npz?download=1"}}
    dataset = types.ModuleType("medmnist.dataset")

    class BreastMNIST:
        def __init__(self, split, download, size, root):
            assert download and size == 64
            globals()["downloaded_to"] = root
            download_fn(root)

    download_fn = download
    dataset.BreastMNIST = BreastMNIST
    pkg = types.ModuleType("medmnist")
    pkg.info, pkg.dataset = info, dataset
    monkeypatch.setitem(sys.modules, "medmnist", pkg)
    monkeypatch.setitem(sys.modules, "medmnist.info", info)
    monkeypatch.setitem(sys.modules, "medmnist.dataset", dataset)


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(root):
        raise RuntimeError("Automatic download failed! <urlopen error [Errno -3] Temporary failure>")

    fake_medmnist(monkeypatch, offline)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "mm", source="medmnist", image_size=64, flag="breastmnist")
    msg = str(err.value)
    assert str(tmp_path / "mm" / "breastmnist_64.npz") in msg and "zenodo" in msg and "datasets.0.path" in msg


def test_download_through_medmnist_then_named_classes(tmp_path, monkeypatch):
    fake_medmnist(monkeypatch, lambda root: write_npz(f"{root}/breastmnist_64.npz", size=64))
    table = load_dataset(None, source="medmnist", image_size=64, flag="breastmnist", root=str(tmp_path / "cache"))
    assert table.class_names == ["malignant", "normal, benign"]
    assert (tmp_path / "cache" / "breastmnist_64.npz").is_file() and table.image_size == 64


def test_without_medmnist_package_the_message_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)
    monkeypatch.setitem(sys.modules, "medmnist.info", None)
    with pytest.raises(DataError,
                       match=r"breastmnist_128\.npz.*medtune\[medmnist\]|medtune\[medmnist\].*breastmnist_128"):
        load_dataset(tmp_path, source="medmnist", image_size=100, flag="breastmnist")
