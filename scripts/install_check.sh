#!/usr/bin/env bash
# Does `pip install .` into an EMPTY venv give a working `medtune`? Creates a fresh venv in a
# temporary folder, installs the pinned torch, then this checkout (not editable, so a file
# missing from the package shows up here), and runs the smoke grid and the embedded-default
# backbone from that install, outside the source tree, then `medtune run demo` (the demo config
# shipped inside the package) for one short fold pair. Prints the time of each step.
set -euo pipefail
PY=${PY:-python3.11}
TORCH=${TORCH:-"torch==2.14.1 torchvision==0.29.1"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/medtune-install-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
step() { echo "[install-check +$((SECONDS - t0))s] $*"; }

step "fresh venv in $WORK/venv"
$PY -m venv "$WORK/venv"
BIN="$WORK/venv/bin"
"$BIN/pip" install -q --upgrade pip
step "pip install $TORCH"
"$BIN/pip" install -q $TORCH
step "pip install . (copied to $WORK/src, so the checkout gets no build/ or egg-info)"
# git ls-files: exactly what a clone would hold, without .venv or results.
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - ) | (mkdir -p "$WORK/src" && tar -xf - -C "$WORK/src")
"$BIN/pip" install -q "$WORK/src"
cd "$WORK"  # outside the source tree: only the installed package can be imported
step "medtune from $("$BIN/python" -c 'import medtune, os; print(os.path.dirname(medtune.__file__))')"
"$BIN/medtune" --help > /dev/null
"$BIN/medtune" list backbones | grep -q "efficientnet_lite0.*embedded (installed)" \
  || { echo "the embedded EfficientNet-Lite0 weights are not installed"; exit 1; }
"$BIN/python" -c "import medtune; m = medtune.create_backbone('efficientnet_lite0', num_classes=2); print('efficientnet_lite0 loaded,', sum(p.numel() for p in m.parameters()), 'parameters')"
step "medtune run configs/smoke.yaml"
"$BIN/medtune" run "$WORK/src/configs/smoke.yaml" --store "$WORK/smoke.sqlite" --quiet
"$BIN/medtune" results --store "$WORK/smoke.sqlite" --format csv | tail -n +2 | grep -q . \
  || { echo "the smoke run left no results"; exit 1; }
step "medtune run demo: the embedded demo config, from the installed package (1 fold pair, 1 epoch, linear probe)"
"$BIN/python" -c "import medtune.cli as c; p = c.shipped_configs()['demo']; assert 'site-packages' in str(p), p; print('demo config:', p)"
"$BIN/medtune" run demo --store "$WORK/demo.sqlite" --set folds=2 --set train.epochs=1 --set 'strategies=[linear_probe]' \
  > "$WORK/demo.log"
grep "^\[2/2\] synthetic_ultrasound efficientnet_lite0 linear_probe" "$WORK/demo.log" \
  || { cat "$WORK/demo.log"; echo "medtune run demo did not run the embedded demo"; exit 1; }
step "OK: pip install . gives a working medtune"
