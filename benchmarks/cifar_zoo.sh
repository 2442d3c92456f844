#!/usr/bin/env bash
# Rebuild the CIFAR-10 zoo (three Gaussian-augmentation experts + one router) from ../shared/data.
# Resumable: finished folders are skipped and an interrupted training resumes from its checkpoint.
# Usage: bash benchmarks/cifar_zoo.sh [experts|labels|router|all]   (default: all)
# The consistency zoo (trained by benchmarks/train_zoo.sh): EXPERTS=benchmarks/training/cifar10-resnet20-cr-sigma
# RUNS=benchmarks/results/zoo2-labels ROUTER=router/zoo/cifar10-router-cr bash benchmarks/cifar_zoo.sh labels (then router)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
THREADS=${THREADS:-2}
EPOCHS=${EPOCHS:-6}
ZOO=experts/zoo
EXPERTS=${EXPERTS:-$ZOO/cifar10-resnet20-sigma}   # the experts are ${EXPERTS}0.25, ${EXPERTS}0.5, ${EXPERTS}1.0
if [ ! -f "$DATA/cifar10_train.npz" ]; then
  echo "skip: $DATA/cifar10_train.npz not found (set DATA=folder with cifar10_train.npz/cifar10_test.npz)" >&2
  exit 0
fi
stage=${1:-all}
if [ "$stage" = experts ] || [ "$stage" = all ]; then
  if [ "$EXPERTS" != "$ZOO/cifar10-resnet20-sigma" ]; then
    echo "the experts stage trains the 6-epoch Gaussian zoo into $ZOO only; train ${EXPERTS}* with benchmarks/train_zoo.sh" >&2
    [ "$stage" = experts ] && exit 1
  else
  for s in 0.25 0.5 1.0; do
    out=${EXPERTS}$s
    if [ -f "$out/config.json" ]; then echo "have $out"; continue; fi
    dualrs-route train-expert --dataset cifar10 --data "$DATA" --sigma $s --arch cifar_resnet20 \
      --epochs "$EPOCHS" --batch 128 --lr 0.1 --seed 0 --threads "$THREADS" --out "$out"
  done
  fi
fi
# --- router labels and router (issue 4) ---
# labels: each expert certified with N0 = 10, N = 100, alpha = 0.001 on the first LABEL_IMAGES training
# images (CIFAR-10's training order is already shuffled), plus HOLDOUT_IMAGES held-out training images from
# index 49,500 on for the routing diagnostics (no router trains on them, the experts do; never test images). ~330 ResNet-20 forwards
# per image: LABEL_IMAGES=2000 is about 12 min on 2 free cores (torch engine); the MORE_IMAGES that follow
# them go to a second file with ONNX Runtime (about 0.2 s per image: 8,000 in ~28 min). Together they are the
# first 10,000 training images, the paper's 20% (it reports that 20% loses little).
# The labels files are rewritten atomically after every chunk; re-running continues a killed run.
LABEL_IMAGES=${LABEL_IMAGES:-2000}
MORE_IMAGES=${MORE_IMAGES:-8000}
HOLDOUT_IMAGES=${HOLDOUT_IMAGES:-500}
LABEL_ENGINE=${LABEL_ENGINE:-auto}   # the first LABEL_IMAGES and the held-out labels (auto = torch for safetensors folders)
ROUTER_EPOCHS=${ROUTER_EPOCHS:-20}
ROUTER_DEVICE=${ROUTER_DEVICE:-cpu}   # cuda: the committed router was trained there
ROUTER_EXTRA=${ROUTER_EXTRA:-}   # e.g. "--temperature 0.1": extra train-router options (recorded in config.json)
# auto: bf16 autocast on a CPU with native bf16 (avx512_bf16 / amx_bf16), else fp32; GPU runs train in fp32
ROUTER_PRECISION=${ROUTER_PRECISION:-auto}
if [ "$ROUTER_PRECISION" = auto ]; then
  if [ "$ROUTER_DEVICE" = cpu ] && python3 -c "import sys; from dualrs_route.experts.training import bf16_supported; sys.exit(not bf16_supported())"; then
    ROUTER_PRECISION=bf16
  else
    ROUTER_PRECISION=fp32
  fi
fi
RUNS=${RUNS:-benchmarks/results/zoo-labels}   # committed (small; radii, labels and indices only, no images) so a later session can resume
ROUTER=${ROUTER:-router/zoo/cifar10-router}
CIFAR_EXPERTS=(--expert "${EXPERTS}0.25" --expert "${EXPERTS}0.5" --expert "${EXPERTS}1.0")
need_experts() {
  for s in 0.25 0.5 1.0; do
    if [ ! -f "${EXPERTS}$s/config.json" ]; then
      echo "error: ${EXPERTS}$s is not trained yet (bash benchmarks/cifar_zoo.sh experts, or benchmarks/train_zoo.sh)" >&2
      exit 1
    fi
  done
}
if [ "$stage" = labels ] || [ "$stage" = all ]; then
  need_experts
  mkdir -p "$RUNS"
  dualrs-route labels "${CIFAR_EXPERTS[@]}" --dataset cifar10 --data "$DATA" --split train --max "$LABEL_IMAGES" \
    --N0 10 --N 100 --alpha 0.001 --seed 0 --batch 400 --chunk 32 --threads "$THREADS" --engine "$LABEL_ENGINE" \
    --out "$RUNS/labels-train-$LABEL_IMAGES.npz"
  if [ "$MORE_IMAGES" -gt 0 ]; then
    dualrs-route labels "${CIFAR_EXPERTS[@]}" --dataset cifar10 --data "$DATA" --split train --start "$LABEL_IMAGES" \
      --max "$MORE_IMAGES" --N0 10 --N 100 --alpha 0.001 --seed 0 --batch 400 --chunk 32 --engine onnxruntime \
      --threads "$THREADS" --out "$RUNS/labels-train-$LABEL_IMAGES-$MORE_IMAGES.npz"
  fi
  if [ "$HOLDOUT_IMAGES" -gt 0 ]; then
    dualrs-route labels "${CIFAR_EXPERTS[@]}" --dataset cifar10 --data "$DATA" --split train --start 49500 \
      --max "$HOLDOUT_IMAGES" --N0 10 --N 100 --alpha 0.001 --seed 0 --batch 400 --chunk 32 --threads "$THREADS" \
      --engine "$LABEL_ENGINE" \
      --out "$RUNS/labels-holdout-$HOLDOUT_IMAGES.npz"
  fi
fi
if [ "$stage" = router ] || [ "$stage" = all ]; then
  need_experts
  if [ -f "$ROUTER/config.json" ]; then
    echo "have $ROUTER"
  else
    labels=(--labels "$RUNS/labels-train-$LABEL_IMAGES.npz")
    if [ "$MORE_IMAGES" -gt 0 ]; then labels+=(--labels "$RUNS/labels-train-$LABEL_IMAGES-$MORE_IMAGES.npz"); fi
    for f in "${labels[@]}"; do
      if [ "$f" != --labels ] && [ ! -f "$f" ]; then echo "error: no $f; run: bash benchmarks/cifar_zoo.sh labels" >&2; exit 1; fi
    done
    holdout=()
    if [ -f "$RUNS/labels-holdout-$HOLDOUT_IMAGES.npz" ]; then holdout=(--holdout "$RUNS/labels-holdout-$HOLDOUT_IMAGES.npz"); fi
    # The router is the sigma = 1.0 expert's ResNet-20 (all of it, --init) with a small MLP on its sorted class
    # probabilities (confidence_head), at sigma_e = 1.0 = the largest expert sigma (the paper's requirement).
    # T = 0.1 sharpens the soft labels (radii differ by ~0.1-0.3); lambda = 20 was the best of eight variants
    # (lambda 4-40, T 0.1-1, with and without class balance) by dual-certified ACR on the 500 held-out images
    # (benchmarks/results/router-sweep/). The committed router was trained on an H100 (ROUTER_DEVICE=cuda,
    # 146 s); on 2 CPU cores expect about 50 s per epoch, and a different noise stream (same recipe).
    # shellcheck disable=SC2086
    dualrs-route train-router "${labels[@]}" "${CIFAR_EXPERTS[@]}" --init "${EXPERTS}1.0" \
      --arch confidence_head --arch-args '{"base": "cifar_resnet20", "base_classes": 10, "hidden": 32}' \
      --sigma-e 1.0 --epochs "$ROUTER_EPOCHS" --weight-decay 0.01 --eta 0.5 --seed 0 --threads "$THREADS" \
      --device "$ROUTER_DEVICE" --precision "$ROUTER_PRECISION" --data "$DATA" "${holdout[@]}" --batch 64 --lr 0.001 --lambda 20 --temperature 0.1 \
      $ROUTER_EXTRA --out "$ROUTER"
  fi
fi
