"""The one training loop, read top to bottom, plus the frozen-prefix feature cache.

Per epoch the strategy's `lr_scales` say which blocks train. Blocks 0..j that are frozen for the
epoch are a pure function of the input view, so their output is looked up in a `FeatureCache`
(computed once per backbone, data set, cut point and augmentation view, shared across epochs,
folds and cells) and only the rest of the network runs. When only the head trains, the cache
holds pooled features and an epoch costs a few matrix products.

Augmentation works on batches of the uint8 table (flips, small affine, brightness/contrast),
so nothing is decoded twice. One policy for every strategy, so that depths are compared on equal
terms: each time a training image is drawn it is shown plain with probability 1/`views` and
augmented otherwise. With the cache the augmented versions are `views - 1` fixed ones (view 0 =
the plain image, each epoch draws one view per image); without it they are fresh per draw.
"""

from __future__ import annotations

import copy
import ctypes
import math
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtune.backbones import FeatureChain, blocks, feature_chain, preprocessing
from medtune.data import ImageTable
from medtune.errors import TrainingError
from medtune.strategies import Strategy, is_norm

POOLED = -1  # cut marker: cache after global pooling (only the classifier trains)


# --------------------------------------------------------------------------- device & precision
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} was asked for, but CUDA is not available here; use `device: auto` or `cpu`.")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast on the CPU is faster than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """None = fp32. `amp` is auto | on | off; auto turns it on where it pays (CUDA, bf16 CPUs)."""
    if amp == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "on" or cpu_has_bf16():
        return torch.bfloat16
    return None


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augment:
    """Light augmentation suited to medical images. Vertical flips are off by default: depth
    (ultrasound) and anatomy (X-ray) have a direction."""

    hflip: bool = True
    vflip: bool = False
    degrees: float = 10.0
    translate: float = 0.05
    scale: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x: float (B, 3, H, W) in [0, 1] -> augmented, same shape."""
        b = x.shape[0]

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=gen) * (hi - lo) + lo

        if self.hflip:
            flip = torch.rand(b, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
        if self.vflip:
            flip = torch.rand(b, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-2), x)
        if self.degrees or self.translate or self.scale:
            ang = u(-self.degrees, self.degrees) * math.pi / 180
            s = u(1 - self.scale, 1 + self.scale)
            tx, ty = u(-self.translate, self.translate) * 2, u(-self.translate, self.translate) * 2
            cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
            theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
            grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.brightness or self.contrast:
            br = u(-self.brightness, self.brightness).view(-1, 1, 1, 1).to(x.device)
            ct = u(1 - self.contrast, 1 + self.contrast).view(-1, 1, 1, 1).to(x.device)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * ct + mean + br).clamp(0, 1)
        return x


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - mean) / std


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainSettings:
    """Plain hyperparameters of one fit (mirrors `config.TrainConfig`)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 5
    val_fraction: float = 0.15
    class_weighted: bool = False
    balanced_sampler: bool = False
    views: int = 4
    cache: bool = True
    amp: str = "auto"
    channels_last: bool = True
    bn_statistics: str = "update"
    grad_clip: float = 5.0
    probe_lr_scale: float = 10.0
    augment: Augment = field(default_factory=Augment)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Warm-up then cosine to zero; a pure function of the step within a phase (nanoGPT style)."""
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- feature cache
class FeatureCache:
    """Outputs of a frozen prefix, per (model key, data set, cut, view); bounded in bytes.

    The model key must identify the pretrained weights (backbone name, source, image size):
    every cell of the grid that shares them shares the cache, across folds and strategies.
    """

    def __init__(self, max_bytes: int = 3 * 2**30) -> None:
        self.max_bytes = max_bytes
        self.store: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

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
        if cut == POOLED:
            return self.model.get_classifier()(h)
        f = self.chain.run(h, cut) if cut > 0 else self.model.forward_features(h)
        return self.model.forward_head(f)


def choose_cut(chain: FeatureChain | None, scales: list[float], enabled: bool) -> int:
    """The deepest cut below which every block is frozen this epoch."""
    n_frozen = next((i for i, s in enumerate(scales) if s > 0), len(scales))
    if not enabled or n_frozen == 0:
        return 0
    if n_frozen >= len(scales) - 1:
        return POOLED
    return chain.frozen_units(n_frozen) if chain is not None else 0


class Inputs:
    """Training/eval inputs from a cut: raw uint8 images augmented per batch, or cached prefix
    outputs (one of `views` fixed views per image per epoch)."""

    def __init__(self, table: ImageTable, fwd: Forward, cut: int, settings: TrainSettings, rt: Runtime,
                 mean: torch.Tensor, std: torch.Tensor, seed: int) -> None:
        self.table, self.fwd, self.cut, self.s, self.rt = table, fwd, cut, settings, rt
        self.mean, self.std, self.seed = mean, std, seed
        self.cached: torch.Tensor | None = None
        if cut != 0:
            # the precision is part of the key: features computed in fp32 and in bf16 differ (by ~1e-3)
            key = (*rt.model_key, table.fingerprint(), cut, settings.views, settings.augment, str(rt.amp_dtype),
                   settings.amp)
            compute = lambda: self._compute_all()  # noqa: E731
            self.cached = rt.cache.get(key, compute) if rt.cache is not None else compute()
        # precision of everything after the cut (training steps, validation, prediction)
        self.dtype = rt.amp_dtype

    def _images(self, idx: torch.Tensor, view: int | None, gen: torch.Generator) -> torch.Tensor:
        """Normalised images: view 0 plain, view v > 0 a fixed augmentation, None = the training policy
        (plain with probability 1/views, else freshly augmented)."""
        x = self.table.images[idx].to(self.rt.device, non_blocking=True).float() / 255.0
        if view is None:
            # views 1 is always plain: draw nothing, so the generator (the next epoch's order) stays
            # where the cached path leaves it and `cache: true` trains exactly like `cache: false`
            augmented = torch.rand(len(idx), generator=gen) >= 1.0 / self.s.views if self.s.views > 1 else None
            if augmented is not None and augmented.any():
                sel = augmented.to(x.device)
                x[sel] = self.s.augment(x[sel], gen)
        elif view != 0:
            x = self.s.augment(x, gen)
        x = (x - self.mean) / self.std
        if self.s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _compute_all(self) -> torch.Tensor:
        """(views, N, ...) prefix outputs with the network in eval mode. Each batch of view v draws its
        augmentation from its own seed, so the result does not depend on how batches run in lanes."""
        model = self.fwd.model
        was = model.training
        model.eval()
        n = len(self.table)
        bs = inference_batch_size(self.rt.device, self.table.image_size)
        keep = torch.bfloat16 if self.rt.amp_dtype else torch.float32

        def prefix(view_start: tuple[int, int]) -> torch.Tensor:
            v, start = view_start
            gen = torch.Generator().manual_seed(1_000_003 * (v + 1) + start)
            with torch.no_grad(), autocast(self.rt.device, self.rt.amp_dtype):  # both are per thread
                x = self._images(torch.arange(start, min(start + bs, n)), v, gen)
                return self.fwd.prefix(x, self.cut).to("cpu", keep)

        lanes = cpu_lanes(self.rt.device)
        out = [torch.cat(in_lanes(prefix, [(v, s) for s in range(0, n, bs)], lanes)) for v in range(self.s.views)]
        model.train(was)
        return torch.stack(out)

    def batch(self, idx: np.ndarray, train: bool, gen: torch.Generator) -> torch.Tensor:
        t = torch.as_tensor(idx)
        if self.cached is None:
            return self._images(t, None if train else 0, gen)
        if train and self.s.views > 1:
            views = torch.randint(0, self.s.views, (len(t),), generator=gen)
        else:
            views = torch.zeros(len(t), dtype=torch.long)
        h = self.cached[views, t].to(self.rt.device, non_blocking=True)
        return h.float() if self.dtype is None else h

    def autocast(self):
        """Autocast for the part of the network after the cut."""
        return autocast(self.rt.device, self.dtype)


def slow_bf16_depthwise(conv: nn.Module) -> bool:
    """A depthwise convolution that oneDNN runs slower in bf16 than in fp32 on a CPU: strided or
    wider than 3x3. EfficientNet-Lite0 at 224 px, batch 32, 2 cores, forward + backward
    (benchmarks/precision.py): the 5x5 stride-2 one in block 2 takes 142 ms in bf16 and
    22 ms in fp32, block 5's 97 vs 6 ms, the 5x5 stride-1 ones 2-3x longer in bf16; the 3x3
    stride-1 ones and all pointwise convolutions are about 2x faster in bf16."""
    return (isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels
            and (max(conv.stride) > 1 or max(conv.kernel_size) > 3))


# Above this input side the bf16 -> fp32 -> bf16 casts around the convolution cost more than the
# fp32 convolution saves (Lite0 at 224 px: block 1's 112 x 112 depthwise stays in bf16).
FP32_DEPTHWISE_MAX_SIDE = 64


def _fp32_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] > FP32_DEPTHWISE_MAX_SIDE or not torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x)
    with torch.autocast(x.device.type, enabled=False):
        return type(self).forward(self, x.float())


def depthwise_in_fp32(model: nn.Module) -> int:
    """Run the depthwise convolutions that are slow in bf16 (see `slow_bf16_depthwise`) in fp32
    while the rest of the network autocasts to bf16: on this machine a Lite0 training step drops
    from about 1.2 to 0.8 s. Only the forward of those modules changes (an instance attribute, so
    copies and state dicts are unaffected). Returns how many convolutions were switched."""
    n = 0
    for m in model.modules():
        if slow_bf16_depthwise(m) and "forward" not in vars(m):
            m.forward = types.MethodType(_fp32_forward, m)
            n += 1
    return n


def inference_batch_size(device: torch.device, image_size: int) -> int:
    """Images per no-grad forward (filling the cache, validation, prediction); results do not depend on it.

    On a CPU small batches are faster: EfficientNet-Lite0 at 224 px, bf16, 2 cores, ran at about
    250 img/s in batches of 8-16 and 115 img/s in batches of 64 (benchmarks/precision.py), since a
    small batch's activations stay in cache. About 16 images of 224 x 224, scaled by pixel count.
    A GPU wants large batches. Results agree up to floating-point rounding.
    """
    if device.type != "cpu":
        return 256
    return int(min(256, max(8, 16 * (224 / image_size) ** 2)))


def cpu_lanes(device: torch.device) -> int:
    """How many batches of a no-grad pass run side by side, each on its share of the threads. On a
    CPU this beats splitting each small batch's operations over all threads (EfficientNet-Lite0 at
    224 px on 2 cores: see benchmarks/precision.py); at most 4 lanes, so that a many-core machine
    still splits each batch. A GPU runs one batch at a time."""
    return min(4, max(1, torch.get_num_threads())) if device.type == "cpu" else 1


_LANES: dict[int, ThreadPoolExecutor] = {}  # one pool per lane count, made on first use


def in_lanes(fn, items: list, lanes: int) -> list:
    """[fn(x) for x in items] in order, with up to `lanes` calls at once (torch releases the GIL)."""
    if lanes <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    pool = _LANES.get(lanes) or _LANES.setdefault(lanes, ThreadPoolExecutor(lanes, thread_name_prefix="medtune-lane"))
    threads = torch.get_num_threads()
    share = max(1, threads // lanes)

    def on_share(x):
        if torch.get_num_threads() != share:  # OpenMP's thread count is per thread
            torch.set_num_threads(share)
        return fn(x)

    try:
        return list(pool.map(on_share, items))
    finally:
        torch.set_num_threads(threads)  # the count seen by the caller's thread stays as it was
        release_free_memory()


def release_free_memory() -> None:
    """Hand memory that glibc keeps in the lane threads' own arenas back to the system. Without it
    the BUSI grid benchmark peaked at 4.29 GB resident, with it at 3.57 GB: the freed activations
    of no-grad passes stayed in those arenas while the main thread trained."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`; None = full precision."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    model: nn.Module
    history: list[dict]
    best_epoch: int
    kept_prefix_blocks: int  # leading blocks never trained: bit-identical to pretrained unless update_all
    seconds: float
    forward: Forward = None  # type: ignore[assignment]
    cache_hits: int = 0
    bn_statistics: str = "update"  # as applied: `keep` for strategies that always keep (LP-FT)


def build_optimizer(model: nn.Module, strategy: Strategy, settings: TrainSettings):
    """One AdamW group per tensor, built once, so optimizer state survives unfreezing and per-tensor
    strategies (Auto-RGN, BitFit) can act on single tensors."""
    chain = blocks(model)
    head_index = len(chain) - 1
    by_name = dict(model.named_parameters())
    groups = []
    for bi, block in enumerate(chain):
        for name in block.param_names:
            p = by_name[name]
            decay = settings.weight_decay if (p.ndim > 1 and strategy.uses_weight_decay()) else 0.0
            groups.append({"params": [p], "name": name, "block": bi, "weight_decay": decay,
                           "is_head": bi == head_index, "norm": is_norm(name, p, model)})
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=settings.lr, fused=fused or None), chain


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = counts.sum() / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def epoch_order(labels: np.ndarray, balanced: bool, gen: torch.Generator) -> np.ndarray:
    """A permutation of the training positions, or (balanced sampler) a draw with each class equally likely."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=gen).numpy()
    w = 1.0 / np.bincount(labels)[labels]
    return torch.multinomial(torch.tensor(w / w.sum()), n, replacement=True, generator=gen).numpy()


def fit(model: nn.Module, table: ImageTable, train_idx: np.ndarray, val_idx: np.ndarray, strategy: Strategy,
        settings: TrainSettings, rt: Runtime, seed: int = 0) -> FitResult:
    """Train `model` on table[train_idx] with early stopping on table[val_idx]; returns the best epoch's model."""
    t0 = time.perf_counter()
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(rt.device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if settings.amp == "auto" and rt.device.type == "cpu" and rt.amp_dtype == torch.bfloat16:
        depthwise_in_fp32(model)
    mean, std = norm_tensors(model, rt.device)
    bn = "keep" if strategy.keeps_bn_statistics() else settings.bn_statistics  # LP-FT always keeps
    # a frozen block whose BatchNorm follows the batch (update_all) is no pure function of the image: no cache
    cache = settings.cache and bn != "update_all"
    chain = feature_chain(model, image_size=min(64, table.image_size)) if cache else None
    fwd = Forward(model, chain)
    optimizer, block_list = build_optimizer(model, strategy, settings)
    n_blocks = len(block_list)
    start_state = {n: p.detach().clone() for n, p in model.named_parameters()
                   if not any(n in b.param_names for b in block_list[-1:])}
    y_all = torch.as_tensor(table.labels, device=rt.device)
    weight = class_weights(table.labels[train_idx], table.num_classes).to(rt.device) if settings.class_weighted else None
    total = strategy.total_epochs(settings.epochs)
    phases = strategy.phase_starts(settings.epochs) + [total]
    steps_per_epoch = max(1, math.ceil(len(train_idx) / settings.batch_size))
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None

    history: list[dict] = []
    first_loss: float | None = None
    best = (math.inf, -1, None)
    bad_epochs = 0
    kept = n_blocks
    inputs: Inputs | None = None
    for epoch in range(total):
        scales = strategy.lr_scales(epoch, n_blocks)
        if len(scales) != n_blocks:
            raise TrainingError(f"strategy {strategy.label()} returned {len(scales)} scales for {n_blocks} blocks")
        kept = min(kept, next((i for i, s in enumerate(scales) if s > 0), n_blocks))
        cut = choose_cut(chain, scales, cache)
        if inputs is None or inputs.cut != cut:
            inputs = Inputs(table, fwd, cut, settings, rt, mean, std, seed)
        for g in optimizer.param_groups:
            g["params"][0].requires_grad_(scales[g["block"]] > 0)
        # A linear probe (only the head trains) is a convex problem on fixed features and takes a larger
        # learning rate than fine-tuning a network: the probe phases get `probe_lr_scale` times the rate.
        head_boost = settings.probe_lr_scale if cut == POOLED or all(x == 0 for x in scales[:-1]) else 1.0
        set_train_mode(model, bn)
        phase = max(i for i, s in enumerate(phases[:-1]) if s <= epoch)
        phase_steps = (phases[phase + 1] - phases[phase]) * steps_per_epoch
        warmup = int(settings.warmup_epochs * steps_per_epoch)

        order = train_idx[epoch_order(table.labels[train_idx], settings.balanced_sampler, gen)]
        running, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            if len(idx) < 2 and step > 0:  # a trailing batch of one breaks BatchNorm; skip it
                continue
            x = inputs.batch(idx, train=True, gen=gen)
            y = y_all[torch.as_tensor(idx, device=rt.device)]
            with inputs.autocast():
                logits = fwd.rest(x, cut)
                loss = F.cross_entropy(logits.float(), y, weight=weight)
                penalty = strategy.penalty(model, start_state)
                total_loss = loss + penalty
            value = float(total_loss.detach())
            first_loss = value if first_loss is None else first_loss
            # NaN, inf, or a finite loss 100x above where training started: the run diverged.
            if not math.isfinite(value) or value > 100 * max(first_loss, 1.0):
                raise TrainingError(f"the loss diverged to {value:.4g} at epoch {epoch}, step {step} (it started at "
                                    f"{first_loss:.4g}; lr {settings.lr}). Lower train.lr or keep train.grad_clip on.")
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(total_loss) if scaler else total_loss).backward()
            lr_t = settings.lr * cosine_lr((epoch - phases[phase]) * steps_per_epoch + step, phase_steps, warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr_t * scales[g["block"]] * head_boost
            if scaler:  # strategies and clipping see the true gradients, not fp16-scaled ones
                scaler.unscale_(optimizer)
            strategy.after_backward(optimizer.param_groups, step)
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], settings.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            running += loss.item() * len(idx)
            seen += len(idx)

        # A step can overflow the weights without raising (CUDA's fused AdamW takes any lr): the next
        # loss would be NaN, but after the last step there is no next loss to look at.
        trained = [g["params"][0].detach() for g in optimizer.param_groups if scales[g["block"]] > 0]
        if trained and not bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()):  # one sync
            raise TrainingError(f"the weights became inf/NaN at epoch {epoch} (lr {settings.lr:g}): the run diverged. "
                                "Lower train.lr or keep train.grad_clip on.")
        val_loss, val_bacc = evaluate(fwd, inputs, table, val_idx, settings, rt, weight)
        history.append({"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                        "val_balanced_accuracy": val_bacc, "cut": cut,
                        "precision": str(inputs.dtype).removeprefix("torch.") if inputs.dtype else "float32",
                        "trainable_blocks": sum(1 for s in scales if s > 0)})
        if len(val_idx) == 0:  # no validation split (tiny data): no early stopping, the last epoch is kept
            continue
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
            bad_epochs = 0
        else:
            bad_epochs += 1
        # Early stopping only inside the last phase: an LP phase must not end the run.
        if epoch >= phases[-2] and bad_epochs >= settings.patience:
            break
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return FitResult(model, history, best[1], kept, time.perf_counter() - t0, fwd,
                     rt.cache.hits if rt.cache else 0, bn)


def set_train_mode(model: nn.Module, bn_statistics: str) -> None:
    """Train mode, with BatchNorm as `bn_statistics` asks:
    update: BatchNorm of trained blocks normalises with batch statistics; frozen blocks keep theirs,
      so a frozen block really is frozen.
    keep: every BatchNorm normalises with its running statistics (eval mode), so the model validated
      and tested is the one trained. Measured (5 folds, balanced accuracy): on the demo grid (160
      training images a fold, lr 3e-4) full_ft 0.53 +- 0.09 with update (training loss still 0.46
      after 8 epochs) and 0.96 +- 0.06 with keep, partial_ft 0.88 and 0.80; on BUSI at lr 1e-3 for 3
      epochs the other way round: full_ft 0.80 +- 0.01 with update, 0.64 +- 0.20 with keep, partial_ft
      0.83 and 0.76. Without batch statistics a high learning rate is not tamed: keep needs a lower one.
    update_all: every BatchNorm uses batch statistics, frozen blocks too."""
    model.train()
    if bn_statistics == "update_all":
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if bn_statistics == "keep" or (params and not any(p.requires_grad for p in params)):
                m.eval()


@torch.no_grad()
def evaluate(fwd: Forward, inputs: Inputs, table: ImageTable, idx: np.ndarray, settings: TrainSettings, rt: Runtime,
             weight: torch.Tensor | None) -> tuple[float, float]:
    """Validation loss and balanced accuracy (view 0, eval mode)."""
    if len(idx) == 0:
        return math.nan, math.nan
    probs = predict_proba(fwd, inputs, idx, settings, rt)
    y = table.labels[idx]
    p = torch.as_tensor(probs)
    loss = F.nll_loss(torch.log(p.clamp_min(1e-12)), torch.as_tensor(y), weight=None if weight is None else weight.cpu())
    pred = probs.argmax(1)
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return float(loss), float(np.mean(recalls))


@torch.no_grad()
def predict_proba(fwd: Forward, inputs: Inputs, idx: np.ndarray, settings: TrainSettings, rt: Runtime,
                  features: bool = False) -> np.ndarray:
    """Class probabilities (or penultimate features) for table[idx], view 0, eval mode."""
    if len(idx) == 0:  # keep the shape: run one image, return none
        return predict_proba(fwd, inputs, np.arange(1), settings, rt, features)[:0]
    was = fwd.model.training
    fwd.model.eval()
    gen = torch.Generator().manual_seed(0)  # view 0 draws nothing from it
    bs = inference_batch_size(rt.device, inputs.table.image_size)

    def one(part: np.ndarray) -> torch.Tensor:
        x = inputs.batch(part, train=False, gen=gen)
        with torch.no_grad(), inputs.autocast():  # both are per thread
            if features:
                return fwd.features(x, inputs.cut).float().cpu()
            return torch.softmax(fwd.rest(x, inputs.cut).float(), 1).cpu()

    out = in_lanes(one, [idx[s:s + bs] for s in range(0, len(idx), bs)], cpu_lanes(rt.device))
    fwd.model.train(was)
    return torch.cat(out).numpy()


def final_inputs(result: FitResult, table: ImageTable, settings: TrainSettings, rt: Runtime) -> Inputs:
    """Inputs for prediction with the trained model: only the never-trained prefix may be cached (and
    none where BatchNorm statistics of frozen blocks moved: `update_all`)."""
    fwd = result.forward
    n_blocks = len(blocks(fwd.model))
    scales = [0.0] * result.kept_prefix_blocks + [1.0] * (n_blocks - result.kept_prefix_blocks)
    cut = choose_cut(fwd.chain, scales, settings.cache and result.bn_statistics != "update_all")
    mean, std = norm_tensors(fwd.model, rt.device)
    return Inputs(table, fwd, cut, settings, rt, mean, std, seed=0)


def norm_tensors(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights' normalisation mean and std as (1, 3, 1, 1) tensors on `device`."""
    pre = preprocessing(model)
    return (torch.tensor(pre["mean"], device=device).view(1, 3, 1, 1),
            torch.tensor(pre["std"], device=device).view(1, 3, 1, 1))
