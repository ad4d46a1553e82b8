"""One strategy grid two ways in one process: medtune vs a plain reference loop.

(a) medtune: decode once, frozen-prefix feature cache shared across folds and cells, bf16
    autocast on CPUs with AVX512-BF16/AMX (and CUDA), channels_last.
(b) the loop a researcher would write: timm model with the same weights, a DataLoader over PIL
    images (decode + resize + augment per item, every epoch), full forward every step, fp32.
    It trains the same recipe as medtune's defaults so that the metrics can be compared (recipe
    REFERENCE_RECIPE): the cross-entropy weighted by inverse class frequency (scikit-learn's
    "balanced"), in training and in the validation loss that keeps the best epoch; the linear
    probe (linear_probe, LP-FT's first phase) fitted to convergence by logistic regression on
    pooled features, C chosen on the validation loss (medtune's models/probe.py, as the SVM below uses
    medtune's models/heads.py), LP-FT's after its BatchNorm statistics are re-estimated on the training
    images (medtune's lp_ft refresh_bn, recipe 3); frozen BatchNorm layers in eval mode, trained
    ones on batch statistics; one epoch of linear warm-up then cosine per phase, gradient-norm
    clipping at 5, the best validation epoch kept across LP-FT's two phases, and the same
    augmentation policy (each drawn
    training image augmented with probability 1 - 1/views, freshly here, from views - 1 cached
    versions in medtune's frozen phases). Only the execution differs.

Same data, same folds (patient/duplicate groups from medtune's splitter), same epochs, same
inner validation split, same SVM fitting code. Prints seconds per cell kind for both, the
ratio, peak resident memory of the medtune part, and the mean metrics of both.

    python benchmarks/grid_speed.py                # 224 px, 5 folds, 3 epochs
    python benchmarks/grid_speed.py --quick        # 128 px, 2 folds, 3 epochs (< 10 min here)
    python benchmarks/grid_speed.py --every 5      # 224 px, 5 folds, 3 epochs on every 5th image of each class
Results go to benchmarks/results/grid_speed[_quick|_every5].json. A short run compares its ratios with
the full mode's (from grid_speed.json). `--quick` cannot track the cached kinds: their cache is filled
once and amortised over folds x epochs, so with 2 folds instead of 5 their ratio is 2-4x smaller.
`--every N` keeps folds, epochs and resolution and shrinks only the data, which every cost of both
halves scales with, so its ratios are those of the full grid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

import medtune
from medtune.models.backbones import create_backbone
from medtune.config import load_config
from medtune.models.heads import create_head, full_proba
from medtune.evaluation.metrics import clinical_metrics
from medtune.grid.cells import prepare
from medtune.models.probe import fit_linear_probe, load_into
from medtune.data.splits import inner_split
from medtune.evaluation.store import Store

ROOT = Path(__file__).resolve().parent
KINDS = ["linear_probe", "svm", "partial_ft", "lp_ft", "full_ft"]
# the reference loop's recipe; a stored reference half is reused only with the same one.
# 1: unweighted loss, probe by SGD at 10x the rate, LP-FT with every BatchNorm frozen (medtune's
#    defaults before d70584c); 2: medtune's current defaults, as the docstring lists them
REFERENCE_RECIPE = 3


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------- (a) medtune
def medtune_grid(data: str, size: int, folds: int, epochs: int, views: int, store: str) -> dict:
    base = {
        "name": "grid_speed",
        "datasets": [{"name": "busi", "path": data}],
        "backbones": [{"name": "efficientnet_lite0", "image_size": size}],
        "folds": folds, "seeds": [0], "store": store, "keep_best": False,
        "train": {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "patience": epochs, "views": views},
    }
    t0 = time.perf_counter()
    medtune.run({**base, "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 2},
                                        {"name": "lp_ft", "lp_epochs": epochs}, "full_ft"]}, progress=False)
    medtune.run({**base, "strategies": ["linear_probe"], "heads": ["svm"]}, progress=False)
    wall = time.perf_counter() - t0
    with Store(store) as s:
        m = s.metrics()
    kind = m.apply(lambda r: "svm" if r["head"] == "svm" else r["strategy"].split("(")[0], axis=1)
    out = {"wall_seconds": wall, "kinds": {}}
    cell_total = m["seconds"].sum()
    for k in KINDS:
        rows = m[kind == k]
        out["kinds"][k] = {"seconds": float(rows["seconds"].sum()),
                           "balanced_accuracy": float(rows["balanced_accuracy"].mean()),
                           "balanced_accuracy_sd": float(rows["balanced_accuracy"].std(ddof=1)),
                           "auc": float(rows["auc"].mean())}
    # time outside cells (decoding the data set once, building configs) is spread over kinds by cell time
    overhead = wall - cell_total
    for k in KINDS:
        out["kinds"][k]["seconds_with_overhead"] = out["kinds"][k]["seconds"] * (1 + overhead / cell_total)
    out["overhead_seconds"] = overhead
    return out


# --------------------------------------------------------------------------- (b) reference loop
class Images(Dataset):
    def __init__(self, paths, labels, size, train, mean, std, views=2):
        self.paths, self.labels, self.size, self.train = paths, labels, size, train
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        # the same light augmentation as medtune's, the torchvision way, per image, applied as often
        self.augment = T.RandomApply([T.Compose([
            T.RandomHorizontalFlip(), T.RandomAffine(10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            T.ColorJitter(brightness=0.1, contrast=0.1)])], p=1 - 1 / views)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.train:
            x = self.augment(x)
        return (x - self.mean) / self.std, int(self.labels[i])


def ref_model(n_classes):
    model = create_backbone("efficientnet_lite0", num_classes=n_classes)  # the same ImageNet weights
    return model


def set_trainable(model, mode):
    head = {n for n, _ in model.get_classifier().named_parameters(prefix="classifier")}
    for n, p in model.named_parameters():
        if mode == "head":
            p.requires_grad = n in head
        elif mode == "top2":
            p.requires_grad = n in head or n.startswith(("blocks.5", "blocks.6", "conv_head", "bn2"))
        else:
            p.requires_grad = True


def freeze_bn(model, every=False):
    """model.train(), but BatchNorm layers whose parameters are frozen (or all of them) stay in eval."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if every or not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()


def balanced_weight(labels, n_classes):
    """Inverse-frequency class weights, scikit-learn's "balanced" (medtune's train.class_weight default)."""
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(n_classes), y=labels), dtype=torch.float32)


def val_loss(model, val_loader, weight):
    model.eval()
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, weight=weight, reduction="sum").item() for x, y in val_loader)


def ref_train(model, loader, epochs, lr, val_loader, weight=None, best=None, penalty=None):
    """Train with warm-up + cosine, clip at 5, keep the best validation epoch (`best` carries it across phases).
    `weight`: class weights of the loss; `penalty(model)` is added to the loss (L2-SP in
    benchmarks/racing.py), with weight decay off then."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0 if penalty else 1e-4)
    warmup, total = len(loader), epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: ((t + 1) / warmup if t < warmup
                        else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))))
    best = best or [float("inf"), None]
    for _ in range(epochs):
        freeze_bn(model)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, weight=weight)
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 5.0)
            opt.step()
            sched.step()
        vl = val_loss(model, val_loader, weight)
        if vl < best[0]:
            best[:] = [vl, {k: v.clone() for k, v in model.state_dict().items()}]
    model.load_state_dict(best[1])
    return best


def ref_probe(model, train_loader, val_loader, views, n_classes, weight):
    """The linear probe to convergence: logistic regression ("balanced") on the pooled features of
    `views` passes over the augmenting training loader, C chosen on the validation loss, folded into
    the classifier. Returns ref_train's `best` ([validation loss, state]) for LP-FT's next phase."""
    passes = [ref_features(model, train_loader) for _ in range(views)]
    x_val, y_val = ref_features(model, val_loader)
    fit = fit_linear_probe(np.concatenate([x for x, _ in passes]), np.concatenate([y for _, y in passes]),
                           x_val, y_val, n_classes, "balanced", 0)
    load_into(model.get_classifier(), fit)
    return [val_loss(model, val_loader, weight), {k: v.clone() for k, v in model.state_dict().items()}]


@torch.no_grad()
def ref_refresh_bn(model, loader, views):
    """LP-FT's BatchNorm refresh before its probe (recipe 3, medtune's lp_ft `refresh_bn`): the running
    statistics re-estimated as the mean over `views` passes of the augmenting training loader."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for _ in range(views):
        for x, _ in loader:
            model(x)
    for m in norms:
        m.momentum = 0.1
    model.eval()


@torch.no_grad()
def ref_features(model, loader):
    model.eval()
    xs, ys = zip(*((model.forward_head(model.forward_features(x), pre_logits=True), y) for x, y in loader))
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


@torch.no_grad()
def ref_predict(model, loader, features=False):
    model.eval()
    out = []
    for x, _ in loader:
        out.append(model.forward_head(model.forward_features(x), pre_logits=True) if features else model(x).softmax(1))
    return torch.cat(out).numpy()


def reference_grid(prepared, size, folds, epochs, views) -> dict:
    table = prepared.table
    paths, labels, names = table.paths, table.labels, table.class_names
    mean, std = [0.5] * 3, [0.5] * 3
    kinds = {k: {"seconds": 0.0, "bacc": [], "auc": []} for k in KINDS}

    def loaders(fit_idx, val_idx, test_idx):
        def mk(idx, train):
            return DataLoader(Images([paths[i] for i in idx], labels[idx], size, train, mean, std, views),
                              batch_size=32, shuffle=train, num_workers=2, persistent_workers=False)

        return mk(fit_idx, True), mk(val_idx, False), mk(test_idx, False)

    for fold, (tr, te) in enumerate(prepared.splits(folds, 0)):
        fit_idx, val_idx = inner_split(tr, labels, prepared.groups, 0.15, 0)
        train_l, val_l, test_l = loaders(fit_idx, val_idx, te)
        for kind in KINDS:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            model = ref_model(len(names))
            if kind == "svm":
                set_trainable(model, "head")
                plain_fit = DataLoader(Images([paths[i] for i in fit_idx], labels[fit_idx], size, False, mean, std),
                                       batch_size=32, num_workers=2)
                groups = None if prepared.groups is None else prepared.groups[fit_idx]  # as medtune's cell
                svm = create_head("svm").fit(ref_predict(model, plain_fit, True), labels[fit_idx],
                                             ref_predict(model, val_l, True), labels[val_idx], len(names),
                                             groups=groups)
                probs = full_proba(svm, ref_predict(model, test_l, True), len(names))
            else:
                # the same learning rates as medtune: 1e-3, LP-FT's FT phase at 0.1x (ft_lr_scale)
                weight = balanced_weight(labels[fit_idx], len(names))
                if kind == "lp_ft":
                    ref_refresh_bn(model, train_l, views)
                if kind in ("linear_probe", "lp_ft"):
                    best = ref_probe(model, train_l, val_l, views, len(names), weight)
                if kind == "lp_ft":
                    set_trainable(model, "all")
                    ref_train(model, train_l, epochs, 1e-4, val_l, weight, best=best)
                elif kind != "linear_probe":
                    set_trainable(model, {"partial_ft": "top2", "full_ft": "all"}[kind])
                    ref_train(model, train_l, epochs, 1e-3, val_l, weight)
                probs = ref_predict(model, test_l)
            kinds[kind]["seconds"] += time.perf_counter() - t0
            m = clinical_metrics(labels[te], probs, names)
            kinds[kind]["bacc"].append(m["balanced_accuracy"])
            kinds[kind]["auc"].append(m["auc"])
            print(f"  reference fold {fold} {kind}: {kinds[kind]['seconds']:.0f} s so far", flush=True)
    return {"kinds": {k: {"seconds": v["seconds"], "balanced_accuracy": float(np.mean(v["bacc"])),
                          "balanced_accuracy_sd": float(np.std(v["bacc"], ddof=1)), "auc": float(np.mean(v["auc"]))}
                      for k, v in kinds.items()}}


def run_reference(data: str, size: int, folds: int, epochs: int, views: int) -> dict:
    cfg = load_config(raw={"datasets": [{"name": "busi", "path": data}], "backbones": ["efficientnet_lite0"],
                           "strategies": ["full_ft"], "folds": folds})
    prepared = prepare(cfg.datasets[0], size, folds)
    t0 = time.perf_counter()
    ref = reference_grid(prepared, size, folds, epochs, views)
    ref["wall_seconds"] = time.perf_counter() - t0
    return ref


def every_nth(data: str, n: int, parent: Path | None = None) -> str:
    """A folder of links to every n-th image (sorted by name) of each class folder of `data`, made
    under `parent` (default: a new temporary folder); one already there is reused as it is."""
    out = Path(parent or tempfile.mkdtemp()) / f"{Path(data).name}_every{n}"
    if out.exists():
        return str(out)
    part = out.with_name(out.name + ".part")  # renamed when complete, so a reused folder is never half made
    shutil.rmtree(part, ignore_errors=True)
    for cls in sorted(p for p in Path(data).iterdir() if p.is_dir()):
        (part / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[::n]:
            (part / cls.name / f.name).symlink_to(f.resolve())
    part.rename(out)
    return str(out)


def machine() -> dict:
    """The CPU the figures are of, and the precision medtune's half ran in (`amp: auto`: bf16 where
    the CPU has AVX512-BF16, float32 elsewhere; the reference loop is float32 everywhere), since a
    ratio measured on one CPU is no figure for another."""
    from medtune.training.precision import autocast_dtype

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    dtype = autocast_dtype(torch.device("cpu"), "auto")
    return {"cpu": name, "medtune_precision": str(dtype).removeprefix("torch.") if dtype else "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="128 px, 2 folds, 3 epochs")
    ap.add_argument("--every", type=int, default=1, help="use every N-th image of each class (a smaller grid "
                    "with the full mode's folds, epochs and resolution)")
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=2, help="augmented views per image in medtune's cache")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--reuse-reference", action="store_true",
                    help="take the reference half from the existing results JSON (same size, folds, epochs) "
                         "instead of rerunning it; for re-measuring medtune after a change")
    args = ap.parse_args()
    size, folds = (128, 2) if args.quick else (224, 5)
    if args.every > 1:
        args.data = every_nth(args.data, args.every)
    torch.set_num_threads(os.cpu_count() or 1)
    store = os.path.join(tempfile.mkdtemp(), "grid.sqlite")
    print(f"medtune: {args.data} @ {size}px, {folds} folds, {args.epochs} epochs", flush=True)
    ours = medtune_grid(args.data, size, folds, args.epochs, args.views, store)
    ours["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(ours, indent=1), flush=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "size": size, "folds": folds,
              "epochs": args.epochs, "views": args.views, "every": args.every, "reference_recipe": REFERENCE_RECIPE,
              "medtune": ours, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "measured_at": time.strftime("%Y-%m-%d %H:%M"), **machine()}
    suffix = ("_quick" if args.quick else "") + (f"_every{args.every}" if args.every > 1 else "")
    out = ROOT / "results" / f"grid_speed{suffix}.json"
    previous = json.loads(out.read_text()) if args.reuse_reference and out.is_file() else {}
    same = all(previous.get(k, 1 if k in ("every", "reference_recipe") else None) == result[k]
               for k in ("size", "folds", "epochs", "views", "every", "reference_recipe"))
    if args.reuse_reference and (not same or "reference" not in previous):
        sys.exit(f"--reuse-reference: {out} holds no reference run with size {size}, {folds} folds, {args.epochs} "
                 f"epochs, {args.views} views and reference recipe {REFERENCE_RECIPE}: run without --reuse-reference")
    if not args.skip_reference:
        if args.reuse_reference:
            result["reference"] = previous["reference"]
            result["reference_measured_at"] = previous.get("reference_measured_at", previous.get("measured_at"))
        else:
            result["reference_measured_at"] = time.strftime("%Y-%m-%d %H:%M")
            result["reference"] = run_reference(args.data, size, folds, args.epochs, args.views)
        ref = result["reference"]
        rows = []
        for k in KINDS:
            a, b = ours["kinds"][k], ref["kinds"][k]
            ratio = b["seconds"] / max(a["seconds_with_overhead"], 1e-9)
            agree = (abs(a["balanced_accuracy"] - b["balanced_accuracy"])
                     <= max(a["balanced_accuracy_sd"], b["balanced_accuracy_sd"]))
            rows.append({"kind": k, "medtune_s": round(float(a["seconds_with_overhead"]), 1),
                         "reference_s": round(b["seconds"], 1),
                         "ratio": round(float(ratio), 1), "bacc_medtune": round(a["balanced_accuracy"], 3),
                         "bacc_reference": round(b["balanced_accuracy"], 3), "agree_within_sd": bool(agree)})
        result["table"] = rows
        result["whole_grid_ratio"] = ref["wall_seconds"] / ours["wall_seconds"]
        full = ROOT / "results" / "grid_speed.json"
        if suffix and full.is_file():  # a short mode: how far its ratios are from the full mode's
            full_run = json.loads(full.read_text())
            full_ratio = {r["kind"]: r["ratio"] for r in full_run["table"]} | {"whole": full_run["whole_grid_ratio"]}
            for r in rows:
                r["ratio_vs_full"] = round(r["ratio"] / full_ratio[r["kind"]], 2)
            result["whole_vs_full"] = round(result["whole_grid_ratio"] / full_ratio["whole"], 2)
        for r in rows:
            print(r)
        print(f"whole grid: reference {ref['wall_seconds']:.0f} s / medtune {ours['wall_seconds']:.0f} s = "
              f"{result['whole_grid_ratio']:.1f}x; medtune peak RSS {ours['peak_rss_gb']:.2f} GB")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
