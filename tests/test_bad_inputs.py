"""Every bad input a user can hand medtune, one named test each: the error must name the file or
value and say what to do; convertible inputs (CMYK, 16-bit, palette, alpha) must be converted."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config, write_png
from medtune.cli import app
from medtune.config import load_config
from medtune.data.loaders import decode_image, load_folder, load_manifest
from medtune.errors import BackboneError, ConfigError, DataError, MedtuneError
from medtune.data.splits import check_foldable
from medtune.evaluation.store import SCHEMA_VERSION, Store


def png_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# --------------------------------------------------------------------------- unreadable files
def test_zero_byte_file(tmp_path):
    f = tmp_path / "empty.png"
    f.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: the file is empty \(0 bytes\)"):
        decode_image(f, 16)


def test_truncated_png(tmp_path):
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    f = tmp_path / "cut.png"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: truncated or corrupt image"):
        decode_image(f, 16)


def test_truncated_jpeg(tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = jpeg_bytes(img)
    f = tmp_path / "cut.jpg"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: truncated or corrupt image.*Re-export or remove it"):
        decode_image(f, 16)


def test_text_file_renamed_png(tmp_path):
    f = tmp_path / "notes.png"
    f.write_text("patient 12, left breast, follow-up in 6 months\n")
    with pytest.raises(DataError, match=r"notes\.png: not an image file PIL can read\. Remove it"):
        decode_image(f, 16)


def test_random_bytes_jpg(tmp_path):
    f = tmp_path / "noise.jpg"
    f.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"noise\.jpg: not an image file"):
        decode_image(f, 16)


def test_decompression_bomb_guard(tmp_path):
    f = write_png(tmp_path / "big.png", seed=3, size=40)  # 1600 pixels
    with pytest.raises(DataError, match=r"big\.png: 40x40 pixels exceeds the limit of 1,000.*max_pixels"):
        decode_image(f, 16, max_pixels=1000)
    assert decode_image(f, 16, max_pixels=1600).shape == (3, 16, 16)


def test_several_bad_files_reported_together(tmp_path, image_folder):
    (image_folder / "benign" / "zero.png").write_bytes(b"")
    (image_folder / "malignant" / "fake.png").write_text("hello")
    with pytest.raises(DataError) as err:
        load_folder(image_folder, 16)
    msg = str(err.value)
    assert msg.startswith("2 of 14 image files cannot be used")
    assert "zero.png" in msg and "fake.png" in msg


# --------------------------------------------------------------------------- converted, not rejected
def test_cmyk_jpeg_converted(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 30, 30)
    rgb[:, 8:] = (20, 40, 220)
    f = tmp_path / "cmyk.jpg"
    f.write_bytes(jpeg_bytes(Image.fromarray(rgb).convert("CMYK")))
    assert Image.open(f).mode == "CMYK"
    out = decode_image(f, 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    # JPEG is lossy; the colours must survive CMYK -> RGB within a small tolerance.
    assert np.abs(out[:, 4:12, 2].astype(int).T - [200, 30, 30]).max() < 25
    assert np.abs(out[:, 4:12, 13].astype(int).T - [20, 40, 220]).max() < 25


def test_16bit_png_range_scaled(tmp_path):
    arr = np.linspace(1000, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    f = tmp_path / "ct16.png"
    Image.fromarray(arr).save(f)
    assert Image.open(f).mode.startswith("I")
    out = decode_image(f, 16)
    # Min-max scaled to the full 8-bit range, not clipped to 255 (which would make it all white).
    assert out.min() == 0 and out.max() == 255
    assert np.all(out[0] == out[1]) and np.all(out[1] == out[2])
    assert len(np.unique(out)) > 200


def test_palette_png(tmp_path):
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    img = Image.fromarray(idx, mode="P")
    img.putpalette([10, 20, 30, 250, 128, 0] + [0] * 762)
    f = tmp_path / "pal.png"
    img.save(f)
    out = decode_image(f, 8)
    assert tuple(out[:, 0, 0]) == (10, 20, 30)
    assert tuple(out[:, 0, 7]) == (250, 128, 0)


def test_rgba_png_composited_on_black(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., :3] = (100, 150, 200)
    arr[:, :4, 3] = 255  # left half opaque, right half transparent
    f = tmp_path / "alpha.png"
    Image.fromarray(arr, mode="RGBA").save(f)
    out = decode_image(f, 8)
    assert tuple(out[:, 0, 0]) == (100, 150, 200)
    assert tuple(out[:, 0, 7]) == (0, 0, 0)


def test_la_image(tmp_path):
    arr = np.zeros((8, 8, 2), np.uint8)
    arr[..., 0] = 180
    arr[..., 1] = 255
    f = tmp_path / "la.png"
    Image.fromarray(arr, mode="LA").save(f)
    out = decode_image(f, 8)
    assert out.shape == (3, 8, 8) and np.all(out == 180)


# --------------------------------------------------------------------------- manifests
def manifest(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    write_png(tmp_path / "img" / "a.png", 1)
    write_png(tmp_path / "img" / "b.png", 2)
    f = tmp_path / "m.csv"
    f.write_bytes(text.encode(encoding))
    return f


def test_manifest_missing_columns(tmp_path):
    f = manifest(tmp_path, "file,diagnosis\nimg/a.png,benign\n")
    with pytest.raises(DataError, match=r"m\.csv lacks column\(s\) path, label; found \['file', 'diagnosis'\]"):
        load_manifest(f, 16)


def test_manifest_unknown_label(tmp_path):
    f = manifest(tmp_path, "path,label\nimg/a.png,benign\nimg/b.png,malignnat\n")
    with pytest.raises(DataError,
                       match=r"unknown label\(s\) \['malignnat'\]; the config's classes are \['benign', 'malignant'\]"):
        load_manifest(f, 16, classes=["benign", "malignant"])


def test_manifest_missing_file(tmp_path):
    f = manifest(tmp_path, "path,label\nimg/a.png,benign\nimg/gone.png,malignant\n")
    with pytest.raises(DataError, match=r"line 3: file 'img/gone\.png' does not exist"):
        load_manifest(f, 16)


def test_manifest_path_escaping_folder(tmp_path):
    sub = tmp_path / "inner"
    f = manifest(sub, "path,label\nimg/a.png,benign\n../x.png,malignant\n")
    write_png(tmp_path / "x.png", 3)  # exists, but outside the manifest's folder
    with pytest.raises(DataError,
                       match=r"line 3: path '\.\./x\.png' points outside the manifest's folder .*\(refused\)"):
        load_manifest(f, 16)


def test_manifest_absolute_path(tmp_path):
    outside = write_png(tmp_path / "elsewhere" / "y.png", 4)
    f = manifest(tmp_path / "inner", f"path,label\nimg/a.png,benign\n{outside},malignant\n")
    with pytest.raises(DataError, match=rf"line 3: path '{outside}' points outside the manifest's folder"):
        load_manifest(f, 16)


def test_manifest_empty(tmp_path):
    f = manifest(tmp_path, "path,label\n")
    with pytest.raises(DataError, match=r"m\.csv has a header but no rows"):
        load_manifest(f, 16)
    f.write_bytes(b"")
    with pytest.raises(DataError, match=r"m\.csv lacks column\(s\) path, label; found none"):
        load_manifest(f, 16)


def test_manifest_not_utf8(tmp_path):
    f = manifest(tmp_path, "path,label\nimg/a.png,b\xe9nin\nimg/b.png,malin\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"m\.csv is not a readable UTF-8 CSV file"):
        load_manifest(f, 16)


# --------------------------------------------------------------------------- folders and folds
def test_class_smaller_than_folds(image_folder):
    table = load_folder(image_folder, 16)
    with pytest.raises(DataError,
                       match=r"data: class 'benign' has 6 images, fewer than the 10 folds asked for\. Use `folds: 6`"):
        check_foldable(table.labels, table.groups, table.class_names, 10, "data")
    check_foldable(table.labels, table.groups, table.class_names, 6, "data")


def test_class_smaller_than_folds_counts_patients(image_folder):
    table = load_folder(image_folder, 16, group_pattern=r"_(\d)")  # file ids 0..5 in each class
    groups = np.asarray([f"{table.labels[i]}-{int(g) < 3}" for i, g in enumerate(table.groups)], dtype=object)
    with pytest.raises(DataError, match=r"class 'benign' has 2 patients, fewer than the 3 folds"):
        check_foldable(table.labels, groups, table.class_names, 3, "data")


def test_single_class(tmp_path):
    for i in range(3):
        write_png(tmp_path / "d" / "benign" / f"{i}.png", i)
    with pytest.raises(DataError, match=r"only one class \('benign'\) was found; classification needs at least two"):
        load_folder(tmp_path / "d", 16)


def test_empty_class_folder(image_folder):
    (image_folder / "normal").mkdir()
    with pytest.raises(DataError, match=r"class 'normal' has no images\. Add images or remove the class"):
        load_folder(image_folder, 16)


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist\. Check `path` in the config"):
        load_folder(tmp_path / "nowhere", 16)


def test_group_pattern_not_matching(image_folder):
    with pytest.raises(DataError, match=r"benign_0\.png: file name does not match group_pattern '\^P.*"
                                        r"every file needs a patient id"):
        load_folder(image_folder, 16, group_pattern=r"^P(\d+)")


# --------------------------------------------------------------------------- configuration
def test_unknown_backbone(tmp_path):
    cfg = tiny_config(tmp_path, backbones=[{"name": "resnet5O", "pretrained": False}])
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet5O'.*Did you mean .*resnet50"):
        load_config(cfg)


def test_unknown_strategy(tmp_path):
    cfg = tiny_config(tmp_path, strategies=["linear_prob"])
    with pytest.raises(ConfigError, match=r"unknown strategy 'linear_prob'.*linear_probe"):
        load_config(cfg)


def test_yaml_typo_suggests_key(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochz": 2})
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key \(did you mean 'epochs'\?\)"):
        load_config(cfg)


def test_bad_set_override(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"--set 'train\.epochs': expected KEY\.PATH=VALUE"):
        load_config(cfg, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"train\.epochs: Input should be a valid integer"):
        load_config(cfg, ["train.epochs=many"])
    with pytest.raises(ConfigError,
                       match=r"--set strategies\.5\.blocks: strategies has 1 entries; '5' is not an index"):
        load_config(cfg, ["strategies.5.blocks=2"])


def test_bad_duplicates_value(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError,
                       match=r"datasets\.0\.duplicates: Input should be 'group', 'error', 'drop' or 'ignore'"):
        load_config(cfg, ["datasets.0.duplicates=merge"])


def test_cli_prints_one_paragraph_and_exits_2(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochz": 2})
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "did you mean 'epochs'" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- training and store
def test_nan_loss_recorded_and_grid_continues(tmp_path, monkeypatch):
    """A non-finite loss fails its cell with the reason; the other cells of the grid still run.
    (A NaN penalty stands in for a diverged model: a real learning rate does not reliably get
    there on a toy model in one epoch.)"""
    from medtune.grid.runner import run
    from medtune.training.strategies import FullFT

    monkeypatch.setattr(FullFT, "penalty", lambda self, model, start: torch.tensor(float("nan")))
    cfg = load_config(tiny_config(tmp_path, strategies=["full_ft", "linear_probe"]))
    summary = run(cfg, progress=False)
    assert (summary.total, summary.done, summary.failed) == (4, 2, 2)
    with Store(cfg.store) as s:
        cells = s.cells()
    failed = cells[cells.status == "failed"]
    assert set(failed.strategy) == {"full_ft"} and set(cells[cells.status == "done"].strategy) == {"linear_probe"}
    assert all("the loss diverged to nan at epoch 0" in e and "Lower train.lr" in e for e in failed.error)


def test_divergence_in_lp_ft_names_the_rate_its_fine_tuning_phase_ran_at(tmp_path, monkeypatch):
    """LP-FT fine-tunes at ft_lr_scale x train.lr: the message gives that rate, not train.lr alone."""
    from medtune.grid.runner import run
    from medtune.training.strategies import LPFT

    monkeypatch.setattr(LPFT, "penalty", lambda self, model, start: torch.tensor(float("nan")))
    cfg = load_config(tiny_config(tmp_path, strategies=[{"name": "lp_ft", "lp_epochs": 1}]),
                      ["train.lr=0.002", "train.epochs=2"])
    run(cfg, progress=False)
    with Store(cfg.store) as s:
        errors = s.cells().error.tolist()
    assert errors and all("lr 0.0002 = train.lr 0.002 x this phase's scale 0.1" in e for e in errors), errors


def test_exploding_finite_loss_is_stopped_as_diverged(tmp_path):
    """A huge learning rate gives a finite but exploding loss: the cell fails as diverged, the grid goes on."""
    from medtune.grid.runner import run

    cfg = load_config(tiny_config(tmp_path, strategies=["full_ft"]),
                      ["train.lr=1e6", "train.warmup_epochs=0", "train.grad_clip=0", "train.epochs=3"])
    summary = run(cfg, progress=False)
    assert summary.failed == 2
    with Store(cfg.store) as s:
        errors = s.cells().error.tolist()
    assert all("the loss diverged to" in e and "Lower train.lr" in e for e in errors)


def test_absurd_learning_rate_recorded_with_advice(tmp_path):
    """lr=1e38 overflows inside the optimizer (CPU) or the weights (CUDA's fused AdamW); the cell fails with
    advice, not a bare traceback, and never with metrics of a broken model."""
    from medtune.grid.runner import run

    # full_ft: the linear probe is a convex fit that takes no learning rate
    cfg = load_config(tiny_config(tmp_path, strategies=["full_ft"]), ["train.lr=1e38", "train.warmup_epochs=0"])
    summary = run(cfg, progress=False)
    assert (summary.done, summary.failed) == (0, 2)
    with Store(cfg.store) as s:
        errors = s.cells().error.tolist()
    assert all(e.startswith(("numeric overflow while training (lr 1e+38)", "the weights became inf/NaN"))
               and "lower train.lr" in e.lower() for e in errors), errors


def test_incompatible_store_schema(tmp_path):
    path = tmp_path / "old.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(MedtuneError,
                       match=rf"old\.sqlite was written by a medtune with store schema {SCHEMA_VERSION + 1}"):
        Store(path)


def test_store_path_is_not_sqlite(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_text("this is a CSV, not a store\n" * 100)
    with pytest.raises(MedtuneError, match=r"results\.sqlite is not a medtune results store.*--store"):
        Store(path)


def test_out_of_memory_recorded_with_advice(tmp_path, monkeypatch):
    import medtune.grid.cells as cells
    import medtune.grid.runner as runner

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cells, "run_cell", oom)
    cfg = load_config(tiny_config(tmp_path))
    summary = runner.run(cfg, progress=False)
    assert summary.failed == 2 and summary.done == 0
    with Store(cfg.store) as s:
        errors = s.cells().error.tolist()
    assert all("out of memory" in e and "batch_size 8" in e and "image size 32" in e
               and "Lower train.batch_size or the backbone's image_size" in e for e in errors)


def test_store_info_json_is_strict_json(tmp_path):
    """A NaN in a cell's history (e.g. no validation split) must not make the row unreadable to
    SQLite's JSON functions and other strict JSON readers."""
    cell = {"cell_id": "c1", "run_id": "r", "dataset": "d", "backbone": "b", "strategy": "s", "head": "softmax",
            "fold": 0, "n_folds": 2, "seed": 0, "config": {}}
    with Store(tmp_path / "s.sqlite") as s:
        s.save_cell(cell, "done", info={"history": [{"val_loss": float("nan"), "train_loss": 0.5}], "n_test": 3})
        row = s.conn.execute("SELECT json_extract(info_json, '$.history[0].val_loss'), "
                             "json_extract(info_json, '$.n_test') FROM cells").fetchone()
    assert row == (None, 3)
