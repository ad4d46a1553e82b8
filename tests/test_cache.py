"""The frozen-prefix feature cache keeps its promise: `train.cache: true` gives the predictions of
`cache: false` (it only skips recomputing what frozen blocks compute), and cells of different data
sets or image sizes in one process never reuse each other's features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medtune
from conftest import DEVICE, TINY
from medtune.evaluation.store import Store

# The cached prefix is the same operations on the same inputs as the recomputed one, in the same
# precision (amp on: bf16 both ways), so on the CPU the predictions agree to rounding (measured: 0.0
# for amp off and on). On a GPU the cache fills with the inference batch size and training recomputes
# with the training batch size; TF32 and bf16 kernels depend on the batch size (~1e-3 per value), and
# bf16 keeps 8 mantissa bits, hence the looser GPU bounds.
ATOL = {"off": 1e-5, "on": 1e-5} if DEVICE == "cpu" else {"off": 5e-3, "on": 3e-2}


def grid(tmp_path, name: str, **train) -> dict:
    return {
        "name": name,
        "datasets": [{"name": "syn", "source": "synthetic",
                      "options": {"n_patients": 10, "images_per_patient": 2, "seed": 0}}],
        "backbones": [{"name": TINY, "pretrained": False, "image_size": 32}],
        # head only (cut after pooling) and the top block trained (cut inside the chain)
        "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 1}],
        "folds": 2,
        "train": {"epochs": 2, "batch_size": 8, "views": 1, "patience": 2, "val_fraction": 0, **train},
        "store": str(tmp_path / f"{name}.sqlite"),
        "device": DEVICE,
        "keep_best": False,
    }


def predictions(store) -> pd.DataFrame:
    """Probabilities keyed by what a cell is (not its id, which includes the cache setting)."""
    with Store(store) as s:
        cells = s.cells()[["cell_id", "dataset", "backbone", "strategy", "head", "fold", "seed", "status"]]
        p = s.predictions()
    assert set(cells.status) == {"done"}
    p = p.merge(cells, on="cell_id")
    return p.set_index(["dataset", "strategy", "fold", "sample"]).sort_index()


@pytest.mark.parametrize("amp", ["off", "on"])
def test_cache_on_and_off_give_the_same_predictions(tmp_path, amp):
    on = grid(tmp_path, "on", cache=True, amp=amp)
    off = grid(tmp_path, "off", cache=False, amp=amp)
    assert medtune.run(on, progress=False).done == 4
    assert medtune.run(off, progress=False).done == 4
    a, b = predictions(on["store"]), predictions(off["store"])
    assert list(a.index) == list(b.index) and len(a) == 2 * 20  # 2 strategies x every image once
    pa, pb = np.array(a.probs.tolist()), np.array(b.probs.tolist())
    assert not np.allclose(pa, pa.mean(0))  # the models predict something image-specific
    assert np.abs(pa - pb).max() <= ATOL[amp], np.abs(pa - pb).max()
    assert (np.array(a.y_true) == np.array(b.y_true)).all()


def test_two_data_sets_and_two_sizes_in_one_process_never_share_features(tmp_path):
    """One grid over two data sets of the same shape (a key without the data fingerprint would hand the
    second the first's features, silently) at two image sizes, against each pair run on its own with
    a fresh cache: identical predictions."""
    datasets = [{"name": f"syn{s}", "source": "synthetic",
                 "options": {"n_patients": 8, "images_per_patient": 2, "seed": s}} for s in (1, 2)]
    backbones = [{"name": TINY, "pretrained": False, "image_size": size} for size in (32, 40)]
    together = {**grid(tmp_path, "together", amp="off"), "datasets": datasets, "backbones": backbones,
                "strategies": ["linear_probe"]}
    summary = medtune.run(together, progress=False)
    assert (summary.done, summary.failed) == (8, 0)
    with Store(together["store"]) as s:
        cells = s.cells()
        joint = s.predictions().merge(cells[["cell_id", "dataset", "fold", "config_json"]], on="cell_id")
    import json

    joint["size"] = [json.loads(c)["backbone"]["image_size"] for c in joint.config_json]
    for d in datasets:
        for b in backbones:
            import medtune.training.loop as train

            train._SHARED_CACHE = None  # what a new process would start with
            alone = {**together, "datasets": [d], "backbones": [b],
                     "store": str(tmp_path / f"{d['name']}_{b['image_size']}.sqlite")}
            assert medtune.run(alone, progress=False).done == 2
            ref = predictions(alone["store"]).reset_index()
            got = (joint[(joint.dataset == d["name"]) & (joint["size"] == b["image_size"])]
                   .sort_values(["fold", "sample"]))
            assert len(got) == len(ref) == 16
            np.testing.assert_allclose(np.array(got.probs.tolist()),
                                       np.array(ref.sort_values(["fold", "sample"]).probs.tolist()),
                                       atol=ATOL["off"], err_msg=f"{d['name']} at {b['image_size']} px")
