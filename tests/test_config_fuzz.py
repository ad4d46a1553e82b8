"""A generative fuzz of experiment files through `medtune run`, as a new user would get them wrong.

Hypothesis draws one mistake at a time into a valid tiny grid (wrong types, empty lists, numbers out
of range, unknown names and keys, a ViT at a size it cannot take, data paths to empty, one-class,
corrupt or non-image data, a store that cannot be created) and runs the real CLI. Every case must
fail before training, as one paragraph that names the key, file or value (exit status 2, no
traceback), and leave any store it created consistent with no cell in it. The cases are invalid by
construction, so no example trains a model: the whole file runs in seconds.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config, write_png
from medtune.cli import app

COUNTER = itertools.count()

# Strings no numeric or boolean field accepts (pydantic parses "3", "1e3", "inf", "yes", "on" ...).
WORDS = st.from_regex(r"[a-z]{2,8}", fullmatch=True).filter(
    lambda w: w not in {"inf", "nan", "infinity", "yes", "no", "on", "off", "true", "false", "auto", "cpu", "cuda",
                        "local", "ray", "update", "keep", "group", "error", "drop", "ignore", "folder", "manifest",
                        "npz", "dicom", "softmax", "svm", "synthetic", "medmnist"})
NOT_A_NUMBER = st.one_of(WORDS, st.lists(st.integers(), max_size=2), st.dictionaries(WORDS, st.integers(), max_size=1))
NOT_A_LIST = st.one_of(WORDS, st.integers(), st.dictionaries(WORDS, st.integers(), min_size=1, max_size=1))


def out_of(lo: float | None, hi: float | None, integer: bool = True):
    """Numbers outside [lo, hi] (either end open when None)."""
    parts = []
    num = st.integers if integer else (lambda a=None, b=None: st.floats(a, b, allow_nan=False, allow_infinity=False))
    if lo is not None:
        parts.append(num(-10**6, lo - 1) if integer else num(-1e6, lo - 1e-3))
    if hi is not None:
        parts.append(num(hi + 1, hi + 10**6) if integer else num(hi + 1e-3, hi + 1e6))
    return st.one_of(*parts)


# (dotted key, strategy of bad values). Each value is wrong for its key whatever is drawn.
SCALARS = {
    "folds": st.one_of(out_of(2, 20), NOT_A_NUMBER, st.floats(2.1, 19.9).filter(lambda x: x != int(x))),
    "train.epochs": st.one_of(out_of(1, None), NOT_A_NUMBER),
    "train.batch_size": st.one_of(out_of(2, None), NOT_A_NUMBER),
    "train.patience": st.one_of(out_of(1, None), NOT_A_NUMBER),
    "train.views": st.one_of(out_of(1, None), NOT_A_NUMBER),
    "train.lr": st.one_of(st.floats(-1e3, 0.0), NOT_A_NUMBER),
    "train.weight_decay": st.one_of(st.floats(-1e3, -1e-6), NOT_A_NUMBER),
    "train.val_fraction": st.one_of(st.floats(0.5, 10.0), st.floats(-10.0, -1e-6), NOT_A_NUMBER),
    "train.grad_clip": st.one_of(st.floats(-1e3, -1e-6), NOT_A_NUMBER),
    "train.augment.degrees": st.one_of(out_of(0, 180, integer=False), NOT_A_NUMBER),
    "train.augment.translate": out_of(0, 0.5, integer=False),
    "train.amp": WORDS,
    "train.bn_statistics": WORDS,
    "train.cache": st.one_of(WORDS, st.lists(st.booleans(), min_size=1, max_size=2)),
    "device": WORDS,
    "executor": WORDS,
    "max_retries": out_of(0, None),
    "name": st.one_of(st.integers(), st.lists(WORDS, min_size=1, max_size=2)),
    "seeds": st.one_of(st.just([]), NOT_A_LIST, st.lists(out_of(0, 2**32 - 1), min_size=1, max_size=2),
                       st.lists(WORDS, min_size=1, max_size=2), st.just([0, 0])),
    "datasets": st.one_of(st.just([]), NOT_A_LIST,
                          st.lists(st.one_of(st.none(), st.integers(), WORDS), min_size=1, max_size=2)),
    "backbones": st.one_of(st.just([]), NOT_A_LIST,
                           st.lists(st.one_of(st.none(), st.integers()), min_size=1, max_size=2)),
    "strategies": st.one_of(st.just([]), NOT_A_LIST,
                            st.lists(st.one_of(st.none(), st.integers()), min_size=1, max_size=2)),
    "heads": st.one_of(st.just([]), NOT_A_LIST, st.lists(WORDS, min_size=1, max_size=2), st.just(["svm", "svm"])),
    "datasets.0.near_duplicates": st.one_of(out_of(0, 32), NOT_A_NUMBER),
    "datasets.0.duplicates": WORDS,
    "backbones.0.image_size": st.one_of(out_of(16, 1024), NOT_A_NUMBER),
    "backbones.0.pretrained": st.one_of(WORDS, st.lists(st.booleans(), min_size=1, max_size=1)),
}


def at(raw: dict, dotted: str, value) -> dict:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return raw


def run_cli(tmp_path: Path, raw) -> tuple[str, Path]:
    """`medtune run` on `raw`; asserts the one-paragraph failure and returns (its text, the store path)."""
    n = next(COUNTER)
    cfg = tmp_path / f"case{n}.yaml"
    store = tmp_path / f"case{n}.sqlite"
    if isinstance(raw, dict):
        raw.setdefault("store", str(store))
        store = Path(str(raw["store"]))
    cfg.write_text(yaml.safe_dump(raw))
    existed = store.exists()
    result = CliRunner().invoke(app, ["run", str(cfg), "--quiet"])
    text = result.output.strip()
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, \
        f"exit {result.exit_code}, {result.exception!r}, for\n{yaml.safe_dump(raw)}\n{text}"
    assert "Traceback" not in text and text.startswith("error:"), text
    assert "\n\n" not in text and len(text) < 3000, text  # one paragraph
    assert existed or not store.exists(), text  # a run that fails before its first cell creates no store
    assert_store_consistent(store)
    return " ".join(text.split()), store


def assert_store_consistent(store: Path) -> None:
    """A store the failed run created is a valid SQLite file with no cell: nothing half-written."""
    if not store.is_file() or store.read_bytes()[:16] != b"SQLite format 3\x00":
        return  # none was created (or the path is the user's own file, checked by its test)
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in {"cells", "metrics", "predictions"} & tables:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def base(tmp_path: Path) -> dict:
    return yaml.safe_load(tiny_config(tmp_path).read_text())


def mentions(text: str, *names) -> bool:
    return any(str(n) in text for n in names)


# --------------------------------------------------------------------------- schema
@settings(max_examples=120)
@given(st.sampled_from(sorted(SCALARS)).flatmap(lambda k: st.tuples(st.just(k), SCALARS[k])))
def test_a_wrong_value_for_any_key_is_one_paragraph_naming_the_key(tmp_path, case):
    key, value = case
    text, _ = run_cli(tmp_path, at(base(tmp_path), key, value))
    assert mentions(text, key, key.rsplit(".", 1)[-1]), (key, value, text)


@settings(max_examples=30)
@given(st.sampled_from(["", "train.", "train.augment.", "datasets.0.", "backbones.0."]), WORDS)
def test_an_unknown_key_is_named_with_what_is_allowed(tmp_path, where, word):
    key = f"{where}x_{word}"
    text, _ = run_cli(tmp_path, at(base(tmp_path), key, 1))
    assert f"x_{word}" in text and "unknown key" in text and "allowed here" in text, text


@settings(max_examples=30)
@given(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), WORDS, st.none()))
def test_a_top_level_that_is_not_a_mapping(tmp_path, value):
    text, _ = run_cli(tmp_path, value)
    assert "case" in text and ("top level must be a mapping" in text or "invalid configuration" in text), text


# --------------------------------------------------------------------------- names
@settings(max_examples=20)
@given(st.sampled_from(["strategy", "backbone", "strategy param", "sweep"]), WORDS)
def test_unknown_names_and_empty_sweeps_are_named(tmp_path, what, word):
    raw = base(tmp_path)
    if what == "strategy":
        raw["strategies"] = [f"zz_{word}"]
        expected = f"zz_{word}"
    elif what == "backbone":
        raw["backbones"] = [{"name": f"zz_{word}", "pretrained": False}]
        expected = f"zz_{word}"
    elif what == "strategy param":
        raw["strategies"] = [{"name": "partial_ft", f"zz_{word}": 1}]
        expected = f"zz_{word}"
    else:
        raw["strategies"] = [{"name": "partial_ft", "blocks": []}]
        expected = "blocks: []"
    text, _ = run_cli(tmp_path, raw)
    assert expected in text, text


@settings(max_examples=10)
@given(st.integers(16, 1024).filter(lambda s: s != 224))
def test_a_vit_takes_any_image_size(tmp_path, size):
    """timm's ViTs are built with a patch grid that follows the input (issue 18: `Input height (64)
    doesn't match model (224)`), so any image_size validates; training at such sizes is in test_contracts."""
    from medtune.config import load_config

    raw = base(tmp_path)
    raw["backbones"] = [{"name": "vit_tiny_patch16_224", "pretrained": False, "image_size": size}]
    assert load_config(raw=raw).backbones[0].image_size == size


# --------------------------------------------------------------------------- data and store
def bad_data(root: Path, kind: str, seed: int) -> tuple[dict, str]:
    """A data set entry of the given kind of broken, and what its error must name."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return {"name": "d", "path": str(root / "nope")}, str(root / "nope")
    if kind == "empty":
        (root / "empty").mkdir()
        return {"name": "d", "path": str(root / "empty")}, str(root / "empty")
    if kind == "empty class":
        for i in range(4):
            write_png(root / "two" / "a" / f"a{i}.png", seed + i)
        (root / "two" / "b").mkdir()
        return {"name": "d", "path": str(root / "two")}, "b"
    if kind == "one class":
        for i in range(6):
            write_png(root / "one" / "only" / f"x{i}.png", seed + i)
        return {"name": "d", "path": str(root / "one")}, "only"
    if kind == "corrupt":
        for c in ("a", "b"):
            for i in range(3):
                (root / "bad" / c).mkdir(parents=True, exist_ok=True)
                (root / "bad" / c / f"x{i}.png").write_bytes(bytes([seed % 256]) * (i + 1) * 7)
        return {"name": "d", "path": str(root / "bad")}, "x0.png"
    if kind == "not an image":
        f = root / "notes.txt"
        f.write_text("not images")
        return {"name": "d", "path": str(f)}, "notes.txt"
    if kind == "csv garbage":
        f = root / "m.csv"
        f.write_bytes(b"\x00\x01,,\n" * (seed % 5 + 1))
        return {"name": "d", "path": str(f)}, "m.csv"
    if kind == "npz garbage":
        f = root / "d.npz"
        f.write_bytes(b"PK" + bytes(seed % 256 for _ in range(16)))
        return {"name": "d", "path": str(f)}, "d.npz"
    if kind == "image as folder":
        f = root / "one.png"
        Image.new("RGB", (8, 8)).save(f)
        return {"name": "d", "path": str(f), "source": "folder"}, "one.png"
    if kind == "synthetic option":
        return {"name": "d", "source": "synthetic", "options": {"n_patients": "many"}}, "'d'"
    raise AssertionError(kind)


DATA_KINDS = ["missing", "empty", "empty class", "one class", "corrupt", "not an image", "csv garbage",
              "npz garbage", "image as folder", "synthetic option"]


@settings(max_examples=25)
@given(st.sampled_from(DATA_KINDS), st.integers(0, 10**6))
def test_bad_data_is_named_and_leaves_the_store_empty(tmp_path, kind, seed):
    entry, expected = bad_data(tmp_path / f"data{next(COUNTER)}", kind, seed)
    raw = base(tmp_path)
    raw["datasets"] = [entry]
    text, _ = run_cli(tmp_path, raw)
    assert expected in text, (kind, text)


@pytest.mark.parametrize("kind", ["parent is a file", "not sqlite", "small text file"])
def test_a_store_that_cannot_be_opened_is_named(tmp_path, kind):
    """A store path that is not a store is refused, and the file is left as it was (SQLite would take a
    small non-database file for an empty database and overwrite it)."""
    blocker = tmp_path / "a_file"
    content = "x" if kind == "small text file" else "notes, not a database\n" * 100
    blocker.write_text(content)
    raw = base(tmp_path)
    raw["store"] = str(blocker / "s.sqlite") if kind == "parent is a file" else str(blocker)
    text, _ = run_cli(tmp_path, raw)
    assert "a_file" in text and "--store" in text, text
    assert blocker.read_text() == content
