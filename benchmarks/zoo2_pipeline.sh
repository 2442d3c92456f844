#!/usr/bin/env bash
# Issue 12, end to end for the consistency zoo; every step is resumable, so re-running the same command after
# an interruption (or in the next session) continues where it stopped:
#   1. train the three consistency experts (benchmarks/train_zoo.sh; bf16 where the CPU has it natively);
#   2. export them to ONNX (the labels and certification run on ONNX Runtime);
#   3. router labels, N0 = 10, N = 100, on training images 0-9,999 plus 500 held-out (49,500-49,999)
#      into benchmarks/results/zoo2-labels/ (benchmarks/cifar_zoo.sh labels);
#   4. the router at sigma_e = 1.0 with the zoo router's recipe (benchmarks/cifar_zoo.sh router) into
#      router/zoo/cifar10-router-cr; the design levers are then measured on the held-out images
#      (router-scores / compose), never on test images;
#   5. levers: router variants (sigma_e 1.0 / 0.75 / 0.5, lambda) judged on the 500 held-out images, which
#      picks the router (benchmarks/zoo2_levers.sh -> benchmarks/results/zoo2-levers/choice.txt);
#   6. Cohen's 500 test images at N = 10,000: expert-<sigma>.tsv, then cascade.tsv and router.tsv composed
#      from them and the chosen router's scores, in benchmarks/results/cifar10/ (benchmarks/cifar_certify.sh).
# Usage: nohup bash benchmarks/zoo2_pipeline.sh > benchmarks/training/zoo2_pipeline.log 2>&1 &
# STEPS="train export labels router levers certify" picks steps (default: all, in that order).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
export DATA
STEPS=${STEPS:-train export labels router levers certify}
export EXPERTS=benchmarks/training/cifar10-resnet20-cr-sigma
export RUNS=benchmarks/results/zoo2-labels
export ROUTER=router/zoo/cifar10-router-cr
export LABEL_ENGINE=onnxruntime   # 2.3x the torch engine on Zen 5 (benchmarks/RESULTS.md, bench)
for step in $STEPS; do
  echo "== $step ($(date -u +%FT%TZ))"
  case $step in
    train) bash benchmarks/train_zoo.sh ;;
    export)
      for s in 0.25 0.5 1.0; do
        if [ ! -f "${EXPERTS}$s/config.json" ]; then echo "error: ${EXPERTS}$s is not trained yet" >&2; exit 1; fi
        if [ ! -f "${EXPERTS}$s/model.onnx" ]; then dualrs-route export "${EXPERTS}$s" --to onnx; fi
      done ;;
    labels) bash benchmarks/cifar_zoo.sh labels ;;
    router) bash benchmarks/cifar_zoo.sh router ;;
    levers) bash benchmarks/zoo2_levers.sh ;;
    certify)
      choice=benchmarks/results/zoo2-levers/choice.txt
      if [ -f "$choice" ]; then ROUTER=$(head -1 "$choice"); fi
      echo "router: $ROUTER"
      MAX=10000 RESULTS=benchmarks/results/cifar10 bash benchmarks/cifar_certify.sh ;;
    *) echo "unknown step $step (train export labels router levers certify)" >&2; exit 2 ;;
  esac
done
