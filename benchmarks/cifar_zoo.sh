#!/usr/bin/env bash
# Rebuild the CIFAR-10 zoo (three Gaussian-augmentation experts + one router) from ../shared/data.
# Resumable: finished folders are skipped and an interrupted training resumes from its checkpoint.
# Usage: bash benchmarks/cifar_zoo.sh [experts|labels|router|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
THREADS=${THREADS:-2}
EPOCHS=${EPOCHS:-10}
ZOO=experts/zoo
if [ ! -f "$DATA/cifar10_train.npz" ]; then
  echo "skip: $DATA/cifar10_train.npz not found (set DATA=folder with cifar10_train.npz/cifar10_test.npz)" >&2
  exit 0
fi
stage=${1:-all}
if [ "$stage" = experts ] || [ "$stage" = all ]; then
  for s in 0.25 0.5 1.0; do
    out=$ZOO/cifar10-resnet20-sigma$s
    if [ -f "$out/config.json" ]; then echo "have $out"; continue; fi
    dualrs-route train-expert --dataset cifar10 --data "$DATA" --sigma $s --arch cifar_resnet20 \
      --epochs "$EPOCHS" --batch 128 --lr 0.1 --seed 0 --threads "$THREADS" --out "$out"
  done
fi
