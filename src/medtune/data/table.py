"""The in-memory data set every loader returns (below data/loaders.py and data/synthetic.py, which both build it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class ImageTable:
    """Images decoded once: uint8 (N, 3, H, W) plus labels, class names, paths and groups.

    `groups` holds patient ids (one per image, as strings) when the source has them; `split`
    keeps an official train/val/test split where the source defines one (MedMNIST).
    `digests` are content hashes of the decoded pixels, used to find duplicates.
    """

    images: torch.Tensor
    labels: np.ndarray
    class_names: list[str]
    paths: list[str]
    groups: np.ndarray | None = None
    split: np.ndarray | None = None
    name: str = "dataset"
    digests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[0] != n or len(self.paths) != n:
            raise ValueError("images, labels and paths must have the same length")
        if not self.digests:
            self.digests = [pixel_digest(img) for img in self.images]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {c: int(k) for c, k in zip(self.class_names, counts)}

    def subset(self, index: np.ndarray) -> "ImageTable":
        index = np.asarray(index)
        return replace(
            self,
            images=self.images[torch.as_tensor(index)],
            labels=self.labels[index],
            paths=[self.paths[i] for i in index],
            groups=None if self.groups is None else self.groups[index],
            split=None if self.split is None else self.split[index],
            digests=[self.digests[i] for i in index],
        )

    def fingerprint(self) -> str:
        """Content hash of the whole table: keys caches and goes into every cell's record."""
        h = hashlib.sha1()
        h.update(repr((self.class_names, tuple(self.images.shape))).encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        for d in self.digests:
            h.update(d.encode())
        return h.hexdigest()[:16]


def pixel_digest(image: torch.Tensor | np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()


# --------------------------------------------------------------------------- decoding
