#!/usr/bin/env bash
# Train the second CIFAR-10 zoo: ResNet-20 experts (81.6 MFLOP per sample) with consistency
# regularisation (Jeong and Shin 2020: m = 2 noisy copies, lambda = LAMBDA, eta = 0.5), EPOCHS epochs each.
# Resumable: each expert checkpoints every epoch to benchmarks/training/<name>/checkpoint.pt (committed at the
# end of a session so the next one resumes); a finished folder (config.json present) is skipped.
# Usage: bash benchmarks/train_zoo.sh            (SIGMAS="0.25 0.5 1.0" EPOCHS=60 LAMBDA=10 THREADS=2 [PRECISION=fp32|bf16])
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
THREADS=${THREADS:-2}
EPOCHS=${EPOCHS:-60}
LAMBDA=${LAMBDA:-10}
# Precision: an unfinished expert resumes in the precision its checkpoint was started with; a new one
# starts in bf16 where the CPU has avx512_bf16 or amx_bf16 (2.1x faster than fp32 on Zen 5), else fp32
# (bf16 is 11x slower emulated on AVX2). PRECISION=fp32|bf16 overrides both.
native_bf16() { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | grep -qwE 'avx512_bf16|amx_bf16'; }
checkpoint_precision() {
  python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['settings']['precision'])" "$1"
}
SIGMAS=${SIGMAS:-0.25 0.5 1.0}
if [ ! -f "$DATA/cifar10_train.npz" ]; then
  echo "skip: $DATA/cifar10_train.npz not found (set DATA=folder with cifar10_train.npz/cifar10_test.npz)" >&2
  exit 0
fi
for s in $SIGMAS; do
  out=benchmarks/training/cifar10-resnet20-cr-sigma$s
  if [ -f "$out/config.json" ]; then echo "have $out"; continue; fi
  if [ -n "${PRECISION:-}" ]; then precision=$PRECISION
  elif [ -f "$out/checkpoint.pt" ]; then precision=$(checkpoint_precision "$out/checkpoint.pt")
  elif native_bf16; then precision=bf16
  else precision=fp32; fi
  dualrs-route train-expert --dataset cifar10 --data "$DATA" --sigma "$s" --arch cifar_resnet20 \
    --epochs "$EPOCHS" --batch 128 --lr 0.1 --seed 0 --threads "$THREADS" --precision "$precision" \
    --consistency "$LAMBDA" --eta 0.5 --copies 2 --out "$out"
done
