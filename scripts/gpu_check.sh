#!/usr/bin/env bash
# One-command GPU check for a machine with a CUDA GPU and no internet.
#
#   scripts/gpu_check.sh OUT_DIR [WHEEL_DIR] [MNIST_GZ_DIR]
#
# OUT_DIR       results: bench.json, summary.md, throughput.png, speedrun.log/json, train.log/metrics.json
# WHEEL_DIR     kornia and kornia_rs wheels, installed (no network) when kornia is missing
# MNIST_GZ_DIR  folder of the four MNIST *-ubyte.gz files, unpacked into torchvision's layout when
#               $FASTCLR_DATA does not already hold MNIST/raw
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [WHEEL_DIR] [MNIST_GZ_DIR]}
WHEELS=${2:-}
GZ=${3:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! python3 -c "import kornia" 2>/dev/null; then
  [ -n "$WHEELS" ] || { echo "kornia is missing and no wheel folder was given" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastclr-site "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:/tmp/fastclr-site"
fi

DATA=${FASTCLR_DATA:-/tmp/fastclr-data}
if [ ! -f "$DATA/MNIST/raw/train-images-idx3-ubyte" ]; then
  [ -n "$GZ" ] || { echo "no MNIST under $DATA and no .gz folder given" >&2; exit 2; }
  mkdir -p "$DATA/MNIST/raw"
  for f in "$GZ"/*-ubyte.gz; do gunzip -c "$f" > "$DATA/MNIST/raw/$(basename "$f" .gz)"; done
fi
export FASTCLR_DATA="$DATA" FASTCLR_TEST_DATA="$DATA"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, kornia; print('torch', torch.__version__, 'kornia', kornia.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

echo "== gpu-marked tests"
python3 -m pytest tests -q -m gpu -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"

echo "== default training run, 1 epoch, with evaluation"
timeout 300 python3 -m fastclr.train --amp --epochs 1 --out /tmp/fastclr-train --overwrite 2>&1 \
  | tr '\r' '\n' | grep -v "step/s" | tail -12 | tee "$OUT/train.log"
cp /tmp/fastclr-train/metrics.json "$OUT/train_metrics.json" 2>/dev/null

echo "== speedrun"
timeout 300 python3 -m fastclr.speedrun --target 0.985 --amp --eval-every 100 --out /tmp/fastclr-speedrun --overwrite 2>&1 \
  | tr '\r' '\n' | grep -v "step/s" | tail -15 | tee "$OUT/speedrun.log"
cp /tmp/fastclr-speedrun/metrics.json "$OUT/speedrun.json" 2>/dev/null

echo "== CUDA benchmark groups (NT-Xent: reference, compiled, tiled, triton at N = 2,048 to 262,144)"
# The tiled loss at N=262,144 (~1,000x the work of N=16,384, where it took 297 ms) does not fit this budget:
# LOSS_TILED_262K=1 includes it.
SKIP_BIG="and not tiled-262144"
[ "${LOSS_TILED_262K:-0}" = 1 ] && SKIP_BIG=""
timeout "${BENCH_TIMEOUT:-300}" python3 -m pytest benchmarks -q -p no:cacheprovider \
  -k "cuda and not (torchvision and epoch_data) $SKIP_BIG" --benchmark-json "$OUT/bench.json" \
  --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds 2>&1 | tail -150 > "$OUT/bench.log"
tail -3 "$OUT/bench.log"
python3 -m benchmarks.report "$OUT/bench.json" --out "$OUT" > /dev/null && echo "wrote $OUT/summary.md"

echo "== best-accuracy recipe: ${BEST_EPOCHS:-20} epochs, full evaluation"
timeout "${BEST_TIMEOUT:-200}" python3 -m fastclr.train --amp --epochs "${BEST_EPOCHS:-20}" --out /tmp/fastclr-best \
  --overwrite 2>&1 | tr '\r' '\n' | grep -v "step/s" | tail -10 | tee "$OUT/best.log"
cp /tmp/fastclr-best/metrics.json "$OUT/best_metrics.json" 2>/dev/null
cp /tmp/fastclr-best/tsne.png "$OUT/best_tsne.png" 2>/dev/null
echo "done: $OUT"
