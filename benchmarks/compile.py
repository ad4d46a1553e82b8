"""Does torch.compile pay for a training cell? Eager vs inductor, compile time included.

    python benchmarks/compile.py [--models efficientnet_lite0 resnet50] [--size 224] [--batch 32] [--steps 8]
                                 [--device cpu|cuda]

For each model, one full_ft training step (forward, cross-entropy, backward, AdamW step) on a batch
of random images, set up as medtune trains it (precision.prepare_model: bf16 autocast where the
CPU has bf16, channels_last, Lite0's slow depthwise convolutions in fp32), measured three ways, each
in a fresh process:

  eager          the step as medtune runs it today;
  compiled_cold  the forward compiled with torch.compile (inductor), empty on-disk cache: the first
                 step's seconds are the compile time a new machine pays;
  compiled_warm  the same with the cache the cold run left (TORCHINDUCTOR_CACHE_DIR), as a second
                 cell of the same backbone and shape would find it.

It reports the median step seconds after the first, the first step's seconds, and the break-even:
how many steps a cell must train before compiling (warm cache) has paid for itself; and the
achieved FLOP/s as a fraction of this machine's bf16 matmul peak (measured just before the model),
before and after (benchmarks/throughput.py counts the same way). The fraction is left out (null,
with the reason) for models with grouped or depthwise convolutions: torch's FlopCounterMode counts
their weight gradient as a dense convolution (pytorch/pytorch#183405), so EfficientNet-Lite0's
FLOP count is several times too high. Writes (merges the measured models into)
benchmarks/results/compile.json, which the compile rule (precision.compile_pays) cites.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def one(model_name: str, size: int, batch: int, steps: int, compiled: bool, device_name: str) -> dict:
    """One measurement, in this process (the parent sets TORCHINDUCTOR_CACHE_DIR)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medtune.training.precision import autocast, autocast_dtype, prepare_model

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    device = torch.device(device_name)
    dtype = autocast_dtype(device, "auto")
    model = timm.create_model(model_name, pretrained=False, num_classes=3)
    prepare_model(model, device, dtype, "auto", channels_last=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,), device=device)

    def forward(t):
        return model.forward_head(model.forward_features(t))

    run = torch.compile(forward) if compiled else forward

    def step():
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    out = {"first_step_s": times[0], "step_s": sorted(times[1:])[len(times[1:]) // 2], "steps_timed": steps,
           "precision": str(dtype).removeprefix("torch.") if dtype else "float32"}
    if not compiled:
        grouped = any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
        with FlopCounterMode(display=False) as counter:
            step()
        out["gflop_per_image"] = None if grouped else counter.get_total_flops() / batch / 1e9
        if grouped:
            out["gflop_note"] = "grouped/depthwise convolutions: FlopCounterMode overcounts their backward"
    return out


def peak_gflops(device: str) -> float:
    """bf16 2048x2048 matmul rate on `device`: the ceiling the fraction is taken of."""
    import torch

    if device == "cpu":
        from throughput import matmul_peak
        return matmul_peak(torch.bfloat16)
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 2 * 4096**3 * 20 / (time.perf_counter() - t) / 1e9


def child(model: str, mode: str, args, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(ROOT.parent / "src")}
    cmd = [sys.executable, __file__, "--one", model, mode, "--size", str(args.size), "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (results go under models[...][DEVICE] keys)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.size, args.batch, args.steps, args.one[1] != "eager", args.device)))
        return
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(os.cpu_count() or 1)
    out = ROOT / "results" / "compile.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"command": "python benchmarks/compile.py [--models ...]", "size": args.size, "batch": args.batch,
                   "threads": torch.get_num_threads(), "torch": torch.__version__})
    result.pop("bf16_matmul_peak_gflops", None)
    result.pop("measured_at", None)
    for model in args.models:
        peak = peak_gflops(args.device)
        cache = tempfile.mkdtemp(prefix="medtune-inductor-")
        try:
            rows = {mode: child(model, mode, args, cache) for mode in ("eager", "compiled_cold", "compiled_warm")}
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        e, w, c = rows["eager"], rows["compiled_warm"], rows["compiled_cold"]
        if "error" not in e and "error" not in w and "error" not in c:
            saving = e["step_s"] - w["step_s"]
            rows["speedup"] = e["step_s"] / w["step_s"]
            rows["compile_overhead_warm_s"] = w["first_step_s"] - e["first_step_s"]
            rows["compile_overhead_cold_s"] = c["first_step_s"] - e["first_step_s"]
            rows["break_even_steps_warm"] = rows["compile_overhead_warm_s"] / saving if saving > 0 else None
            if e["gflop_per_image"] is not None:
                gflop = e["gflop_per_image"] * args.batch
                rows["fraction_of_bf16_peak"] = {"eager": gflop / e["step_s"] / peak,
                                                 "compiled": gflop / w["step_s"] / peak}
            else:
                rows["fraction_of_bf16_peak"] = None
        rows.update({"bf16_matmul_peak_gflops": peak, "measured_at": time.strftime("%Y-%m-%d %H:%M")})
        if args.device == "cuda":
            rows["gpu"] = torch.cuda.get_device_name(0)
        result.setdefault(args.device, {})[model] = rows
        print(model, json.dumps(rows, indent=1), flush=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
