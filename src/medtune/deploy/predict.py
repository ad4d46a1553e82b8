"""`medtune predict`: class probabilities for new images from a saved model directory.

Images are decoded exactly as for training (`medtune.data.loaders`), at the model's image size. The
default is the mean over the bundle's fold models; with `fold=N` a file of that fold's test set
gets the very probabilities the store holds for it.
Inputs may be image files, folders (plain, or one sub-folder per class: the folder name is then
kept as the true label) and CSV manifests (`path,label`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medtune.deploy.bundle import Bundle, load_bundle
from medtune.data.loaders import IMAGE_SUFFIXES, decode_image
from medtune.errors import DataError


def _manifest(csv_path: Path) -> list[tuple[Path, str | None]]:
    """`path[,label]` rows, paths relative to the CSV's folder; unlike a training manifest any
    subset of classes (or no label column) is fine."""
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    if "path" not in df.columns:
        raise DataError(f"manifest {csv_path} has no `path` column; found {list(df.columns)}. "
                        "Expected a header line `path[,label]`.")
    labels = df["label"] if "label" in df.columns else [None] * len(df)
    return [(csv_path.parent / p.strip(), (lab.strip() or None) if lab is not None else None)
            for p, lab in zip(df["path"], labels)]


def _folder(root: Path) -> list[tuple[Path, str | None]]:
    """Image files under `root`; a file in a sub-folder gets that sub-folder's name as its true label."""
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder.")
    return [(f, f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None) for f in files]


def read_inputs(inputs: list[str | Path], size: int) -> tuple[torch.Tensor, list[str], list[str | None]]:
    """(uint8 images, paths, true labels or None) from files, folders and manifests, in the given order;
    decoded by `medtune.data.loaders.decode_image`, exactly as for training."""
    items: list[tuple[Path, str | None]] = []
    for raw in inputs:
        p = Path(raw)
        if p.suffix.lower() == ".csv" and p.is_file():
            items += _manifest(p)
        elif p.is_dir():
            items += _folder(p)
        elif p.is_file():
            items.append((p, None))
        else:
            raise DataError(f"{p} does not exist: give image files, folders or a .csv manifest.")
    images = torch.from_numpy(np.stack([decode_image(f, size) for f, _ in items]))
    return images, [str(f) for f, _ in items], [lab for _, lab in items]


PREVALENCE = "at the training prevalence"
EQUAL_PRIORS = ("under equal class priors, not risks at the data's prevalence: this model.json records no training "
                "priors (saved by medtune before they were; rerun the grid to save them)")


def fold_probabilities(bundle: Bundle, images: torch.Tensor, tta: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(the models' own mean probabilities, the probabilities to report, which ones those are). A
    class-weighted (balanced) model outputs equal-prior posteriors; with its training fold's class
    frequencies in model.json each fold model's output is mapped back to that prevalence
    (evidence.to_risk), as the report scores them, and then averaged; without them (an older bundle)
    the outputs are returned as they are, and said to be so. Unweighted models need no mapping."""
    from medtune.evaluation.evidence import to_risk

    entries = bundle.meta.get("folds", [])
    priors = [e.get("priors") for e in entries]
    if bundle.meta.get("class_weight") == "none":
        raw = bundle.predict_proba(images, tta=tta)
        return raw, raw, PREVALENCE
    if not priors or any(p is None for p in priors):
        raw = bundle.predict_proba(images, tta=tta)
        return raw, raw, EQUAL_PRIORS
    raws = [bundle.select(e["fold"]).predict_proba(images, tta=tta) for e in entries]
    risks = [to_risk(r, np.asarray(p, dtype=float)) for r, p in zip(raws, priors)]
    return np.mean(raws, 0), np.mean(risks, 0), PREVALENCE


def predict(model_dir: str | Path, inputs: list[str | Path], out: str | Path | None = None,
            cam: bool = False, fold: int | None = None, tta: str | None = None) -> pd.DataFrame:
    """Probabilities per class for every input image: the mean over the bundle's fold models (or
    `fold`'s model alone), and with `tta="flip"` over each image and its mirror; `predictions.csv`
    (and Grad-CAM overlays of the first fold's network in `cam/` when asked) written to `out` if given."""
    if cam:
        from medtune.report.explain import require_grad_cam

        require_grad_cam()  # before any work, not after the probabilities
    bundle: Bundle = load_bundle(model_dir).select(fold)
    images, paths, labels = read_inputs(inputs, bundle.image_size)
    names = bundle.meta["class_names"]
    raw, probs, scale = fold_probabilities(bundle, images, tta)
    # the predicted class keeps the decision rule the model was evaluated with (argmax of its own outputs)
    df = pd.DataFrame({"path": paths, "true": labels, "predicted": [names[i] for i in raw.argmax(1)]})
    for j, name in enumerate(names):
        df[f"p_{name}"] = probs[:, j]
    df["probabilities"] = scale
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if cam:
            from medtune.report.explain import cam_maps, normalise, save_overlay

            maps = cam_maps(bundle.model, normalise(images, bundle.meta["mean"], bundle.meta["std"]),
                            list(probs.argmax(1)))
            df["cam"] = [str(save_overlay(out / "cam" / f"{i:04d}_{Path(p).stem}.png", img, m))
                         for i, (p, img, m) in enumerate(zip(paths, images, maps))]
        df.to_csv(out / "predictions.csv", index=False)
    return df
