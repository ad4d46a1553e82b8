"""What racing saves, and whether it changes the answer: one grid run three ways in one process.

(a) the hand-written loop of grid_speed.py (timm model, DataLoader over PIL images, fp32, fresh
    augmentation) over every strategy x learning rate x fold, each rate trained on the fold's fit
    part and the best (inner validation balanced accuracy) scored on the test fold; its recipe is
    medtune's defaults (grid_speed.REFERENCE_RECIPE: class-weighted loss, the linear probe fitted
    to convergence once, as it has no learning rate, augmentation as often as medtune's 4 views);
(b) medtune without racing: every strategy x fold, each with a 3-value learning-rate choice made
    on the inner validation split;
(c) the same grid with `racing: on` (grid/racing.py: candidates stopped when their inner-validation
    scores show them worse than the leader by more than the margin) and `halving: on` (each
    learning-rate choice by successive halving on the inner split, grid/select.py).

Strategies (issue 19): linear_probe, the SVM head on frozen features, partial_ft(blocks=2), lp_ft,
full_ft and l2_sp; Lite0 on BUSI. For each way it prints and stores the training seconds summed
over cells ("cell-seconds"), the wall clock, the recommended strategy (the leader on inner
validation scores, read_evidence's `inner_leaders`, the verdict's rule, for both ways: no test fold
takes part) and that strategy's outer estimate (mean balanced accuracy over the outer test folds, with the fold sd).

    python benchmarks/racing.py                      # 224 px, 5 folds, 4 epochs, all of BUSI (hours here)
    python benchmarks/racing.py --every 10 --epochs 3  # every 10th image of each class (minutes)

Results: benchmarks/results/racing[_everyN].json. `--skip-reference` leaves (a) out.

`--grid user` is issue 41's user-scale grid: EfficientNet-Lite0/1/2 (each at its own resolution) x
linear_probe, partial_ft(blocks=2), full_ft, lp_ft, l2_sp and lora, each with `lr: {choose: [1e-4, 3e-4,
1e-3, 3e-3]}`, softmax head, ways (b) and (c) only; results in racing_user_grid[_everyN].json, with
(c)'s training seconds as a share of (b)'s (the issue asks <= 0.4 with the same recommendation).

    python benchmarks/racing.py --grid user --every 20 --epochs 1 --keep ~/racing_user_dev   # a check
    python benchmarks/racing.py --grid user --keep ~/racing_user --ways c                    # the record

The full-size run takes longer than one working session here, so it can be spread over several:
with `--keep DIR`, the stores of (b) and (c) and the finished (fold, strategy) rows of (a) are kept
in DIR, and running the same command again resumes each way where it stopped (finished cells are
reused, the cell in flight when it was stopped is redone). Each way's wall clock is then the sum of
the invocations' wall clocks, kept in DIR/wall.json by a heartbeat every 5 s, so it includes the
work an interrupted invocation lost; the results file says how many invocations each way took.
`--ways c` (or `b`, `a`, `b,c`, ...) runs only some ways, and a way already complete in DIR is not
run again; the results file is written once (b) and (c) are both complete in DIR.

    python benchmarks/racing.py --keep ~/racing_full --ways c      # session 1
    python benchmarks/racing.py --keep ~/racing_full --ways b      # sessions 2, 3 (resumes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import medtune
from medtune.evaluation.evidence import read_evidence
from medtune.evaluation.store import Store

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
# (benchmarks/ is not a package)
from grid_speed import (REFERENCE_RECIPE, Images, balanced_weight, every_nth, ref_model,  # noqa: E402
                        ref_predict, ref_probe, ref_refresh_bn, ref_train, set_trainable)

LRS = [3e-4, 1e-3, 3e-3]
# issue 41's user-scale grid (`--grid user`): the three embedded backbones at their own resolutions, the
# depths from a probe to full fine-tuning and LoRA, a four-value rate list; softmax head only
USER_BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
USER_STRATEGIES = ["linear_probe", {"name": "partial_ft", "blocks": 2}, "full_ft", "lp_ft", "l2_sp", "lora"]
USER_LRS = [1e-4, 3e-4, 1e-3, 3e-3]


class WallClock:
    """One way's wall clock summed over invocations, kept in `path` (a JSON file shared by the ways).

    A daemon thread rewrites the running invocation's seconds every 5 s, so an invocation that is
    killed still counts up to its last heartbeat."""

    def __init__(self, path: Path, way: str):
        self.path, self.way, self.lock = path, way, threading.Lock()
        state = self._read()
        entry = state.setdefault(way, {"invocations": [], "complete": False})
        entry["invocations"].append(0.0)
        self._write(state)
        self.t0, self.done = time.perf_counter(), threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def _write(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path)

    def _update(self, complete: bool = False) -> dict:
        with self.lock:
            state = self._read()
            entry = state[self.way]
            entry["invocations"][-1] = round(time.perf_counter() - self.t0, 1)
            entry["complete"] = entry["complete"] or complete
            self._write(state)
            return entry

    def _beat(self) -> None:
        while not self.done.wait(5):
            self._update()

    def finish(self) -> dict:
        """Stop the heartbeat, mark the way complete; returns {"invocations": [...], "complete": True}."""
        self.done.set()
        return self._update(complete=True)


def user_grid(data: str, folds: int, epochs: int, store: str, racing: bool) -> dict:
    """`--grid user`: USER_BACKBONES x USER_STRATEGIES, each rate chosen from USER_LRS on the inner split."""
    return {"name": "racing_user_grid", "datasets": [{"name": "busi", "path": data}],
            "backbones": USER_BACKBONES, "strategies": USER_STRATEGIES,
            "folds": folds, "seeds": [0], "store": store, "keep_best": False,
            "train": {"epochs": epochs, "batch_size": 32, "lr": {"choose": USER_LRS}, "patience": epochs},
            "racing": "on" if racing else "off", "halving": racing}


def grid(data: str, size: int, folds: int, epochs: int, store: str, racing: bool) -> dict:
    choose = {"choose": LRS}
    base = {
        "name": "racing", "datasets": [{"name": "busi", "path": data}],
        "backbones": [{"name": "efficientnet_lite0", "image_size": size}],
        "folds": folds, "seeds": [0], "store": store, "keep_best": False,
        "train": {"epochs": epochs, "batch_size": 32, "lr": choose, "patience": epochs},
        "racing": "on" if racing else "off", "halving": racing,
    }
    # heads x strategies: the SVM head of each strategy is its own candidate; it shares the softmax
    # cell's training (cells.run_cell), so it costs an SVM fit, not another training run
    return {**base, "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 2}, "lp_ft", "full_ft", "l2_sp"],
            "heads": ["softmax", "svm"]}


def measure(raw: dict, clock: WallClock) -> dict:
    summary = medtune.run(raw, progress=False)
    invocations = clock.finish()["invocations"]
    wall = sum(invocations)
    with Store(raw["store"]) as s:
        m = s.metrics()
        versions = s.results_versions()  # a way split over sessions may span code versions: say which
    lead = read_evidence(raw["store"]).inner_leaders.get("busi")
    rows = m.groupby("group").agg(backbone=("backbone", "first"), strategy=("strategy", "first"),
                                  head=("head", "first"), bacc=("balanced_accuracy", "mean"),
                                  sd=("balanced_accuracy", "std"), folds=("fold", "count"),
                                  seconds=("seconds", "sum"), pruned=("pruned", "first"))
    best = rows.loc[lead]
    return {"wall_seconds": wall, "invocations": len(invocations), "cell_seconds": float(m["seconds"].sum()),
            "results_versions": {str(v): n for v, n in versions.items()},
            "cells_run_last_invocation": int(summary.done),
            "pruned": list(summary.pruned.values()),
            "recommended": f"{best.backbone} · {best.strategy} · {best['head']}", "recommended_bacc": float(best.bacc),
            "recommended_sd": float(best.sd),
            "rows": [{"backbone": r.backbone, "strategy": r.strategy, "head": r["head"],
                      "bacc": round(float(r.bacc), 4), "sd": round(float(r.sd), 4) if np.isfinite(r.sd) else None,
                      "folds": int(r.folds), "seconds": round(float(r.seconds), 1), "pruned": bool(r.pruned)}
                     for _, r in rows.iterrows()]}


def reference(data: str, size: int, folds: int, epochs: int, rows_path: Path, clock: WallClock) -> dict:
    """Way (a): every strategy x rate x fold by the hand-written loop.

    Each finished (fold, strategy) row (its training seconds, chosen rate and test balanced
    accuracy) is appended to `rows_path` at once, and a rerun skips the rows already there."""
    from torch.utils.data import DataLoader

    from medtune.grid.cells import prepare
    from medtune.config import TrainConfig, load_config
    from medtune.models.heads import create_head, full_proba
    from medtune.evaluation.metrics import clinical_metrics
    from medtune.data.splits import inner_split

    cfg = load_config(raw={"datasets": [{"name": "busi", "path": data}], "backbones": ["efficientnet_lite0"],
                           "strategies": ["full_ft"], "folds": folds})
    prepared = prepare(cfg.datasets[0], size, folds)
    table = prepared.table
    paths, labels, names = table.paths, table.labels, table.class_names
    mean, std = [0.5] * 3, [0.5] * 3
    views = TrainConfig().views  # (b) and (c) augment as medtune's default does
    mk = lambda idx, train: DataLoader(Images([paths[i] for i in idx], labels[idx], size, train, mean, std, views),  # noqa: E731
                                       batch_size=32, shuffle=train, num_workers=2)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    if any(r.get("recipe", 1) != REFERENCE_RECIPE for r in rows):
        sys.exit(f"{rows_path} holds rows of another reference recipe (grid_speed.REFERENCE_RECIPE is now "
                 f"{REFERENCE_RECIPE}): delete it to rerun way (a)")
    done = {(r["fold"], r["kind"]): r for r in rows}
    for fold, (tr, te) in enumerate(prepared.splits(folds, 0)):
        fit_idx, val_idx = inner_split(tr, labels, prepared.groups, 0.15, 0)
        train_l, val_l, test_l = mk(fit_idx, True), mk(val_idx, False), mk(te, False)
        for kind in ("linear_probe", "svm", "partial_ft", "lp_ft", "full_ft", "l2_sp"):
            if (fold, kind) in done:
                continue
            tried, seconds = [], 0.0
            # the SVM and the convex probe have no learning rate (medtune drops the choice for them too)
            for lr in ([None] if kind in ("svm", "linear_probe") else LRS):
                torch.manual_seed(0)
                c0 = time.perf_counter()
                model = ref_model(len(names))
                if kind == "svm":
                    plain = DataLoader(Images([paths[i] for i in fit_idx], labels[fit_idx], size, False, mean, std),
                                       batch_size=32, num_workers=2)
                    svm = create_head("svm").fit(ref_predict(model, plain, True), labels[fit_idx],
                                                 ref_predict(model, val_l, True), labels[val_idx], len(names))
                    val_p = full_proba(svm, ref_predict(model, val_l, True), len(names))
                    test_p = full_proba(svm, ref_predict(model, test_l, True), len(names))
                else:
                    weight = balanced_weight(labels[fit_idx], len(names))
                    if kind == "lp_ft":
                        ref_refresh_bn(model, train_l, views)
                    if kind in ("linear_probe", "lp_ft"):
                        best = ref_probe(model, train_l, val_l, views, len(names), weight)
                    if kind == "lp_ft":
                        set_trainable(model, "all")
                        ref_train(model, train_l, epochs, 0.1 * lr, val_l, weight, best=best)
                    elif kind == "l2_sp":
                        set_trainable(model, "all")
                        start = {n: q.detach().clone() for n, q in model.named_parameters()
                                 if not n.startswith("classifier")}
                        pen = lambda m: 0.005 * sum((q - start[n]).pow(2).sum() if n in start else q.pow(2).sum()  # noqa: E731
                                                    for n, q in m.named_parameters())
                        ref_train(model, train_l, epochs, lr, val_l, weight, penalty=pen)
                    elif kind != "linear_probe":
                        set_trainable(model, {"partial_ft": "top2", "full_ft": "all"}[kind])
                        ref_train(model, train_l, epochs, lr, val_l, weight)
                    val_p, test_p = ref_predict(model, val_l), ref_predict(model, test_l)
                seconds += time.perf_counter() - c0
                tried.append((clinical_metrics(labels[val_idx], val_p, names)["balanced_accuracy"], lr, test_p))
            _, lr, test_p = max(tried, key=lambda t: t[0])  # chosen on the inner validation part only
            row = {"fold": fold, "kind": kind, "lr": lr, "seconds": seconds, "recipe": REFERENCE_RECIPE,
                   "bacc": float(clinical_metrics(labels[te], test_p, names)["balanced_accuracy"])}
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[fold, kind] = row
            print(f"  reference fold {fold} {kind}: lr {lr}, {seconds:.0f} s", flush=True)
    invocations = clock.finish()["invocations"]
    bacc: dict[str, list[float]] = {}
    for r in done.values():
        bacc.setdefault(r["kind"], []).append(r["bacc"])
    return {"wall_seconds": sum(invocations), "invocations": len(invocations),
            "cell_seconds": sum(r["seconds"] for r in done.values()),
            "balanced_accuracy": {k: round(float(np.mean(v)), 4) for k, v in bacc.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--every", type=int, default=1, help="use every N-th image of each class")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--grid", choices=["issue19", "user"], default="issue19",
                    help="issue19: Lite0, 6 strategies x 2 heads, 3 rates (default); user: issue 41's Lite0/1/2 x "
                         "linear_probe, partial_ft(blocks=2), full_ft, lp_ft, l2_sp, lora x 4 rates, ways b and c "
                         "only, each backbone at its own resolution (--size is not used)")
    ap.add_argument("--ways", default="b,c,a", help="which ways to run, comma-separated (default: b,c,a)")
    ap.add_argument("--skip-reference", action="store_true", help="leave way (a) out (as --ways b,c)")
    ap.add_argument("--keep", type=Path, help="keep the ways' stores and clocks in this folder, so that the "
                    "same command run again resumes them (default: a new temporary folder)")
    args = ap.parse_args()
    user = args.grid == "user"
    ways = set(args.ways.split(",")) - ({"a"} if args.skip_reference or user else set())
    if not ways or ways - {"a", "b", "c"}:
        ap.error(f"--ways takes a comma-separated subset of a,b,c; got {args.ways!r}")
    keep = args.keep or Path(tempfile.mkdtemp())
    keep.mkdir(parents=True, exist_ok=True)
    settings = {"data": str(Path(args.data).resolve()), "size": None if user else args.size, "folds": args.folds,
                "epochs": args.epochs, "every": args.every, "lrs": USER_LRS if user else LRS}
    if user:
        settings.update(grid="user", backbones=USER_BACKBONES, strategies=USER_STRATEGIES)
    settings_path = keep / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        ap.error(f"{settings_path} was kept by a run with other settings ({settings_path.read_text().strip()}); "
                 "give another --keep folder or the same settings")
    settings_path.write_text(json.dumps(settings))
    # the links of --every go inside the kept folder, so that a resumed run sees the same paths
    data = every_nth(args.data, args.every, keep) if args.every > 1 else args.data
    torch.set_num_threads(os.cpu_count() or 1)
    partial_path = keep / "result.json"
    result = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    # a way already complete in the kept folder is not run again (its wall clock would grow)
    ways -= {w[0] for w in ("a_reference", "b_no_racing", "c_racing") if w in result}
    result.update({"command": " ".join([Path(sys.executable).name, *sys.argv]), **settings,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "measured_at": time.strftime("%Y-%m-%d %H:%M")})
    for way, racing in (("b_no_racing", False), ("c_racing", True)):
        if way[0] not in ways:
            continue
        where = "each backbone's own resolution" if user else f"{args.size}px"
        print(f"({way}) {data} @ {where}, {args.folds} folds, {args.epochs} epochs, lr choose {settings['lrs']}",
              flush=True)
        clock = WallClock(keep / "wall.json", way)
        raw = (user_grid(data, args.folds, args.epochs, str(keep / f"{way}.sqlite"), racing) if user
               else grid(data, args.size, args.folds, args.epochs, str(keep / f"{way}.sqlite"), racing))
        result[way] = measure(raw, clock)
        partial_path.write_text(json.dumps(result, indent=1))
        r = result[way]
        print(f"  {r['cell_seconds']:.0f} cell-seconds, {r['wall_seconds']:.0f} s wall over {r['invocations']} "
              f"invocation(s); recommends {r['recommended']} (outer {r['recommended_bacc']:.3f} ± "
              f"{r['recommended_sd']:.3f}); pruned {len(r['pruned'])}", flush=True)
    if "a" in ways:
        print("(a) the hand-written loop over every strategy x rate x fold", flush=True)
        clock = WallClock(keep / "wall.json", "a_reference")
        result["a_reference"] = reference(data, args.size, args.folds, args.epochs,
                                          keep / "reference_rows.jsonl", clock)
        partial_path.write_text(json.dumps(result, indent=1))
        a = result["a_reference"]
        print(f"  {a['cell_seconds']:.0f} cell-seconds, {a['wall_seconds']:.0f} s wall over {a['invocations']} "
              "invocation(s)", flush=True)
    if "a_reference" in result and "c_racing" in result:
        result["wall_ratio_a_over_c"] = result["a_reference"]["wall_seconds"] / result["c_racing"]["wall_seconds"]
        print(f"(a)/(c) wall clock: {result['wall_ratio_a_over_c']:.1f}x", flush=True)
    if "b_no_racing" not in result or "c_racing" not in result:
        print(f"kept in {keep}; run again with --keep {keep} and the missing way(s) to finish")
        return
    b, c = result["b_no_racing"], result["c_racing"]
    result["training_seconds_ratio_b_over_c"] = b["cell_seconds"] / max(c["cell_seconds"], 1e-9)
    result["same_recommendation"] = b["recommended"] == c["recommended"]
    result["estimate_within_one_sd"] = abs(b["recommended_bacc"] - c["recommended_bacc"]) <= b["recommended_sd"]
    print(f"(b)/(c) training seconds: {result['training_seconds_ratio_b_over_c']:.2f}x; same recommendation: "
          f"{result['same_recommendation']}; estimate within one fold-sd: {result['estimate_within_one_sd']}")
    partial_path.write_text(json.dumps(result, indent=1))
    result["training_seconds_c_over_b"] = c["cell_seconds"] / max(b["cell_seconds"], 1e-9)  # issue 41: <= 0.4
    name = "racing_user_grid" if user else "racing"
    out = ROOT / "results" / f"{name}{f'_every{args.every}' if args.every > 1 else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
