"""The best model as a directory a clinic can run: weights + everything needed to preprocess.

`<store>.models/best/` holds `weights.pt` (the network's state dict), `model.json` (backbone,
strategy, head, class names, image size, mean/std, and which cell of the store it is), and for
the SVM head `svm.joblib` (the fitted scikit-learn pipeline on the network's pre-logits
features). The model is the best cell group's fold-0 model: the same cell whose out-of-fold
predictions are in the store, so `medtune predict` on its test images reproduces them.
`export` writes TorchScript and ONNX of a module that takes [0, 1] RGB images and returns
probabilities (softmax head) or features (SVM head), with `preprocessing.json` beside it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtune.errors import MedtuneError

MODEL_JSON = "model.json"


def models_dir(store_path: str | Path) -> Path:
    return Path(f"{store_path}.models")


def best_dir(store_path: str | Path, dataset: str, first: bool) -> Path:
    """`best/` for the first data set of the config, `best-<data set>/` for the others."""
    return models_dir(store_path) / ("best" if first else f"best-{dataset}")


def fold_models_dir(store_path: str | Path) -> Path:
    """Where the grid keeps each group's fold-0 model until `keep_best` has picked the best one."""
    return models_dir(store_path) / "fold0"


def save_fold_model(store_path: str | Path, cell_id: str, state_dict: dict, svm: Any = None) -> None:
    """Keep a fold-0 cell's trained weights (and SVM head) so the best one needs no retraining."""
    out = fold_models_dir(store_path) / cell_id
    out.mkdir(parents=True, exist_ok=True)
    if svm is not None:
        import joblib

        joblib.dump(svm, out / "svm.joblib")
    torch.save(state_dict, out / "weights.tmp")
    (out / "weights.tmp").replace(out / "weights.pt")  # a kill mid-write leaves no half file behind


def load_fold_model(store_path: str | Path, cell_id: str) -> tuple[dict, Any] | None:
    """The kept (state dict, SVM or None) of a fold-0 cell, or None when the grid did not keep it."""
    out = fold_models_dir(store_path) / cell_id
    if not (out / "weights.pt").is_file():
        return None
    svm = None
    if (out / "svm.joblib").is_file():
        import joblib

        svm = joblib.load(out / "svm.joblib")
    return torch.load(out / "weights.pt", map_location="cpu", weights_only=True), svm


def save_bundle(out: str | Path, state_dict: dict, meta: dict, svm: Any = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out / "weights.pt")
    if svm is not None:
        import joblib

        joblib.dump(svm, out / "svm.joblib")
    (out / MODEL_JSON).write_text(json.dumps({**meta, "svm": svm is not None}, indent=1, default=str))
    return out


@dataclass
class Bundle:
    model: nn.Module
    meta: dict
    svm: Any = None

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, 3, H, W) at `image_size` -> class probabilities (N, k), fp32 on the CPU."""
        from medtune.explain import normalise

        self.model.eval()
        out = []
        for start in range(0, len(images), batch_size):
            x = normalise(images[start:start + batch_size], self.meta["mean"], self.meta["std"])
            if self.svm is not None:
                feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True).numpy()
                out.append(self._svm_proba(feats))
            else:
                out.append(torch.softmax(self.model(x).float(), 1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.meta["class_names"])))

    def _svm_proba(self, feats: np.ndarray) -> np.ndarray:
        from medtune.heads import full_proba

        return full_proba(self.svm, feats, len(self.meta["class_names"]))


def load_bundle(path: str | Path) -> Bundle:
    from medtune.backbones import create_backbone

    path = Path(path)
    if not (path / MODEL_JSON).is_file() or not (path / "weights.pt").is_file():
        raise MedtuneError(f"{path} is not a medtune model directory (it needs {MODEL_JSON} and weights.pt). "
                           "Run a grid with `keep_best: true` and use <store>.models/best.")
    meta = json.loads((path / MODEL_JSON).read_text())
    model = create_backbone(meta["backbone"], pretrained=False, num_classes=len(meta["class_names"]))
    model.load_state_dict(torch.load(path / "weights.pt", map_location="cpu", weights_only=True))
    model.eval()
    svm = None
    if meta.get("svm"):
        import joblib

        svm = joblib.load(path / "svm.joblib")
    return Bundle(model, meta, svm)


class Deployable(nn.Module):
    """RGB in [0, 1], (N, 3, S, S) -> probabilities (softmax head) or pre-logits features (SVM head):
    normalisation lives inside, so a consumer only resizes and scales to [0, 1]."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], features: bool) -> None:
        super().__init__()
        self.model = model
        self.features = features
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.features:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return torch.softmax(self.model(x), 1)


def export(path: str | Path, fmt: str) -> Path:
    """Write `model.torchscript.pt` or `model.onnx` into the model directory, and `preprocessing.json`."""
    b = load_bundle(path)
    path = Path(path)
    module = Deployable(b.model, b.meta["mean"], b.meta["std"], features=b.svm is not None).eval()
    example = torch.rand(2, 3, b.image_size, b.image_size)
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        out = path / "model.torchscript.pt"
        traced.save(str(out))
    elif fmt == "onnx":
        out = path / "model.onnx"
        try:
            torch.onnx.export(module, (example,), str(out), input_names=["image"], output_names=["output"],
                              dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
        except ImportError as exc:
            raise MedtuneError(f"ONNX export needs the `onnx` package ({exc}); `pip install onnx`.") from exc
    else:
        raise MedtuneError(f"unknown export format {fmt!r}; use torchscript or onnx.")
    pre = {"input": "RGB float32 in [0, 1], shape (N, 3, S, S), resized to S x S",
           "image_size": b.image_size, "mean": b.meta["mean"], "std": b.meta["std"],
           "normalisation": "inside the model", "class_names": b.meta["class_names"],
           "output": "features for svm.joblib (predict_proba)" if b.svm is not None else "class probabilities",
           "backbone": b.meta["backbone"], "strategy": b.meta["strategy"], "head": b.meta["head"]}
    (path / "preprocessing.json").write_text(json.dumps(pre, indent=1))
    return out


def keep_best(cells: list[dict], prepared: dict, settings, device: torch.device, store) -> list[Path]:
    """After the grid: per data set, save the fold-0 model of the group with the best mean balanced
    accuracy as a bundle, plus a Grad-CAM gallery of its test fold. The local grid keeps every
    group's fold-0 model (`save_fold_model`), so the best one is the very model whose predictions
    are in the store; when it was not kept (a store resumed from an older run, Ray) that cell is
    retrained with `keep_model` and rewritten in the store, so the store again holds exactly this
    model's predictions. Skipped when the directory already holds that cell's model."""
    from medtune.backbones import preprocessing
    from medtune.explain import gallery, grad_cam_installed
    from medtune.report import GROUP
    from medtune.runner import model_key, run_cell
    from medtune.train import Runtime, autocast_dtype, shared_cache

    m = store.metrics()
    if m.empty:
        return []
    by_id = {c["cell_id"]: c for c in cells}
    m = m[m.cell_id.isin(list(by_id))]
    saved = []
    for i, ds in enumerate(dict.fromkeys(c["dataset"] for c in cells)):
        sub = m[m.dataset == ds]
        if sub.empty or sub["balanced_accuracy"].isna().all():
            continue
        means = sub.groupby(GROUP)["balanced_accuracy"].mean()
        best = means.idxmax()
        members = sub[sub[GROUP].apply(tuple, axis=1) == best]
        cell = by_id[members.sort_values(["seed", "fold"]).cell_id.iloc[0]]
        out = best_dir(store.path, ds, first=i == 0)
        if (out / MODEL_JSON).is_file() and json.loads((out / MODEL_JSON).read_text()).get("cell_id") == cell["cell_id"]:
            saved.append(out)
            continue
        data = prepared[f"{ds}@{cell['config']['backbone']['image_size']}"]
        kept = load_fold_model(store.path, cell["cell_id"])
        if kept is not None:  # the grid kept this cell's model: its predictions are already in the store
            state_dict, svm = kept
            p = store.predictions([cell["cell_id"]])
            predictions = (p["sample"].to_numpy(), list(p["path"]), p["y_true"].to_numpy(), np.array(p["probs"].tolist()))
        else:  # resumed from a store whose models were not kept (or Ray): retrain that cell
            rt = Runtime(device, shared_cache() if settings.cache else None, model_key(cell),
                         autocast_dtype(device, settings.amp))
            try:
                result = run_cell(cell, data, settings, rt, keep_model=True)
            except (MedtuneError, RuntimeError, ValueError) as exc:  # the grid's results stand without it
                warnings.warn(f"{ds}: the best model ({cell['strategy']}, fold {cell['fold']}) could not be retrained "
                              f"and was not saved: {exc}", stacklevel=2)
                continue
            store.save_cell(cell, "done", result.metrics, result.predictions, result.seconds, info=result.info,
                            extra=result.extra)
            state_dict, svm, predictions = result.state_dict, result.head_model, result.predictions
        table = data.table
        model_for_pre = load_state(cell, table.num_classes, state_dict)
        meta = {"dataset": ds, "backbone": cell["backbone"], "strategy": cell["strategy"], "head": cell["head"],
                "class_names": table.class_names, "image_size": table.image_size, **_mean_std(preprocessing(model_for_pre)),
                "cell_id": cell["cell_id"], "fold": cell["fold"], "n_folds": cell["n_folds"], "seed": cell["seed"],
                "group_mean_balanced_accuracy": float(means[best]), "store": str(store.path),
                "positive": data.positive, "config": cell["config"]}
        save_bundle(out, state_dict, meta, svm)
        test_idx, paths, y, probs = predictions
        if grad_cam_installed():
            gallery(model_for_pre, table.images[torch.as_tensor(np.array(test_idx))], np.asarray(y), np.asarray(probs), paths,
                    table.class_names, meta["mean"], meta["std"], out / "gallery")
        else:
            print(f"{ds}: best model saved to {out}; no Grad-CAM gallery (pip install 'medtune[report]' for one)")
        saved.append(out)
    shutil.rmtree(fold_models_dir(store.path), ignore_errors=True)  # the best is saved; the others go
    return saved


def _mean_std(pre: dict) -> dict:
    return {"mean": pre["mean"], "std": pre["std"]}


def load_state(cell: dict, n_classes: int, state_dict: dict) -> nn.Module:
    from medtune.backbones import create_backbone

    model = create_backbone(cell["backbone"], pretrained=False, num_classes=n_classes)
    model.load_state_dict(state_dict)
    return model.eval()
