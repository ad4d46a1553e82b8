"""Training throughput of full fine-tuning as a fraction of this machine's matmul peak.

    python benchmarks/throughput.py [--model resnet50] [--size 224] [--batch 32]

Measures (1) the bf16 and fp32 matmul peak of this CPU (GFLOP/s, large square matmuls, all
threads), (2) full_ft training steps of the model (random init; the speed does not depend on the
weights) with medtune's settings (bf16 autocast + channels_last) and in plain fp32, and reports
img/s and achieved FLOP/s as a fraction of the peak. FLOPs per image are counted with
torch.utils.flop_counter for one forward+backward pass. Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def train_speed(model_name: str, size: int, batch: int, amp: bool, channels_last: bool,
                steps: int = 5) -> tuple[float, float]:
    model = timm.create_model(model_name, pretrained=False, num_classes=3)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,))
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_image = counter.get_total_flops() / batch
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    best = sorted(times)[len(times) // 2]  # median step
    return batch / best, flops_per_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    rows = {}
    for label, amp, cl in (("bf16+channels_last", True, True), ("fp32", False, False)):
        ips, fpi = train_speed(args.model, args.size, args.batch, amp, cl)
        achieved = ips * fpi / 1e9
        rows[label] = {"img_per_s": ips, "gflop_per_image": fpi / 1e9, "achieved_gflops": achieved,
                       "fraction_of_bf16_peak": achieved / peak["bf16"],
                       "fraction_of_fp32_peak": achieved / peak["fp32"]}
    out = {"command": " ".join(["python", *sys.argv]), "model": args.model, "size": args.size, "batch": args.batch,
           "threads": torch.get_num_threads(), "matmul_peak_gflops": peak, "full_ft": rows, "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    (ROOT / "results" / "throughput.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
