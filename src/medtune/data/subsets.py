"""Training-set sizes for learning curves (`train_sizes:`): how a cell trains on part of its outer
training fold.

A team deciding whether to label more images asks whether more data would change which depth wins
(issue 40). Every cell can run at a size smaller than its whole training fold: a fraction of the
fold's training patients (0.25) or a number of them (an integer, 40). The subsets are

- **patient-intact**: a patient's images (a duplicate group's copies) are all in or all out;
- **stratified**: each class keeps its share of the fold's patients, a patient counted in the class
  of its first image;
- **nested**: the 25% subset lies inside the 50% one, because every size takes a prefix of one
  order of the fold's patients, drawn from the seed and the fold;
- **beside the same test fold**: only the training side shrinks; the outer test fold and the
  inner-split rules are those of the full-size cell.

The order interleaves the classes so that every prefix is stratified: a class's patients are
shuffled, the r-th of its n patients gets the key (r + u) / n (u uniform in [0, 1), from the
seed), and the patients are sorted by key. The full size (`FULL`, 1.0) is today's cell: it writes
no `train_size` into the cell config, so stores written before sizes existed resume unchanged.
"""

from __future__ import annotations

import numpy as np

from medtune.errors import ConfigError, DataError

FULL = 1.0  # the whole outer training fold: the cell every store held before sizes existed
# The version of the drawing rule below, in every subset cell's id: a change to how subsets are drawn
# (the order, the rounding, the minimum) bumps it, so a resumed store never reuses cells of another rule.
SUBSET_RULE = 1
MIN_PATIENTS_PER_CLASS = 2  # a subset must still allow an inner (fit, validation) split per class


def size_of(config: dict) -> float | int:
    """The training-set size a cell config trains on (FULL when it names none)."""
    return config.get("train_size", FULL)


def is_full(size: float | int) -> bool:
    return isinstance(size, float) and size == FULL


def size_label(size: float | int) -> str:
    """How a size reads in a progress line or a table: `25%` or `40 patients`; the full size `100%`."""
    return f"{100 * size:g}%" if isinstance(size, float) else f"{size} patients"


def check_sizes(sizes: list) -> list[float | int]:
    """The config's `train_sizes`, validated: fractions in (0, 1] or patient counts (integers >= 2),
    each once, the full size among them (the verdict is made there; the smaller sizes are its
    learning curve). Returned sorted, the full size last."""
    out: list[float | int] = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ConfigError(f"train_sizes: {s!r} is neither a fraction of the training patients (0.25) nor a "
                              "number of patients (40).")
        if isinstance(s, float) and not 0 < s <= 1:
            raise ConfigError(f"train_sizes: {s!r} is not a fraction in (0, 1]; write a number of patients as an "
                              "integer (40), and the whole training fold as 1.0.")
        if isinstance(s, int) and s < 2:
            raise ConfigError(f"train_sizes: {s!r} patients cannot be split into fit and validation patients; the "
                              "whole training fold is 1.0 (a float), a number of patients an integer of at least 2.")
        if s in out and type(out[out.index(s)]) is type(s):
            raise ConfigError(f"train_sizes lists {s!r} twice; list each size once.")
        out.append(s)
    if not any(is_full(s) for s in out):
        raise ConfigError(f"train_sizes {sizes} lacks 1.0, the whole training fold: the verdict is made at the full "
                          "size and the smaller sizes draw its learning curve. Add 1.0.")
    return sorted((s for s in out if not is_full(s)), key=lambda s: (isinstance(s, float), s)) + [FULL]


def patient_order(train_idx: np.ndarray, labels: np.ndarray, groups: np.ndarray | None,
                  seed: int, fold: int) -> list[np.ndarray]:
    """The fold's training patients in the order every size takes its prefix from: a list of arrays
    of table positions, one per patient (an image is its own patient without groups)."""
    train_idx = np.asarray(train_idx)
    keys = groups[train_idx].astype(str) if groups is not None else train_idx.astype(str)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    members = [train_idx[inverse == g] for g in range(len(first))]
    cls = labels[train_idx[first]]
    rng = np.random.default_rng([seed, fold, 40])
    order_key = np.empty(len(first))
    for c in np.unique(cls):
        mine = np.flatnonzero(cls == c)
        ranks = rng.permutation(len(mine))
        order_key[mine] = (ranks + rng.random(len(mine))) / len(mine)
    return [members[g] for g in np.argsort(order_key, kind="stable")]


def n_patients(size: float | int, total: int) -> int:
    """How many of `total` training patients a size takes (a fraction rounds, at least 1)."""
    if isinstance(size, float):
        return max(1, min(total, int(round(size * total))))
    return min(size, total)


def train_subset(train_idx: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, size: float | int,
                 seed: int, fold: int, class_names: list[str] | None = None, dataset: str = "") -> np.ndarray:
    """The table positions a cell of `size` trains on, a prefix of `patient_order`; the whole fold at
    the full size. Refuses a size that leaves a class fewer than MIN_PATIENTS_PER_CLASS patients."""
    train_idx = np.asarray(train_idx)
    if is_full(size):
        return train_idx
    order = patient_order(train_idx, labels, groups, seed, fold)
    k = n_patients(size, len(order))
    if isinstance(size, int) and size > len(order):
        raise DataError(f"{dataset}: train_sizes asks for {size} patients, but fold {fold}'s training side has "
                        f"only {len(order)}. Use a smaller number or a fraction.")
    chosen = order[:k]
    counts = np.bincount([labels[p[0]] for p in chosen], minlength=int(labels.max()) + 1)
    short = [i for i, n in enumerate(counts) if n < MIN_PATIENTS_PER_CLASS]
    if short:
        names = [class_names[i] if class_names else str(i) for i in short]
        raise DataError(f"{dataset}: train size {size_label(size)} of fold {fold} keeps {k} of {len(order)} training "
                        f"patients, fewer than {MIN_PATIENTS_PER_CLASS} of class {', '.join(names)}: no inner "
                        "validation split is possible. Use a larger size in train_sizes.")
    return np.sort(np.concatenate(chosen))
