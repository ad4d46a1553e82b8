"""`medtune data check` and near-duplicate grouping in the duplicate policy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from conftest import tiny_config
from medtune.cli import app
from medtune.data.loaders import ImageTable
from medtune.errors import DataError
from medtune.data.quality import check_targets, near_duplicate_groups, straddling
from medtune.data.splits import apply_duplicate_policy, assert_disjoint, kfold


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random picture: perceptual hashes of unrelated ones differ in ~half their bits."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def brighter(arr: np.ndarray) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(arr)).enhance(1.08))


@pytest.fixture
def messy_folder(tmp_path):
    """benign: 5 distinct, one exact copy, one brightened copy; malignant: 5 distinct, an exact copy
    of a benign image (label conflict) and an unreadable file."""
    root = tmp_path / "messy"
    (root / "benign").mkdir(parents=True)
    (root / "malignant").mkdir()
    for c, cls in enumerate(("benign", "malignant")):
        for i in range(5):
            Image.fromarray(smooth_image(10 * c + i)).save(root / cls / f"{cls}_{i}.png")
    shutil.copy(root / "benign" / "benign_0.png", root / "benign" / "copy_of_0.png")
    Image.fromarray(brighter(smooth_image(1))).save(root / "benign" / "bright_1.png")
    shutil.copy(root / "benign" / "benign_2.png", root / "malignant" / "mislabelled_2.png")
    (root / "malignant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root


def test_near_duplicate_groups_threshold_and_transitivity():
    base = np.zeros(64, bool)
    a, b, c, far = base.copy(), base.copy(), base.copy(), ~base
    b[:3] = True  # 3 bits from a
    c[:6] = True  # 3 bits from b, 6 from a: joined through b
    bits = np.stack([a, b, c, far])
    assert near_duplicate_groups(bits, 3) == [[0, 1, 2]]
    assert near_duplicate_groups(bits, 2) == []
    assert near_duplicate_groups(bits, 64) == [[0, 1, 2, 3]]
    assert near_duplicate_groups(bits, 3, chunk=1) == [[0, 1, 2]]  # row chunking changes nothing
    with pytest.raises(DataError, match="threshold -1 must be >= 0"):
        near_duplicate_groups(bits, -1)


def test_straddling_counts_groups_split_by_a_fold():
    folds = [(np.array([2, 3]), np.array([0, 1])), (np.array([0, 1]), np.array([2, 3]))]
    assert straddling([[0, 1]], folds) == 0
    assert straddling([[1, 2]], folds) == 1
    assert straddling([[0, 2], [1, 3], [0, 1]], folds) == 2


def test_check_files_report(messy_folder):
    (report,) = check_targets(messy_folder, n_folds=2, threshold=8)
    s = report.summary()
    assert s["n_files"] == 14 and s["unreadable"] == 1
    assert s["class_counts"] == {"benign": 7, "malignant": 7}
    assert s["sizes"] == {"64x64": 13} and s["modes"] == {"RGB": 13}
    # exact: benign_0 + copy_of_0, benign_2 + mislabelled_2 (a label conflict)
    assert s["exact_groups"] == 2 and s["exact_extra_images"] == 2 and s["exact_label_conflicts"] == 1
    # near: the two exact groups plus benign_1 + bright_1
    assert s["near_groups"] == 3 and s["near_label_conflicts"] == 1
    named = {frozenset(report.files[i].path.rsplit("/", 1)[1] for i in g) for g in report.near}
    assert frozenset({"benign_1.png", "bright_1.png"}) in named
    broken = [f for f in report.files if f.error]
    assert "broken.png" in broken[0].path and "not an image file PIL can read" in broken[0].error
    # the planned folds, rebuilt with scikit-learn on the readable files: a group straddles when its
    # copies land in different test folds
    from sklearn.model_selection import StratifiedKFold

    readable = [f for f in report.files if not f.error]
    y = np.array([f.label for f in readable])
    fold_of = np.empty(len(y), int)
    for k, (_, test) in enumerate(StratifiedKFold(2, shuffle=True, random_state=0).split(np.zeros(len(y)), y)):
        fold_of[test] = k
    where = {f.path.rsplit("/", 1)[1]: fold_of[i] for i, f in enumerate(readable)}
    expected = sum(where[a] != where[b] for a, b in (("benign_0.png", "copy_of_0.png"),
                                                     ("benign_2.png", "mislabelled_2.png")))
    assert s["exact_groups_straddling_folds"] == expected


def test_check_exact_only_skips_near(messy_folder):
    (report,) = check_targets(messy_folder, n_folds=2, threshold=None)
    assert report.summary()["near_groups"] == 0 and report.summary()["exact_groups"] == 2


def test_cli_data_check_folder(messy_folder):
    result = CliRunner().invoke(app, ["data", "check", str(messy_folder), "--folds", "2", "--near", "8"])
    assert result.exit_code == 1, result.output  # an unreadable file and a mislabelled copy: not usable as is
    out = " ".join(result.output.split())
    assert "benign 7, malignant 7" in out
    assert "cannot be used: " in out and "broken.png" in out
    assert "exact duplicates with conflicting labels:" in out and "mislabelled_2.png [malignant]" in out
    assert "2-fold plan, duplicates ignored" in out


def test_cli_data_check_json_and_config(tmp_path):
    cfg = tiny_config(tmp_path, folds=3)
    result = CliRunner().invoke(app, ["data", "check", str(cfg), "--json", "--exact-only"])
    assert result.exit_code == 0, result.output
    (s,) = json.loads(result.output)
    assert s["dataset"] == "syn" and s["folds"] == 3 and s["grouped_by_patient"] is True
    assert s["n_files"] == 16 and s["near_threshold"] is None


def test_cli_data_check_missing_path(tmp_path):
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope does not exist" in result.output


# --------------------------------------------------------------------------- policy
def table_with_near_copy() -> ImageTable:
    """8 distinct images, image 7 a brightened copy of image 0 (not an exact duplicate)."""
    imgs = [smooth_image(s) for s in range(7)] + [brighter(smooth_image(0))]
    images = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0])
    return ImageTable(images, labels, ["a", "b"], [f"img{i}" for i in range(8)], name="t")


def test_near_duplicates_grouped_by_policy():
    table = table_with_near_copy()
    _, groups, record = apply_duplicate_policy(table, "group")
    assert groups is None and record["duplicate_groups"] == 0
    _, groups, record = apply_duplicate_policy(table, "group", near_duplicates=8)
    assert record["duplicate_groups"] == 1 and record["exact_groups"] == 0 and record["near_duplicates"] == 8
    assert groups[0] == groups[7] and len(set(groups)) == 7
    for train, test in kfold(table.labels, groups, 2, seed=0):
        assert (0 in test) == (7 in test)
    dropped, _, _ = apply_duplicate_policy(table, "drop", near_duplicates=8)
    assert len(dropped) == 7 and "img7" not in dropped.paths
    with pytest.raises(DataError, match=r"t: 1 groups of identical images .* img0 = img7"):
        apply_duplicate_policy(table, "error", near_duplicates=8)


def test_ignore_policy_records_but_does_not_group():
    table = table_with_near_copy()
    table.images[7] = table.images[0]
    table.digests[7] = table.digests[0]
    same, groups, record = apply_duplicate_policy(table, "ignore")
    assert same is table and groups is None
    assert record == {"policy": "ignore", "duplicate_groups": 1, "duplicate_images": 1, "label_conflicts": 0,
                      "exact_groups": 1, "near_duplicates": None}
    train, test = np.array([0, 1, 2]), np.array([7, 3])
    with pytest.raises(DataError, match="identical image"):
        assert_disjoint(train, test, table, None)
    assert_disjoint(train, test, table, None, duplicates=False)


def test_decision_recorded_in_store(tmp_path, monkeypatch):
    import medtune.grid.cells as cells
    import medtune.grid.runner as runner
    from medtune.config import load_config
    from medtune.evaluation.store import Store

    monkeypatch.setattr(cells, "run_cell", lambda *a, **k: (_ for _ in ()).throw(MemoryError))
    monkeypatch.setattr(runner, "execute", lambda *a, **k: "skipped in this test")
    raw = yaml.safe_load(tiny_config(tmp_path).read_text())
    raw["datasets"][0].update(duplicates="ignore", near_duplicates=6)
    cfg = load_config(raw=raw)
    runner.run(cfg, progress=False)
    with Store(cfg.store) as s:
        info = json.loads(s.conn.execute("SELECT info_json FROM datasets WHERE dataset='syn'").fetchone()[0])
    assert info["duplicates"]["policy"] == "ignore" and info["duplicates"]["near_duplicates"] == 6
    assert info["n"] == 16 and "duplicate_groups" in info["duplicates"]
