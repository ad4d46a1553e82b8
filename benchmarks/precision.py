"""Where bf16 and small batches pay on this CPU: the figures behind two of medtune's defaults.

1. Inference batch size (`train.inference_batch_size`): EfficientNet-Lite0 `forward_features`
   at 224 px, bf16 autocast, channels_last, in batches of 8 to 64 (no grad: filling the
   frozen-prefix cache, validation, prediction).
2. Each depthwise convolution of EfficientNet-Lite0 at 224 px alone, forward + backward, bf16
   against fp32 (batch 32, channels_last): the strided and 5x5 ones are several times slower in
   bf16, which is why `amp: auto` keeps them in fp32 on a CPU (`train.depthwise_in_fp32`).
3. One training step (batch 32, channels_last) of the part of the network a strategy trains (the
   top blocks on cached features, or the whole network) for EfficientNet-Lite0 (depthwise
   convolutions) and ResNet-50 (dense convolutions): fp32, bf16 everywhere (`amp: on`), and
   medtune's `amp: auto` (bf16 with those depthwise convolutions in fp32).

4. No-grad passes in lanes (`train.in_lanes`): 320 images of 224 px through the whole
   EfficientNet-Lite0 as medtune fills its cache under `amp: auto` (batches of 16), with the
   threads splitting each batch's operations, against batches running side by side, one per
   lane, each on its share of the threads (medtune's default on a CPU).

    python benchmarks/precision.py              # about 4 minutes on 2 cores
    python benchmarks/precision.py --part lanes # part 4 alone, merged into the existing JSON
Results go to benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.backbones import create_backbone
from medtune.training.precision import (FP32_DEPTHWISE_MAX_SIDE, cpu_lanes, depthwise_in_fp32, in_lanes,
                                        slow_bf16_depthwise)

ROOT = Path(__file__).resolve().parent
CL = torch.channels_last


def images_per_second(fn, x: torch.Tensor, total: int = 256) -> float:
    reps = max(2, total // len(x))
    with torch.no_grad():
        fn(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x)
    return reps * len(x) / (time.perf_counter() - t0)


def inference_batches(model: nn.Module, size: int) -> dict:
    model = model.eval().to(memory_format=CL)
    out = {}
    for bs in (8, 16, 32, 64):
        x = torch.randn(bs, 3, size, size).contiguous(memory_format=CL)
        with torch.autocast("cpu", torch.bfloat16):
            out[bs] = round(images_per_second(model.forward_features, x), 1)
        print(f"  inference batch {bs}: {out[bs]} img/s", flush=True)
    return out


def inference_lanes(size: int = 224, n: int = 320, batch: int = 16) -> dict:
    model = create_backbone("efficientnet_lite0", num_classes=3).eval().to(memory_format=CL)
    depthwise_in_fp32(model)
    batches = list(torch.randn(n, 3, size, size).contiguous(memory_format=CL).split(batch))

    def one(x):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return model.forward_head(model.forward_features(x), pre_logits=True)

    lanes = cpu_lanes(torch.device("cpu"))
    out = {"threads": torch.get_num_threads(), "lanes": lanes}
    for name, run in (("intra_op", lambda: [one(x) for x in batches]),
                      ("lanes", lambda: in_lanes(one, batches, lanes))):
        run()  # warm-up
        t0 = time.perf_counter()
        run()
        out[f"{name}_img_per_s"] = round(n / (time.perf_counter() - t0), 1)
    out["speedup"] = round(out["lanes_img_per_s"] / out["intra_op_img_per_s"], 2)
    print(f"  {out}", flush=True)
    return out


def step_ms(part: nn.Module, x: torch.Tensor, amp: bool, reps: int = 3, fp32_depthwise: bool = False) -> float:
    part = copy.deepcopy(part).train().to(memory_format=CL)
    if fp32_depthwise:
        depthwise_in_fp32(part)
    x = x.contiguous(memory_format=CL)
    y = torch.randint(0, 3, (len(x),))
    opt = torch.optim.AdamW(part.parameters(), 1e-3)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(part(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps * 1000


def depthwise_layers() -> dict:
    """fwd + bwd ms of each depthwise convolution of Lite0 at 224 px, alone, bf16 vs fp32."""
    lite = create_backbone("efficientnet_lite0", num_classes=3)
    inputs = {}
    def remember(name):
        def hook(module, args, output):
            inputs[name] = args[0].shape
        return hook

    hooks = [m.register_forward_hook(remember(n))
             for n, m in lite.named_modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    with torch.no_grad():
        lite(torch.randn(32, 3, 224, 224))
    for h in hooks:
        h.remove()
    out = {}
    for name, shape in inputs.items():
        conv = lite.get_submodule(name)
        row = {}
        for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            c = copy.deepcopy(conv).to(dtype).to(memory_format=CL)
            x = torch.randn(shape, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
            c(x).sum().backward()
            t0 = time.perf_counter()
            for _ in range(3):
                c(x).sum().backward()
            row[label] = round((time.perf_counter() - t0) / 3 * 1000, 1)
        row.update(kernel=conv.kernel_size[0], stride=conv.stride[0], side=shape[-1],
                   kept_in_fp32_by_auto=slow_bf16_depthwise(conv) and shape[-1] <= FP32_DEPTHWISE_MAX_SIDE)
        out[name] = row
        print(f"  {name}: {row}", flush=True)
    return out


def training_parts() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    lite = create_backbone("efficientnet_lite0", num_classes=3)
    rn = timm.create_model("resnet50", pretrained=False, num_classes=3)

    def top(m, names):
        return nn.Sequential(*[m.get_submodule(n) for n in names], m.global_pool, m.get_classifier())

    tail = ["conv_head", "bn2"]
    return [
        ("lite0 blocks.5-6 @224 (partial_ft blocks=2)", top(lite, ["blocks.5", "blocks.6", *tail]), (112, 14)),
        ("lite0 blocks.5-6 @128", top(lite, ["blocks.5", "blocks.6", *tail]), (112, 8)),
        ("lite0 whole network @224 (full_ft)", lite, (3, 224)),
        ("lite0 whole network @128", lite, (3, 128)),
        ("resnet50 layer4 @224", top(rn, ["layer4"]), (1024, 14)),
        ("resnet50 layer3-4 @224", top(rn, ["layer3", "layer4"]), (512, 28)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "lanes"], default="all")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    out = ROOT / "results" / "precision.json"
    if args.part == "lanes":
        result = json.loads(out.read_text()) if out.is_file() else {}
        print("EfficientNet-Lite0 @224 to pooled features, amp auto, batch 16: intra-op threads vs lanes", flush=True)
        result["inference_lanes"] = {**inference_lanes(), "measured_at": time.strftime("%Y-%m-%d %H:%M"),
                                     "command": "python benchmarks/precision.py --part lanes"}
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return
    result = {"command": "python benchmarks/precision.py", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    print("EfficientNet-Lite0 forward_features @224, bf16, img/s by batch size", flush=True)
    result["inference_img_per_s_by_batch"] = inference_batches(
        create_backbone("efficientnet_lite0", num_classes=3), 224)
    print("EfficientNet-Lite0 depthwise convolutions @224, fwd + bwd ms, batch 32", flush=True)
    result["depthwise_fwd_bwd_ms_batch32"] = depthwise_layers()
    result["train_step_ms_batch32"] = {}
    for name, part, (ch, hw) in training_parts():
        x = torch.randn(32, ch, hw, hw)
        row = {"fp32": round(step_ms(part, x, False)), "bf16": round(step_ms(part, x, True)),
               "auto": round(step_ms(part, x, True, fp32_depthwise=True))}
        row["auto_speedup_over_fp32"] = round(row["fp32"] / row["auto"], 2)
        result["train_step_ms_batch32"][name] = row
        print(f"  {name}: {row}", flush=True)
    print("EfficientNet-Lite0 @224 to pooled features, amp auto, batch 16: intra-op threads vs lanes", flush=True)
    result["inference_lanes"] = inference_lanes()
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
