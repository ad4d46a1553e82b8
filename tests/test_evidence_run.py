"""End to end on a tiny manifest: cv by_site, subgroups, operating points and an external set run,
land in the store and appear in the report."""

from pathlib import Path

import pandas as pd

import medtune
from conftest import DEVICE, write_pngs
from medtune.report.html import build_report
from medtune.evaluation.store import Store


def _manifest(root: Path) -> Path:
    data = write_pngs(root / "data", n_patients=18, images_per_patient=2)
    rows, seen = [], {}
    for f in sorted(data.rglob("*.png")):
        patient, cls = f.name.split("_")[0], f.parent.name
        order = seen.setdefault(cls, {}).setdefault(patient, len(seen[cls]))
        rows.append({"path": str(f.relative_to(data)), "label": cls, "patient_id": patient,
                     "site": "north" if order % 2 == 0 else "south", "sex": "F" if int(patient[1:]) % 3 else "M"})
    pd.DataFrame(rows).to_csv(data / "manifest.csv", index=False)
    return data / "manifest.csv"


def test_by_site_grid_with_subgroups_operating_points_and_an_external_set(tmp_path):
    manifest = _manifest(tmp_path)
    store = tmp_path / "s.sqlite"
    raw = {"name": "ev", "datasets": [{"name": "us", "path": str(manifest), "positive": "malignant"}],
           "test_datasets": [{"name": "site_x", "source": "synthetic",
                              "options": {"n_patients": 9, "images_per_patient": 1, "seed": 5, "difficulty": 0.8}}],
           "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
           "strategies": ["linear_probe"], "cv": "by_site", "subgroups": ["sex"],
           "operating_points": [{"sensitivity": 0.9}],
           "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1, "val_fraction": 0.3},
           "store": str(store), "device": DEVICE, "keep_best": False}
    summary = medtune.run(raw, progress=False)
    assert summary.failed == 0 and summary.total == 2  # one fold per site
    with Store(store) as s:
        cells = s.cells()
        extra = s.extra_predictions()
    assert sorted(cells.n_folds.unique()) == [2]
    assert (extra[extra.kind == "external"].groupby("cell_id").size() == 9).all()
    assert (extra.kind == "inner_val").any()
    paths = build_report(store, tmp_path / "r", n_boot=50)
    page = paths["html"].read_text()
    for section in ("Internal vs external validation", "Subgroups", "Operating points chosen on inner validation",
                    "leave-one-site-out"):
        assert section in page, section
    sg = pd.read_csv(paths["subgroups"])
    sex = sg[sg.subgroup == "sex"]
    assert set(sex.value) == {"F", "M"} and sex.n.sum() == 36
    assert set(sg[sg.subgroup == "site"].value) == {"north", "south"}  # by_site's column is reported per site too
