"""The deployed model as a directory a clinic can run: weights + everything needed to preprocess.

`<store>.models/best/` holds one `fold<k>/weights.pt` (and, for a head fitted on features,
`head.joblib`) per fold model of the deployed group, `model.json` (backbone, strategy, head, class
names, image size,
mean/std, which cells of the store the folds are and how the group was chosen) and MODEL_CARD.md.
The group is the one the report headlines (`headline.headline_group`: never chosen on the test
folds unless it says so), and its networks are the very models whose out-of-fold predictions are
in the store. `predict` averages their probabilities, as nnU-Net and AUCMEDI deploy k-fold CV;
`export` writes that average as one TorchScript / ONNX graph taking [0, 1] RGB images.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtune.errors import MedtuneError

MODEL_JSON = "model.json"
MODEL_CARD = "MODEL_CARD.md"
HEAD_FILE = "head.joblib"  # a fitted feature head (heads.HEADS); model.json's `head` names which
OLD_HEAD_FILE = "svm.joblib"  # what bundles before the head registry called it, for every feature head
# How medtune.data.loaders.decode_image (training and `predict`) resizes image files: a consumer of the export
# must do the same (bilinear is off by up to 0.10 in probability on the tiny test model).
RESIZE = ("bicubic: PIL Image.resize((S, S), Image.BICUBIC) of the RGB image, then rounded to uint8 and divided "
          "by 255, as medtune predict does")


def models_dir(store_path: str | Path) -> Path:
    return Path(f"{store_path}.models")


def best_dir(store_path: str | Path, dataset: str, first: bool) -> Path:
    """`best/` for the first data set of the config, `best-<data set>/` for the others."""
    return models_dir(store_path) / ("best" if first else f"best-{dataset}")


def fold_models_dir(store_path: str | Path) -> Path:
    """Where the grid keeps each cell's fold model (first seed) until `keep_best` has picked a group."""
    return models_dir(store_path) / "kept"


def save_fold_model(store_path: str | Path, cell_id: str, state_dict: dict, head: Any = None) -> None:
    """Keep a cell's trained weights (and feature head) so the deployed group needs no retraining."""
    _write_model(fold_models_dir(store_path) / cell_id, state_dict, head)


def _write_model(out: Path, state_dict: dict, head: Any = None) -> None:
    """Each file is written under a name no other process uses, then renamed into place: a kill
    mid-write leaves no half file, and two runs sharing a store never rename each other's file."""
    out.mkdir(parents=True, exist_ok=True)
    if head is not None:
        import joblib

        _atomic(out / HEAD_FILE, lambda f: joblib.dump(head, f))
    _atomic(out / "weights.pt", lambda f: torch.save(state_dict, f))


def _atomic(target: Path, write) -> None:
    import os
    import secrets

    tmp = target.with_name(f"{target.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left behind by a failed write (a full disk)


def load_fold_model(store_path: str | Path, cell_id: str) -> tuple[dict, Any] | None:
    """The kept (state dict, feature head or None) of a cell, or None when the grid did not keep it."""
    return _read_model(fold_models_dir(store_path) / cell_id)


@contextmanager
def old_module_names():
    """Heads pickled before the package was split by stage name their class `medtune.heads.SVMHead`:
    while one is unpickled, that name points at today's module (medtune.models.heads)."""
    from medtune.models import heads

    old = sys.modules.get("medtune.heads")
    sys.modules["medtune.heads"] = heads
    try:
        yield
    finally:
        if old is None:
            sys.modules.pop("medtune.heads", None)
        else:
            sys.modules["medtune.heads"] = old


def _read_model(out: Path) -> tuple[dict, Any] | None:
    """(state dict, feature head or None), or None when there is no weights.pt; an unreadable file
    (truncated, overwritten) is a MedtuneError naming it. An older bundle's `svm.joblib` is read too."""
    if not (out / "weights.pt").is_file():
        return None
    head = None
    for name in (HEAD_FILE, OLD_HEAD_FILE):
        if (out / name).is_file():
            import joblib

            try:
                with old_module_names():
                    head = joblib.load(out / name)
            except Exception as exc:  # noqa: BLE001 - pickle/EOF/zlib errors of a damaged file
                raise unreadable(out / name, exc) from exc
            break
    try:
        return torch.load(out / "weights.pt", map_location="cpu", weights_only=True), head
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise unreadable(out / "weights.pt", exc) from exc


def unreadable(path: Path, exc: BaseException) -> MedtuneError:
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return MedtuneError(f"{path} cannot be read ({type(exc).__name__}: {first}): the file is truncated or damaged "
                        "(an interrupted copy?). Copy the model directory again from where it was written, or rerun "
                        "the grid with `keep_best: true` (finished cells are reused) to write it again.")


def save_bundle(out: str | Path, models: list[tuple[dict, Any]], meta: dict) -> Path:
    """The deployable directory: `fold<k>/weights.pt` (+ `head.joblib`) per fold model, `model.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("fold*"):
        shutil.rmtree(old, ignore_errors=True)
    for entry, (state_dict, head) in zip(meta["folds"], models):
        _write_model(out / entry["dir"], state_dict, head)
    (out / MODEL_JSON).write_text(json.dumps(meta, indent=1, default=str))
    return out


@dataclass
class Bundle:
    """The deployed group: one network per fold (or one), whose probabilities `predict_proba` averages."""

    models: list[nn.Module]
    meta: dict
    heads: list[Any]  # each fold's fitted feature head, or None where the network's softmax is the head

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def model(self) -> nn.Module:
        """The first fold's network (Grad-CAM explains one network)."""
        return self.models[0]

    def select(self, fold: int | None) -> "Bundle":
        """The bundle restricted to one fold's model (`--fold N`); all of them for None."""
        if fold is None:
            return self
        folds = [e["fold"] for e in self.meta["folds"]]
        if fold not in folds:
            raise MedtuneError(f"this model has fold(s) {folds}; --fold {fold} is not one of them.")
        i = folds.index(fold)
        return Bundle([self.models[i]], {**self.meta, "folds": [self.meta["folds"][i]]}, [self.heads[i]])

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor, batch_size: int = 32, tta: str | None = None) -> np.ndarray:
        """uint8 (N, 3, H, W) at `image_size` -> class probabilities (N, k), fp32 on the CPU: the mean
        over the fold models (and, with `tta="flip"`, over the image and its horizontal mirror)."""
        from medtune.report.explain import normalise

        if tta not in (None, "none", "flip"):
            raise MedtuneError(f"unknown test-time augmentation {tta!r}; use flip or none.")
        k = len(self.meta["class_names"])
        views = [lambda x: x] + ([lambda x: torch.flip(x, dims=[3])] if tta == "flip" else [])
        total = np.zeros((len(images), k))
        for model, head in zip(self.models, self.heads):
            model.eval()
            for view in views:
                out = []
                for start in range(0, len(images), batch_size):
                    x = view(normalise(images[start:start + batch_size], self.meta["mean"], self.meta["std"]))
                    if head is not None:
                        feats = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
                        out.append(_head_proba(head, feats, k))
                    else:
                        out.append(torch.softmax(model(x).float(), 1).numpy())
                if out:
                    total += np.concatenate(out)
        return total / (len(self.models) * len(views))


def _head_proba(head, feats: np.ndarray, k: int) -> np.ndarray:
    from medtune.models.heads import full_proba

    return full_proba(head, feats, k)


def load_bundle(path: str | Path) -> Bundle:
    from medtune.models.backbones import create_backbone

    path = Path(path)
    if not (path / MODEL_JSON).is_file():
        raise MedtuneError(f"{path} is not a medtune model directory (it needs {MODEL_JSON} and fold*/weights.pt). "
                           "Run a grid with `keep_best: true` and use <store>.models/best.")
    try:
        meta = json.loads((path / MODEL_JSON).read_text())
        for key in ("backbone", "class_names", "image_size", "mean", "std"):
            meta[key]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise MedtuneError(f"{path / MODEL_JSON} is damaged ({type(exc).__name__}: {exc}). Copy the model directory "
                           "again, or rerun the grid with `keep_best: true` to write it again.") from exc
    folds = meta.get("folds") or [{"dir": ".", "fold": meta.get("fold", 0), "cell_id": meta.get("cell_id")}]
    meta["folds"] = folds
    models, heads = [], []
    for entry in folds:
        kept = _read_model(path / entry["dir"])
        if kept is None:
            raise MedtuneError(f"{path / entry['dir']}: weights.pt is missing; the model directory is incomplete. "
                               "Rerun the grid (finished cells are reused) to write it again.")
        model = create_backbone(meta["backbone"], pretrained=False, num_classes=len(meta["class_names"]))
        try:
            model.load_state_dict(kept[0])
        except (RuntimeError, TypeError, AttributeError) as exc:  # weights of another model, or not a state dict
            raise unreadable(path / entry["dir"] / "weights.pt", exc) from exc
        models.append(model.eval())
        heads.append(kept[1])
    return Bundle(models, meta, heads)


class Deployable(nn.Module):
    """RGB in [0, 1], (N, 3, S, S) -> probabilities (softmax head) or pre-logits features (feature head):
    normalisation lives inside, so a consumer only resizes and scales to [0, 1]. With several
    networks (the fold ensemble) the output is the mean of their probabilities: one graph."""

    def __init__(self, models: list[nn.Module], mean: list[float], std: list[float], features: bool,
                 priors: list[list[float]] | None = None) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.features = features
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        # each fold model's training class frequencies: its equal-prior output is mapped back to that
        # prevalence before the mean, as `predict` does (predict.fold_probabilities, evidence.to_risk)
        self.map_priors = priors is not None
        if priors is not None:
            self.register_buffer("priors", torch.tensor(priors, dtype=torch.float32).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.features:
            m = self.models[0]
            return m.forward_head(m.forward_features(x), pre_logits=True)
        p = torch.stack([torch.softmax(m(x), 1) for m in self.models])
        if self.map_priors:
            p = p * self.priors
            p = p / p.sum(2, keepdim=True)
        return p.mean(0)


def export(path: str | Path, fmt: str, fold: int | None = None) -> Path:
    """Write `model.torchscript.pt` or `model.onnx` (the fold ensemble, or `fold`'s model) into the model
    directory, and `preprocessing.json`."""
    b = load_bundle(path).select(fold)
    path = Path(path)
    features = b.heads[0] is not None
    head_file = HEAD_FILE if (path / b.meta["folds"][0]["dir"] / HEAD_FILE).is_file() else OLD_HEAD_FILE
    if features and len(b.models) > 1:
        raise MedtuneError(f"{path}: a {b.meta['head']} head's ensemble is {len(b.models)} networks plus "
                           f"{len(b.models)} scikit-learn heads, which is not one graph; export one fold's network "
                           f"with --fold N (its features go to that fold's {head_file}).")
    import os

    if not os.access(path, os.W_OK):
        raise MedtuneError(f"{path} is not writable, and export writes the model file and preprocessing.json there. "
                           "Copy the model directory somewhere writable (cp -r) and export the copy.")
    priors = [e.get("priors") for e in b.meta["folds"]]
    mapped = not features and b.meta.get("class_weight") != "none" and bool(priors) and None not in priors
    module = Deployable(b.models, b.meta["mean"], b.meta["std"], features=features,
                        priors=priors if mapped else None).eval()
    example = torch.rand(2, 3, b.image_size, b.image_size)
    suffix = "" if fold is None else f".fold{fold}"
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        out = path / f"model{suffix}.torchscript.pt"
        traced.save(str(out))
    elif fmt == "onnx":
        out = path / f"model{suffix}.onnx"
        try:
            torch.onnx.export(module, (example,), str(out), input_names=["image"], output_names=["output"],
                              dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
        except ImportError as exc:
            raise MedtuneError(f"ONNX export needs the `onnx` package ({exc}); `pip install onnx`.") from exc
    else:
        raise MedtuneError(f"unknown export format {fmt!r}; use torchscript or onnx.")
    pre = {"input": "RGB float32 in [0, 1], shape (N, 3, S, S), resized to S x S",
           "image_size": b.image_size, "resize": RESIZE, "mean": b.meta["mean"], "std": b.meta["std"],
           "normalisation": "inside the model: (x - mean) / std per channel, x in [0, 1]",
           "class_names": b.meta["class_names"],
           "output": f"features for {head_file} (predict_proba)" if features else
                     f"class probabilities, the mean over {len(b.models)} fold model(s), "
                     + ("each at its training fold's prevalence, as `medtune predict` gives them" if mapped or
                        b.meta.get("class_weight") == "none" else "under equal class priors (model.json records "
                        "no training priors)"),
           "folds": [e["fold"] for e in b.meta["folds"]],
           "backbone": b.meta["backbone"], "strategy": b.meta["strategy"], "head": b.meta["head"]}
    try:
        (path / "preprocessing.json").write_text(json.dumps(pre, indent=1))
    except OSError as exc:
        raise MedtuneError(f"cannot write {path / 'preprocessing.json'} ({exc.strerror or exc}): free some space or "
                           "copy the model directory somewhere writable, then export again.") from exc
    return out


def deployed(store_path: str | Path) -> tuple[dict, object]:
    """({data set: Verdict}, Evidence) of a store: the one decision of what to deploy (evaluation/verdict.py)."""
    from medtune.evaluation.evidence import read_evidence
    from medtune.evaluation.verdict import verdicts

    ev = read_evidence(store_path)
    return verdicts(ev), ev


def keep_best(cells: list[dict], prepared: dict, settings, device: torch.device, store) -> list[Path]:
    """After the grid: per data set, save every fold model (first seed) of the verdict's recommended
    group (`deployed`: evaluation/verdict.py, the rule `recommend:` the store's config names) as one
    bundle with its MODEL_CARD.md, the rule used and the training priors, plus a Grad-CAM gallery of
    fold 0's test fold. The local grid keeps each cell's model (`save_fold_model`), so the bundle's
    networks are the very models whose out-of-fold predictions are in the store; a fold model that
    was not kept (a store resumed from an older run, Ray) is retrained with `keep_model` and its
    cell rewritten, so the store again holds exactly that model's predictions. Skipped when the
    directory already holds that group's models."""
    m = store.metrics()
    if m.empty:
        return []
    by_id = {c["cell_id"]: c for c in cells}
    m = m[m.cell_id.isin(list(by_id))]
    chosen, ev = deployed(store.path)
    saved = []
    for i, ds in enumerate(dict.fromkeys(c["dataset"] for c in cells)):
        picked = _deployed_cells(m[m.dataset == ds], ds, chosen, by_id)
        if picked is None:
            continue
        verdict, members, fold_cells = picked
        out = best_dir(store.path, ds, first=i == 0)
        ids = [c["cell_id"] for c in fold_cells]
        if (out / MODEL_JSON).is_file() and [e.get("cell_id") for e in
                                             json.loads((out / MODEL_JSON).read_text()).get("folds", [])] == ids:
            saved.append(out)
            continue
        models, first_predictions, retrained = _fold_models(fold_cells, ds, prepared, settings, device, store)
        if not models:
            continue
        _save_deployed(out, ds, models, first_predictions, prepared, store, verdict, members, ev, retrained)
        saved.append(out)
    shutil.rmtree(fold_models_dir(store.path), ignore_errors=True)  # the deployed folds are saved; the rest go
    return saved


def _deployed_cells(sub, ds: str, chosen: dict, by_id: dict) -> tuple | None:
    """(verdict, its group's metrics rows of the first seed, their cells by fold) of data set `ds`,
    or None when nothing is deployed for it (no scores, no verdict, or a group not in this grid)."""
    if sub.empty or sub["balanced_accuracy"].isna().all():
        return None
    if ds not in chosen:
        return None
    verdict = chosen[ds]
    members = sub[sub.group == verdict.group]
    if members.empty:  # the store's recommendation is a group this run's config no longer lists
        warnings.warn(f"{ds}: the recommended group ({verdict.name}) has no cell in this run's grid; no model "
                      "was deployed. Rerun its config, or `medtune report` for the whole store.", stacklevel=3)
        return None
    members = members[members.seed == members.seed.min()].sort_values("fold")
    return verdict, members, [by_id[c] for c in members.cell_id]


def _fold_models(fold_cells: list, ds: str, prepared: dict, settings, device: torch.device, store) -> tuple:
    """([(cell, (state dict, head))] of the fold models, (cell, model, test-fold predictions) of the
    first, whether one was retrained): each kept model as the grid saved it, else retrained with its
    cell rewritten in the store; a fold that fails to retrain is left out with a warning."""
    from medtune.grid.cells import data_key_of, model_key, run_cell
    from medtune.training.loop import Runtime, autocast_dtype, shared_cache

    models, first_predictions, retrained = [], None, False
    for cell in fold_cells:
        data = prepared[data_key_of(cell)]
        kept = load_fold_model(store.path, cell["cell_id"])
        if kept is not None:  # the grid kept this cell's model: its predictions are already in the store
            p = store.predictions([cell["cell_id"]])
            predictions = (p["sample"].to_numpy(), list(p["path"]), p["y_true"].to_numpy(),
                           np.array(p["probs"].tolist()))
        else:  # resumed from a store whose models were not kept (or Ray): retrain that cell
            rt = Runtime(device, shared_cache() if settings.cache else None, model_key(cell),
                         autocast_dtype(device, settings.amp))
            try:
                result = run_cell(cell, data, settings, rt, keep_model=True)
            except (MedtuneError, RuntimeError, ValueError) as exc:  # the grid's results stand without it
                warnings.warn(f"{ds}: fold {cell['fold']} of the deployed group ({cell['strategy']}) could not "
                              f"be retrained and was left out of the bundle: {exc}", stacklevel=3)
                continue
            store.save_cell(cell, "done", result.metrics, result.predictions, result.seconds, info=result.info,
                            extra=result.extra)
            retrained = True
            kept, predictions = (result.state_dict, result.head_model), result.predictions
        models.append((cell, kept))
        if first_predictions is None:
            first_predictions = (cell, kept, predictions)
    return models, first_predictions, retrained


def _save_deployed(out: Path, ds: str, models: list, first_predictions: tuple, prepared: dict, store, verdict,
                   members, ev, retrained: bool) -> None:
    """Write the bundle of `models` to `out`: model.json, the weights, MODEL_CARD.md and fold 0's
    Grad-CAM gallery. `ev`: the store's evidence, read before any fold was `retrained`."""
    from medtune.grid.cells import data_key_of
    from medtune.models.backbones import preprocessing
    from medtune.report.card import write_model_card
    from medtune.report.explain import gallery, grad_cam_installed

    cell0, (state0, _), (test_idx, paths, y, probs) = first_predictions
    data = prepared[data_key_of(cell0)]
    table = data.table
    model_for_pre = load_state(cell0, table.num_classes, state0)
    meta = {"dataset": ds, "backbone": cell0["backbone"], "strategy": cell0["strategy"], "head": cell0["head"],
            "class_names": table.class_names, "image_size": table.image_size,
            **_mean_std(preprocessing(model_for_pre)), "group": verdict.group, "chosen_by": verdict.how,
            "recommend": verdict.rule, "verdict": verdict.lines(),
            "class_weight": (cell0["config"].get("train") or {}).get("class_weight"),

            "folds": [{"fold": c["fold"], "cell_id": c["cell_id"], "dir": f"fold{c['fold']}",
                       # the training fold's class frequencies: predict maps equal-prior outputs back with them
                       "priors": ev.priors[c["cell_id"]].tolist() if c["cell_id"] in ev.priors else None}
                      for c, _ in models],
            "cell_id": cell0["cell_id"], "fold": cell0["fold"],  # the first fold's, as before ensembles
            "n_folds": cell0["n_folds"], "seed": cell0["seed"],
            "group_mean_balanced_accuracy": float(members["balanced_accuracy"].mean()), "store": str(store.path),
            "positive": data.positive, "config": cell0["config"]}
    save_bundle(out, [k for _, k in models], meta)
    write_model_card(out, store.path, meta, None if retrained else ev)  # a retrained cell changed the store
    if grad_cam_installed():
        gallery(model_for_pre, table.images[torch.as_tensor(np.array(test_idx))], np.asarray(y), np.asarray(probs),
                paths, table.class_names, meta["mean"], meta["std"], out / "gallery")
    else:
        print(f"{ds}: best model saved to {out}; no Grad-CAM gallery (pip install 'medtune[report]' for one)")


def _mean_std(pre: dict) -> dict:
    return {"mean": pre["mean"], "std": pre["std"]}


def load_state(cell: dict, n_classes: int, state_dict: dict) -> nn.Module:
    from medtune.models.backbones import create_backbone

    model = create_backbone(cell["backbone"], pretrained=False, num_classes=n_classes)
    model.load_state_dict(state_dict)
    if weights := cell.get("config", {}).get("backbone", {}).get("weights"):  # e.g. RadImageNet's [-1, 1] inputs
        from medtune.models.weights import named_preprocessing

        pre = named_preprocessing(model.pretrained_cfg.get("architecture", cell["backbone"]), weights)
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])}
    return model.eval()
