#!/usr/bin/env bash
# Train the second CIFAR-10 zoo: ResNet-20 experts (81.6 MFLOP per sample) with consistency
# regularisation (Jeong and Shin 2020: m = 2 noisy copies, lambda = LAMBDA, eta = 0.5), EPOCHS epochs each.
# Resumable: each expert checkpoints every epoch to benchmarks/training/<name>/checkpoint.pt (committed at the
# end of a session so the next one resumes); a finished folder (config.json present) is skipped.
# Usage: bash benchmarks/train_zoo.sh            (SIGMAS="0.25 0.5 1.0" EPOCHS=60 LAMBDA=10 THREADS=2 [PRECISION=fp32|bf16]
#                                                 [PARALLEL=1])
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
out_of() { echo "benchmarks/training/cifar10-resnet20-cr-sigma$1"; }
train_one() {  # train_one SIGMA THREADS (exec: in the background, $! is the training process itself)
  local s=$1 out precision
  out=$(out_of "$s")
  if [ -n "${PRECISION:-}" ]; then precision=$PRECISION
  elif [ -f "$out/checkpoint.pt" ]; then precision=$(checkpoint_precision "$out/checkpoint.pt")
  elif native_bf16; then precision=bf16
  else precision=fp32; fi
  exec dualrs-route train-expert --dataset cifar10 --data "$DATA" --sigma "$s" --arch cifar_resnet20 \
    --epochs "$EPOCHS" --batch 128 --lr 0.1 --seed 0 --threads "$2" --precision "$precision" \
    --consistency "$LAMBDA" --eta 0.5 --copies 2 --out "$out"
}
unfinished() { for s in $SIGMAS; do if [ -f "$(out_of "$s")/config.json" ]; then echo "have $(out_of "$s")" >&2; else echo "$s"; fi; done; }
# PARALLEL=1: two unfinished experts train at once with THREADS/2 threads each. On 2-core Zen 4 two 1-thread
# jobs took 229-238 s per epoch each, against 134 s for one 2-thread job: 1.16x the epochs (the step alone:
# 480 ms at 1 thread, 315 ms at 2, benchmarks/bench_training.py; the two jobs share memory bandwidth).
# When one finishes, the other is stopped (losing at most its current epoch) and resumes
# alone with all THREADS. A resumed run may thus mix thread counts; each epoch's record notes its threads.
while true; do
  mapfile -t todo < <(unfinished)
  if [ "${#todo[@]}" -eq 0 ]; then break; fi
  if [ "${PARALLEL:-0}" = 1 ] && [ "${#todo[@]}" -ge 2 ] && [ "$THREADS" -ge 2 ]; then
    ( train_one "${todo[0]}" $(( THREADS / 2 )) ) & a=$!
    ( train_one "${todo[1]}" $(( THREADS - THREADS / 2 )) ) & b=$!
    status=0
    wait -n "$a" "$b" || status=$?
    kill -TERM "$a" "$b" 2>/dev/null || true
    wait "$a" "$b" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then echo "error: a training job failed (exit $status)" >&2; exit "$status"; fi
  else
    ( train_one "${todo[0]}" "$THREADS" )
  fi
done
