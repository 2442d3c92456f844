#!/usr/bin/env bash
# Issue 15 on CIFAR-10, real runs: the 500-image protocol (test idx 0, 20, ..., 9980; N0 = 100, cap N = 10,000,
# alpha = 0.001, seed 0) with `--sequential --radius-grid 0.25 --max-radius 1.5` for each zoo expert and the
# zoo router, one after the other (their summed wall-clock is the whole routed evaluation), then fixed N = 10,000
# on every 20th of those images (25 images: idx 0, 400, ..., 9600) for seconds per image side by side.
# ONNX Runtime, THREADS threads. Resumable (each TSV resumes). Pause other jobs on the cores for the timings.
# Usage: bash benchmarks/sequential_cifar.sh        then: python benchmarks/sequential_cifar.py RESULTS_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
THREADS=${THREADS:-2}
OUT=${OUT:-benchmarks/results/sequential-cifar10}
EXPERTS=${EXPERTS:-experts/zoo/cifar10-resnet20-sigma}
ROUTER=${ROUTER:-router/zoo/cifar10-router}
if [ ! -f "$DATA/cifar10_test.npz" ]; then
  echo "skip: $DATA/cifar10_test.npz not found (set DATA=folder with cifar10_test.npz)" >&2
  exit 0
fi
mkdir -p "$OUT"
common=(--dataset cifar10 --data "$DATA" --split test --N0 100 --N 10000 --alpha 0.001 --seed 0 --batch 400
        --threads "$THREADS" --engine onnxruntime --quiet)
seq=(--skip 20 --max 10000 --sequential --radius-grid 0.25 --max-radius 1.5)
fixed=(--skip 400 --max 10000)
for s in 0.25 0.5 1.0; do
  dualrs-route certify --expert "${EXPERTS}$s" "${common[@]}" "${seq[@]}" --out "$OUT/sequential-expert-$s.tsv"
done
dualrs-route certify --router "$ROUTER" "${common[@]}" "${seq[@]}" --out "$OUT/sequential-router.tsv"
for s in 0.25 0.5 1.0; do
  dualrs-route certify --expert "${EXPERTS}$s" "${common[@]}" "${fixed[@]}" --out "$OUT/fixed25-expert-$s.tsv"
done
dualrs-route certify --router "$ROUTER" "${common[@]}" "${fixed[@]}" --out "$OUT/fixed25-router.tsv"
