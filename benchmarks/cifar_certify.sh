#!/usr/bin/env bash
# Certified accuracy on CIFAR-10 for the zoo: each expert alone, the trained router, and
# (from the per-expert files) the envelope and the oracle. Test images idx 0, 20, 40, ...
# below MAX (default 2000: 100 images), N0 = 100, N = 10,000, total alpha = 0.001.
# Resumable: re-running continues every unfinished TSV.
# Usage: bash benchmarks/cifar_certify.sh        (needs the zoo: bash benchmarks/cifar_zoo.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
MAX=${MAX:-2000}
THREADS=${THREADS:-2}
OUT=benchmarks/results/cifar10
if [ ! -f "$DATA/cifar10_test.npz" ]; then
  echo "skip: $DATA/cifar10_test.npz not found (set DATA=folder with cifar10_test.npz)" >&2
  exit 0
fi
mkdir -p "$OUT"
# ONNX Runtime fp32 draws the same keyed host noise as the torch CPU engine and gave identical
# certificates in every comparison (benchmarks/RESULTS.md), at ~1.6x its speed on this CPU.
for m in experts/zoo/cifar10-resnet20-sigma0.25 experts/zoo/cifar10-resnet20-sigma0.5 \
         experts/zoo/cifar10-resnet20-sigma1.0 router/zoo/cifar10-router; do
  if [ -f "$m/config.json" ] && [ ! -f "$m/model.onnx" ]; then dualrs-route export "$m" --to onnx; fi
done
common=(--dataset cifar10 --data "$DATA" --split test --skip 20 --max "$MAX" --N0 100 --N 10000 --alpha 0.001
        --seed 0 --batch 400 --threads "$THREADS" --engine onnxruntime --quiet)
for s in 0.25 0.5 1.0; do
  dualrs-route certify --expert experts/zoo/cifar10-resnet20-sigma$s "${common[@]}" --out "$OUT/expert-$s.tsv"
done
if [ ! -f router/zoo/cifar10-router/config.json ]; then
  echo "no router yet (bash benchmarks/cifar_zoo.sh router); expert files are done" >&2
  exit 0
fi
dualrs-route certify --router router/zoo/cifar10-router "${common[@]}" --out "$OUT/router.tsv"
dualrs-route analyze "$OUT"/expert-0.25.tsv "$OUT"/expert-0.5.tsv "$OUT"/expert-1.0.tsv "$OUT"/router.tsv \
  --radii 0,0.25,0.5,0.75,1.0,1.25,1.5
