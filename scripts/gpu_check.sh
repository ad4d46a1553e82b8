#!/usr/bin/env bash
# The CUDA paths, checked on a machine with a GPU (CI has none, so nothing else exercises them):
#   1. the test suite with its grids and strategy contracts on CUDA (MEDTUNE_TEST_DEVICE=cuda);
#   2. the demo grid on CUDA (bf16 autocast, fused AdamW, keep_best), its report, and predict with
#      Grad-CAM from the kept model;
#   3. the fp16 + GradScaler path that GPUs without bf16 take (forced here by hiding bf16 support);
#   4. torch.compile against eager for a full_ft step on Lite0 and ResNet-50 @224, compile time included
#      (benchmarks/compile.py --device cuda): the figure precision.COMPILE_PAYS["cuda"] waits for.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]; logs and the report go to OUT_DIR (default results/gpu_check).
# STEPS="1 3" runs some steps only; PYTEST_ARGS passes options to pytest (e.g. --ignore=tests/test_distributed.py
# where Ray is not installed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

step() { [[ " ${STEPS:-1 2 3 4} " == *" $1 "* ]]; }

if step 1; then
echo "== 1. test suite on CUDA"
MEDTUNE_TEST_DEVICE=cuda $PY -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT_DIR/pytest_cuda.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

fi

if step 2; then
echo "== 2. demo grid on CUDA"
store="$OUT_DIR/demo.sqlite"
rm -f "$store"*
/usr/bin/time -f "demo wall %e s, peak RSS %M KB" $PY -m medtune run configs/demo.yaml --set device=cuda --set "store=$store" --quiet || rc=1
$PY -m medtune results --store "$store" || rc=1
$PY -m medtune report --store "$store" || rc=1
$PY - "$store" "$OUT_DIR/scans" <<'PY' || rc=1
import sys
from pathlib import Path
from PIL import Image
from medtune.data.synthetic import make_ultrasound
t = make_ultrasound(n_patients=6, images_per_patient=1, size=224, seed=99)
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
for i, img in enumerate(t.images):
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / f"scan_{i}_{t.class_names[t.labels[i]]}.png")
PY
$PY -m medtune predict "$store.models/best" "$OUT_DIR/scans" --cam --out "$OUT_DIR/preds" || rc=1
$PY - "$store" <<'PY' || rc=1
import sys
from medtune.evaluation.store import Store, read_cells
with Store(sys.argv[1]) as s:
    done, runs = read_cells(s), s.runs()
    print(f"{len(done)} cells done; run environment:", runs.iloc[-1].to_dict())
    prec = {h.get("precision") for info in done["info"] for h in info.get("history", [])}
    print("precisions recorded per epoch:", prec)
    assert prec == {"bfloat16"}, prec
PY

fi

if step 3; then
echo "== 3. fp16 + GradScaler (a GPU without bf16) against bf16, same grid"
$PY - "$OUT_DIR" <<'PY' || rc=1
import sys, torch
import medtune
from medtune.evaluation.store import Store, read_cells
raw = {"name": "amp", "datasets": [{"name": "syn", "source": "synthetic", "options": {"n_patients": 30, "images_per_patient": 4, "seed": 0}}],
       "backbones": [{"name": "efficientnet_lite0", "image_size": 128}],
       "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 2}, "full_ft", "l2_sp", "auto_rgn"],
       "folds": 2, "train": {"epochs": 4, "batch_size": 16}, "device": "cuda", "keep_best": False}
tables = {}
for name in ("bf16", "fp16"):
    if name == "fp16":
        torch.cuda.is_bf16_supported = lambda *a, **k: False  # what a V100 or T4 answers
    store = f"{sys.argv[1]}/{name}.sqlite"
    summary = medtune.run({**raw, "store": store}, progress=False)
    with Store(store) as s:
        m, done = s.metrics(), read_cells(s)
    prec = {h.get("precision") for info in done["info"] for h in info.get("history", [])}
    print(name, "precisions recorded per epoch:", prec, "failed cells:", summary.failed)
    assert summary.failed == 0 and prec == {"bfloat16" if name == "bf16" else "float16"}, (summary, prec)
    tables[name] = m.groupby("strategy")[["balanced_accuracy", "auc"]].mean()
print((tables["bf16"].add_suffix("_bf16")).join(tables["fp16"].add_suffix("_fp16")).round(3).to_string())
# trained models differ by strategy: a GradScaler that skipped every step would leave them equal
assert tables["fp16"]["auc"].nunique() > 2, tables["fp16"]
PY
fi

if step 4; then
echo "== 4. torch.compile on CUDA: eager vs compiled (cold and warm inductor cache)"
$PY benchmarks/compile.py --device cuda --batch 64 2>&1 | tee "$OUT_DIR/compile_cuda.log" | tail -60 || rc=1
cp benchmarks/results/compile.json "$OUT_DIR/compile.json" || rc=1
fi
echo "gpu_check rc=$rc"
exit $rc
