"""The `medtune` command as a user meets it: failed cells, progress under a pipe, init, demo."""

from __future__ import annotations

import json
import yaml
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune.cli import app
from medtune.evaluation.store import Store
from conftest import PYTHON, cli_env, tiny_config

TRACEBACK = ("RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x1280 and 64x2)\n"
             "Traceback (most recent call last):\n  File \"training/loop.py\", line 1, in fit\n")


def failed_store(tmp_path: Path) -> Path:
    """A store with one done and two failed cells, written through the store's own API."""
    path = tmp_path / "failed.sqlite"
    base = {"run_id": "r", "dataset": "busi", "backbone": "resnet50", "head": "softmax", "n_folds": 5,
            "seed": 0, "config": {}}
    with Store(path) as s:
        s.save_cell({**base, "cell_id": "a", "strategy": "full_ft", "fold": 0}, "done", {"balanced_accuracy": 0.8})
        s.save_cell({**base, "cell_id": "b", "strategy": "partial_ft(blocks=2)", "fold": 3}, "failed",
                    error=TRACEBACK)
        s.save_cell({**base, "cell_id": "c", "strategy": "linear_probe", "fold": 1}, "failed",
                    error="out of memory on cuda:0 (batch_size 64, image size 224). Lower train.batch_size.")
    return path


def test_results_failed_lists_each_failed_cell_with_its_labels_and_first_error_line(tmp_path):
    res = CliRunner().invoke(app, ["results", "--store", str(failed_store(tmp_path)), "--failed"],
                             terminal_width=250)
    assert res.exit_code == 0, res.output
    assert "bound method" not in res.output
    assert "2 failed cells" in res.output
    lines = res.output.splitlines()
    row_b = next(line for line in lines if "partial_ft(blocks=2)" in line)
    assert "busi" in row_b and "resnet50" in row_b and "mat1 and mat2 shapes" in row_b and " 3 " in row_b
    assert any("linear_probe" in line and "out of memory on cuda:0" in line for line in lines)
    assert "Traceback" not in res.output  # only the first line in the table
    assert "full_ft" not in res.output  # the done cell is not listed


def test_results_failed_json_gives_the_whole_error(tmp_path):
    res = CliRunner().invoke(app, ["results", "--store", str(failed_store(tmp_path)), "--failed",
                                   "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["cell_id"]: r for r in json.loads(res.output)}
    assert set(rows) == {"b", "c"}
    assert rows["b"]["error"] == TRACEBACK
    assert (rows["b"]["strategy"], rows["b"]["fold"], rows["b"]["dataset"]) == ("partial_ft(blocks=2)", 3, "busi")


def test_results_failed_on_a_store_without_failures_says_so(tmp_path):
    path = tmp_path / "ok.sqlite"
    with Store(path) as s:
        s.save_cell({"cell_id": "a", "run_id": "r", "dataset": "d", "backbone": "b", "strategy": "s", "head": "softmax",
                     "fold": 0, "n_folds": 2, "seed": 0, "config": {}}, "done", {"balanced_accuracy": 0.5})
    res = CliRunner().invoke(app, ["results", "--store", str(path), "--failed"])
    assert res.exit_code == 0 and "no failed cells" in res.output


def test_run_under_a_file_prints_one_line_per_finished_cell_before_the_grid_ends(tmp_path):
    """stdout to a file (not a terminal): each finished cell's line is flushed as it finishes, so the
    first one is in the file while later cells are still to run."""
    cfg = tiny_config(tmp_path, strategies=["linear_probe", {"name": "partial_ft", "blocks": 1}, "full_ft"])
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([PYTHON, "-m", "medtune", "run", str(cfg)], stdout=out,
                                stderr=subprocess.PIPE, env=cli_env(), text=True)
        first, cells_done_then = None, None
        while proc.poll() is None and first is None:
            lines = [line for line in log.read_text().splitlines() if line.startswith("[")]
            if lines:
                first = lines[0]
                with Store(tmp_path / "store.sqlite") as s:  # how far the grid was when the line was there
                    cells_done_then = len(s.done_ids())
            time.sleep(0.05)
        _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert first is not None, "no per-cell line appeared while the grid ran"
    assert first.startswith("[1/6] syn test_efficientnet linear_probe softmax seed 0 fold 0: balanced_accuracy ")
    assert cells_done_then < 6, "the first cell's line only appeared once the grid had ended"
    final = [line for line in log.read_text().splitlines() if line.startswith("[")]
    assert len(final) == 6
    assert all(" balanced_accuracy 0." in line or " balanced_accuracy 1." in line for line in final), final
    assert final[-1].startswith("[6/6]") and final[-1].endswith("ETA done")
    assert all("ETA" in line and " s;" in line for line in final)


# --------------------------------------------------------------------------- init, shipped configs
BUSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "busi"
if not BUSI.is_dir():
    BUSI = Path("/work/shared/data/busi")


def test_init_on_a_folder_with_patient_ids_writes_a_file_the_grid_runs(tmp_path):
    import medtune
    from medtune.config import load_config
    from tests.conftest import DEVICE, write_pngs

    data = write_pngs(tmp_path / "scans", n_patients=12, images_per_patient=2, size=32)
    out = tmp_path / "exp.yaml"
    res = CliRunner().invoke(app, ["init", str(data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    cfg = load_config(out)
    ds = cfg.datasets[0]
    names = sorted(f.name for f in data.rglob("*.png"))
    # the pattern reads the patient part of `P003_img1.png`: 12 patients, 2 images each
    import re

    ids = {re.search(ds.group_pattern, n).group(1) for n in names}
    assert len(ids) == 12 and all(n.startswith(i + "_")
                                  for n in names for i in [re.search(ds.group_pattern, n).group(1)])
    assert ds.positive == "malignant" and ds.path == str(data)
    counts = {c: len(list((data / c).glob("*.png"))) for c in ("benign", "malignant", "normal")}
    assert f"24 images in 3 classes: benign {counts['benign']}, malignant {counts['malignant']}, " \
           f"normal {counts['normal']}." in text
    assert "Patients: 12 ids read from file names" in text
    per_class = {c: len({f.name.split("_")[0] for f in (data / c).glob("*.png")}) for c in counts}
    assert cfg.folds == max(2, min(5, min(per_class.values())))  # the class with fewest patients bounds k
    # The data part runs as written; the tiny backbone and one epoch only keep the test short.
    raw = yaml.safe_load(text)
    raw.update(backbones=[{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
               strategies=["linear_probe"], train={"epochs": 1, "batch_size": 8, "views": 1},
               store=str(tmp_path / "s.sqlite"), device=DEVICE, keep_best=False)
    summary = medtune.run(raw, progress=False)
    assert (summary.done, summary.failed) == (cfg.folds, 0)


def test_init_refuses_to_overwrite_and_explains_a_missing_folder(tmp_path):
    out = tmp_path / "x.yaml"
    out.write_text("keep me")
    res = CliRunner().invoke(app, ["init", str(tmp_path), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output and out.read_text() == "keep me"
    res = CliRunner().invoke(app, ["init", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


@pytest.mark.skipif(not BUSI.is_dir(), reason="the BUSI folder (../shared/data/busi) is not on this machine")
def test_init_on_busi_writes_a_file_medtune_run_accepts_unchanged(tmp_path):
    from medtune.config import load_config

    out = tmp_path / "busi.yaml"
    res = CliRunner().invoke(app, ["init", str(BUSI), "--out", str(out), "--exact-only"])
    assert res.exit_code == 0, res.output
    cfg = load_config(out)  # what `medtune run` does first, before any data is loaded
    ds = cfg.datasets[0]
    assert ds.positive == "malignant" and ds.group_pattern is None and cfg.folds == 5
    text = out.read_text()
    assert "780 images in 3 classes: benign 437, malignant 210, normal 133." in text
    assert "no patient ids found" in text


def test_run_resolves_a_shipped_config_by_name_and_explains_an_unknown_one():
    from medtune.cli import config_path
    from medtune.config import load_config

    assert load_config(config_path(Path("demo"))).name == "demo"
    res = CliRunner().invoke(app, ["run", "dmeo"])
    assert res.exit_code == 2 and "not a shipped configuration" in res.output and "demo" in res.output


def test_the_wheel_ships_the_example_configs(tmp_path):
    """`pip wheel .` (what `pip install .` builds): the configs are package data inside medtune/."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(root)], capture_output=True, text=True, cwd=tmp_path)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-200:]}")
    assert proc.returncode == 0, proc.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("medtune-*.whl"))).namelist()
    shipped = {p.name for p in (root / "configs").glob("*.yaml")}
    assert {"demo.yaml", "smoke.yaml"} <= shipped
    assert {f"medtune/configs/{n}" for n in shipped} <= set(names)


def test_list_heads_prints_every_registered_head_with_its_description():
    from medtune.models.heads import HEADS

    res = CliRunner().invoke(app, ["list", "heads"], terminal_width=250)
    assert res.exit_code == 0, res.output
    for name, cls in HEADS.items():
        assert f" {name} " in res.output and cls.description in res.output, (name, res.output)
