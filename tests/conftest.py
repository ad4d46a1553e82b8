"""A tiny finished grid on PNG files, shared by the report, explain and predict tests (seconds)."""

from pathlib import Path

import pytest
from PIL import Image

from medtune.synthetic import make_ultrasound


def write_pngs(root: Path, n_patients: int = 12, images_per_patient: int = 2, size: int = 32) -> Path:
    """Synthetic ultrasound as a folder-per-class data set with patient ids in the file names."""
    t = make_ultrasound(n_patients=n_patients, images_per_patient=images_per_patient, size=size, seed=0)
    for img, y, p in zip(t.images, t.labels, t.paths):
        patient, stem = p.split("/")[-2:]
        f = root / t.class_names[y] / f"{patient}_{stem}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(f)
    return root


def tiny_config(data: Path, store: Path, heads=("softmax",)) -> dict:
    return {
        "name": "tiny",
        "datasets": [{"name": "tiny_us", "path": str(data), "group_pattern": r"^(P\d+)_", "positive": "malignant"}],
        "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
        "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 1}],
        "heads": list(heads), "folds": 2, "seeds": [0],
        "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1, "amp": "off"},
        "store": str(store),
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(store path, data folder) of a finished 2-strategy x 2-fold grid with its best models."""
    import medtune

    root = tmp_path_factory.mktemp("tiny")
    data = write_pngs(root / "data")
    store = root / "tiny.sqlite"
    summary = medtune.run(tiny_config(data, store), progress=False)
    assert summary.failed == 0, summary
    return store, data
