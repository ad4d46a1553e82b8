"""`make demo`'s job with and without medtune's speed features, as a user runs it.

    python benchmarks/demo_speed.py

Runs `medtune run configs/demo.yaml` twice in fresh processes, each into its own temporary store:
(a) as shipped (frozen-prefix feature cache, bf16 autocast where it pays, channels_last), and
(b) the baseline with those three switched off (`--set train.cache=false --set train.amp=off
--set train.channels_last=false`): every epoch recomputes the whole network in fp32, the way the
trainer ran before the speed work. Both decode the images once (that is not a switch). Each run
includes what `make demo` does after the grid (the best model's retrain and its Grad-CAM gallery).
Prints and writes wall seconds, seconds per strategy and the table of both runs to
benchmarks/results/demo_speed.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medtune.evaluation.store import Store

ROOT = Path(__file__).resolve().parent
BASELINE = ["--set", "train.cache=false", "--set", "train.amp=off", "--set", "train.channels_last=false"]
METRICS = ["balanced_accuracy", "sensitivity", "specificity", "auc"]


def run(extra: list[str]) -> dict:
    store = str(Path(tempfile.mkdtemp()) / "demo.sqlite")
    cmd = [sys.executable, "-m", "medtune", "run", str(ROOT.parent / "configs" / "demo.yaml"),
           "--set", f"store={store}", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with Store(store) as s:
        m = s.metrics()
    per = {}
    for strategy, rows in m.groupby("strategy"):
        per[strategy] = {"seconds": round(float(rows["seconds"].sum()), 1),
                         **{k: f"{rows[k].mean():.3f}±{rows[k].std(ddof=1):.3f}" for k in METRICS},
                         "balanced_accuracy_folds": [round(float(v), 3)
                                                     for v in rows.sort_values("fold")["balanced_accuracy"]]}
    return {"command": " ".join(["medtune", "run", "configs/demo.yaml", *extra]), "wall_seconds": round(wall, 1),
            "cell_seconds": round(float(m["seconds"].sum()), 1), "strategies": per}


def main() -> None:
    print("demo as shipped ...", flush=True)
    fast = run([])
    print(json.dumps(fast, indent=1), flush=True)
    print("demo baseline (no cache, fp32, contiguous) ...", flush=True)
    base = run(BASELINE)
    print(json.dumps(base, indent=1), flush=True)
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "shipped": fast, "baseline": base,
              "wall_ratio": round(base["wall_seconds"] / fast["wall_seconds"], 2),
              "cell_ratio": round(base["cell_seconds"] / fast["cell_seconds"], 2)}
    # "the same table": per strategy, the two mean balanced accuracies differ by at most one fold-sd
    # (the criterion of grid_speed.py), and the strategies rank in the same order
    same = {}
    for strategy in fast["strategies"]:
        a, b = (np.array(r["strategies"][strategy]["balanced_accuracy_folds"]) for r in (fast, base))
        same[strategy] = {"shipped": round(float(a.mean()), 3), "baseline": round(float(b.mean()), 3),
                          "within_one_fold_sd": bool(abs(a.mean() - b.mean()) <= max(a.std(ddof=1), b.std(ddof=1)))}
    rank = lambda key: sorted(same, key=lambda k: -same[k][key])  # noqa: E731
    result["same_table"] = {"strategies": same, "same_ranking": rank("shipped") == rank("baseline")}
    print(json.dumps(result["same_table"], indent=1))
    print(f"demo: baseline {base['wall_seconds']:.0f} s / shipped {fast['wall_seconds']:.0f} s = "
          f"{result['wall_ratio']}x (cells only {result['cell_ratio']}x)")
    out = ROOT / "results" / "demo_speed.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
