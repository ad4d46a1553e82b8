"""What the network is fed: augmented views of the uint8 table, and the frozen-prefix cache.

One augmentation regime for every strategy, so depths are compared on equal terms: each image
has `views` fixed views (view 0 the plain image, view v > 0 an augmentation whose parameters are
a pure function of (image, view)), and every time a training image is drawn one of its views is
picked uniformly with the fit's generator. A strategy whose leading units are frozen for an epoch
looks their output up in a `FeatureCache` (computed once per backbone, data set, cut point and
view, shared across epochs, folds and cells); a strategy that trains from the input computes the
very same view from the same parameters. When only the classifier trains, the cache holds pooled
features and an epoch costs a few matrix products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.backbones import FeatureChain, classifier_param_names, preprocessing
from medtune.data.loaders import ImageTable
from medtune.training.precision import autocast, cpu_lanes, in_lanes, inference_batch_size

POOLED = -1  # cut marker: cache after global pooling (only the classifier trains)
N_DRAWS = 8  # uniforms per augmented view: h-flip, v-flip, angle, scale, tx, ty, brightness, contrast


def view_uniforms(images: np.ndarray, views: np.ndarray) -> torch.Tensor:
    """(len, N_DRAWS) uniforms in [0, 1) that depend only on (image position, view): splitmix64 of
    the pair, so a view is the same whichever batch, lane or strategy computes it."""
    key = (images.astype(np.uint64) * np.uint64(1_000_003) + views.astype(np.uint64)) * np.uint64(N_DRAWS)
    z = key[:, None] + np.arange(N_DRAWS, dtype=np.uint64)[None, :] + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / float(2**53)).float()


def augment(x: torch.Tensor, cfg, u: torch.Tensor) -> torch.Tensor:
    """x: float (B, 3, H, W) in [0, 1]; `cfg` an AugmentConfig; u: (B, N_DRAWS) uniforms -> the
    augmented images (flips, small affine, brightness/contrast). Vertical flips are off by default:
    depth (ultrasound) and anatomy (X-ray) have a direction."""
    def span(col: int, lo: float, hi: float) -> torch.Tensor:
        return (u[:, col] * (hi - lo) + lo).to(x.device)

    if cfg.hflip:
        x = torch.where((u[:, 0] < 0.5).view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    if cfg.vflip:
        x = torch.where((u[:, 1] < 0.5).view(-1, 1, 1, 1).to(x.device), x.flip(-2), x)
    if cfg.degrees or cfg.translate or cfg.scale:
        ang = span(2, -cfg.degrees, cfg.degrees) * math.pi / 180
        s = span(3, 1 - cfg.scale, 1 + cfg.scale)
        tx, ty = span(4, -cfg.translate, cfg.translate) * 2, span(5, -cfg.translate, cfg.translate) * 2
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.brightness or cfg.contrast:
        br = span(6, -cfg.brightness, cfg.brightness).view(-1, 1, 1, 1)
        ct = span(7, 1 - cfg.contrast, 1 + cfg.contrast).view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * ct + mean + br).clamp(0, 1)
    return x


def norm_tensors(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights' normalisation mean and std as (1, 3, 1, 1) tensors on `device`."""
    pre = preprocessing(model)
    return (torch.tensor(pre["mean"], device=device).view(1, 3, 1, 1),
            torch.tensor(pre["std"], device=device).view(1, 3, 1, 1))


class FeatureCache:
    """Outputs of a frozen prefix, per (model key, data set, cut, views), and LP-FT's refreshed
    BatchNorm statistics (training/loop.py `refresh_statistics`); bounded in bytes.

    The model key must identify the pretrained weights (backbone name, source, image size):
    every cell of the grid that shares them shares the cache, across folds and strategies.
    """

    def __init__(self, max_bytes: int = 3 * 2**30) -> None:
        self.max_bytes = max_bytes
        self.store: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def nbytes(self) -> int:
        return sum(size(v) for v in self.store.values())

    def get(self, key: tuple, compute) -> torch.Tensor:
        if key in self.store:
            self.hits += 1
            value = self.store.pop(key)  # re-insert: most recently used last
        else:
            self.misses += 1
            value = compute()
        self.store[key] = value
        while self.nbytes() > self.max_bytes and len(self.store) > 1:
            self.store.pop(next(iter(self.store)))
        return value


def size(value: torch.Tensor | dict) -> int:
    """Bytes of a cached tensor, or of a dict of them (a model's refreshed BatchNorm statistics)."""
    if isinstance(value, dict):
        return sum(size(v) for v in value.values())
    return value.numel() * value.element_size()


_SHARED_CACHE: FeatureCache | None = None


def shared_cache() -> FeatureCache:
    """The process-wide cache: every grid run in this process (and the best-model retrain) shares it."""
    global _SHARED_CACHE
    if _SHARED_CACHE is None:
        _SHARED_CACHE = FeatureCache()
    return _SHARED_CACHE


@dataclass
class Runtime:
    """What a fit needs beyond hyperparameters: device, cache and the key of the pretrained weights."""

    device: torch.device
    cache: FeatureCache | None
    model_key: tuple
    amp_dtype: torch.dtype | None = None
    fit_memo: dict | None = None  # runner: one finished training, shared by cells that differ only in head


class Forward:
    """Runs a model from a cut point: cut 0 = raw images, cut k = after k chain units, POOLED =
    after global pooling. `prefix(x)` computes the cached part, `rest(h)` the trained part."""

    def __init__(self, model: nn.Module, chain: FeatureChain | None) -> None:
        self.model = model
        self.chain = chain

    def cut(self, frozen: frozenset[str], cache: bool) -> int:
        """The deepest cut below which every parameter is frozen: POOLED when only the classifier
        trains, else the leading chain units whose parameters are all frozen (0 = none cached)."""
        if not cache or not frozen:
            return 0
        trainable = {n for n, _ in self.model.named_parameters()} - frozen
        if trainable <= classifier_param_names(self.model):
            return POOLED
        return self.chain.frozen_units(frozen) if self.chain is not None else 0

    def prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        if cut == POOLED:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.chain.run(x, 0, cut) if cut > 0 else x

    def features(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        """Penultimate (pre-logits) features from the cut point."""
        if cut == POOLED:
            return h
        f = self.chain.run(h, cut) if cut > 0 else self.model.forward_features(h)
        return self.model.forward_head(f, pre_logits=True)

    def rest(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        return self.classify(self.features(h, cut))

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """The linear classifier in fp32, autocast or not: the probe's weights carry its
        standardisation folded in (models/probe.py), and in bf16 their products with the features cancel
        badly enough to flip decisions the fp32 fit made."""
        with torch.autocast(h.device.type, enabled=False):
            return self.model.get_classifier()(h.float())


class Inputs:
    """Training/eval inputs from a cut: the table's images as views, or the cached prefix outputs of
    those views. Training batches pick one of `views` views per image; evaluation uses view 0."""

    def __init__(self, table: ImageTable, fwd: Forward, cut: int, settings, rt: Runtime) -> None:
        self.table, self.fwd, self.cut, self.s, self.rt = table, fwd, cut, settings, rt
        self.mean, self.std = norm_tensors(fwd.model, rt.device)
        self.cached: torch.Tensor | None = None
        if cut != 0:
            # the precision is part of the key: features computed in fp32 and in bf16 differ (by ~1e-3)
            key = (*rt.model_key, table.fingerprint(), cut, settings.views, settings.augment, str(rt.amp_dtype),
                   settings.amp)
            compute = lambda: self._compute_all()  # noqa: E731
            self.cached = rt.cache.get(key, compute) if rt.cache is not None else compute()
        self.dtype = rt.amp_dtype  # precision of everything after the cut (training, validation, prediction)

    def images(self, idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Normalised images: view 0 plain, view v > 0 the fixed augmentation (image, v)."""
        x = self.table.images[idx].to(self.rt.device, non_blocking=True).float() / 255.0
        aug = views > 0
        if aug.any():
            sel = aug.to(x.device)
            u = view_uniforms(idx[aug].numpy(), views[aug].numpy())
            x[sel] = augment(x[sel], self.s.augment, u)
        x = (x - self.mean) / self.std
        if self.s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _compute_all(self) -> torch.Tensor:
        """(views, N, ...) prefix outputs with the network in eval mode, in lanes of batches."""
        model = self.fwd.model
        was = model.training
        model.eval()
        n = len(self.table)
        bs = inference_batch_size(self.rt.device, self.table.image_size)
        keep = torch.bfloat16 if self.rt.amp_dtype else torch.float32

        def prefix(view_start: tuple[int, int]) -> torch.Tensor:
            v, start = view_start
            idx = torch.arange(start, min(start + bs, n))
            with torch.no_grad(), autocast(self.rt.device, self.rt.amp_dtype):  # both are per thread
                return self.fwd.prefix(self.images(idx, torch.full_like(idx, v)), self.cut).to("cpu", keep)

        lanes = cpu_lanes(self.rt.device)
        out = [torch.cat(in_lanes(prefix, [(v, s) for s in range(0, n, bs)], lanes)) for v in range(self.s.views)]
        model.train(was)
        return torch.stack(out)

    def batch(self, idx: np.ndarray, train: bool, gen: torch.Generator) -> torch.Tensor:
        t = torch.as_tensor(idx)
        if train and self.s.views > 1:
            views = torch.randint(0, self.s.views, (len(t),), generator=gen)
        else:
            views = torch.zeros(len(t), dtype=torch.long)
        if self.cached is None:
            return self.images(t, views)
        h = self.cached[views, t].to(self.rt.device, non_blocking=True)
        return h.float() if self.dtype is None else h

    def all_views(self, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Every view of table[idx] as one (views x len, ...) float tensor and its image positions:
        the training distribution in full (what a convex probe is fitted on)."""
        h = self.cached[:, torch.as_tensor(idx)].float()
        return h.reshape(-1, *h.shape[2:]), np.tile(idx, self.s.views)

    def autocast(self):
        """Autocast for the part of the network after the cut."""
        return autocast(self.rt.device, self.dtype)
