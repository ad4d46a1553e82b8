"""Device, mixed-precision and CPU threading rules: where a fit runs and in which precision.

Each rule is fixed and measured (benchmarks/precision.py, benchmarks/compile.py), never timed at
run time, and what applied is recorded per epoch in the cell (`history[].precision`,
`history[].compiled`). Nothing here changes what is computed beyond floating-point rounding.
"""

from __future__ import annotations

import ctypes
import os
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from medtune.errors import TrainingError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} was asked for, but CUDA is not available here; "
                            "use `device: auto` or `cpu`.")
    return torch.device(device)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read()
    except OSError:
        return ""


# oneDNN's ISA names below AVX512_CORE_BF16 (its `ONEDNN_MAX_CPU_ISA` values): capped there, oneDNN
# has no bf16 kernels and bf16 autocast is slower than fp32.
ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX, unless oneDNN is capped below it (`ONEDNN_MAX_CPU_ISA=AVX512_CORE`): where
    bf16 autocast on the CPU is faster than fp32. The cap is also how a store computed in fp32 on
    another CPU resumes on a bf16 one, as `amp: auto` resolves to fp32 there too (docs/config.md)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in ISAS_WITHOUT_BF16:
        return False
    flags = cpu_flags()
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


def prepare_model(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, amp: str,
                  channels_last: bool) -> None:
    """Move `model` to the device and layout it trains in; on a bf16 CPU under `amp: auto` the
    depthwise convolutions that are slow in bf16 run in fp32 (`depthwise_in_fp32`)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if amp == "auto" and device.type == "cpu" and amp_dtype == torch.bfloat16:
        depthwise_in_fp32(model)


# torch.compile (inductor) of the trained forward, per device type, measured with the compile time
# included (benchmarks/compile.py -> benchmarks/results/compile.json). On this 2-core bf16 CPU a
# compiled full_ft step at 224 px is slower than eager even with a warm on-disk cache
# (EfficientNet-Lite0 0.84x, ResNet-50 0.89x) and the first cell pays 2-3 minutes of compiling,
# so it never pays. CUDA is unmeasured here (scripts/gpu_check.sh step 4 measures it): off until a
# measurement says it wins.
COMPILE_PAYS = {"cpu": False, "cuda": False}


def compile_pays(device: torch.device, mode: str) -> bool:
    """`train.compile` is auto | on | off; auto compiles where COMPILE_PAYS says it was measured to win."""
    if mode == "auto":
        return COMPILE_PAYS.get(device.type, False)
    return mode == "on"


class Stepper:
    """Backward and optimiser step under the precision rule, so the training loop holds no precision
    code: with fp16 autocast (CUDA only) the loss is scaled for backward and the gradients are
    unscaled before strategies and clipping see them (GradScaler); bf16 and fp32 step plainly."""

    def __init__(self, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None) -> None:
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def true_gradients(self) -> None:
        """After this, every .grad is the real gradient (a no-op unless fp16)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)

    def step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
