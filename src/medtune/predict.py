"""`medtune predict`: class probabilities for new images from a saved model directory.

Images are decoded exactly as for training (`medtune.data`), at the model's image size, so the
same file gets the same probabilities it got as an out-of-fold test image in the store.
Inputs may be image files, folders (plain, or one sub-folder per class: the folder name is then
kept as the true label) and CSV manifests (`path,label`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medtune.bundle import Bundle, load_bundle
from medtune.data import IMAGE_SUFFIXES, decode_image, load_folder, load_manifest
from medtune.errors import DataError


def read_inputs(inputs: list[str | Path], size: int) -> tuple[torch.Tensor, list[str], list[str | None]]:
    """(uint8 images, paths, true labels or None) from files, folders and manifests, in the given order."""
    images, paths, labels = [], [], []
    for raw in inputs:
        p = Path(raw)
        if p.suffix.lower() == ".csv" and p.is_file():
            t = load_manifest(p, size)
            images.append(t.images)
            paths += t.paths
            labels += [t.class_names[y] for y in t.labels]
        elif p.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir()):
            t = load_folder(p, size)
            images.append(t.images)
            paths += t.paths
            labels += [t.class_names[y] for y in t.labels]
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder.")
            images.append(torch.from_numpy(np.stack([decode_image(f, size) for f in files])))
            paths += [str(f) for f in files]
            labels += [None] * len(files)
        elif p.is_file():
            images.append(torch.from_numpy(decode_image(p, size))[None])
            paths.append(str(p))
            labels.append(None)
        else:
            raise DataError(f"{p} does not exist: give image files, folders or a .csv manifest.")
    return torch.cat(images), paths, labels


def predict(model_dir: str | Path, inputs: list[str | Path], out: str | Path | None = None,
            cam: bool = False) -> pd.DataFrame:
    """Probabilities per class for every input image; `predictions.csv` (and Grad-CAM overlays in
    `cam/` when asked) written to `out` if given."""
    bundle: Bundle = load_bundle(model_dir)
    images, paths, labels = read_inputs(inputs, bundle.image_size)
    probs = bundle.predict_proba(images)
    names = bundle.meta["class_names"]
    df = pd.DataFrame({"path": paths, "true": labels, "predicted": [names[i] for i in probs.argmax(1)]})
    for j, name in enumerate(names):
        df[f"p_{name}"] = probs[:, j]
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if cam:
            from medtune.explain import cam_maps, normalise, save_overlay

            maps = cam_maps(bundle.model, normalise(images, bundle.meta["mean"], bundle.meta["std"]),
                            list(probs.argmax(1)))
            df["cam"] = [str(save_overlay(out / "cam" / f"{i:04d}_{Path(p).stem}.png", img, m))
                         for i, (p, img, m) in enumerate(zip(paths, images, maps))]
        df.to_csv(out / "predictions.csv", index=False)
    return df
