#!/usr/bin/env bash
# Does a larger label budget help the CIFAR-10 router? A controlled comparison on 2 CPU cores.
#
# Two routers with the same recipe (sweep variant C: confidence_head from the sigma 1.0 expert, lambda 20,
# T 0.1, 20 epochs) on the same 2,000 training images (idx 0-1999); only the labels' budget differs:
#   N100:  the zoo's labels (N0 = 10, N = 100, benchmarks/results/zoo-labels/labels-train-2000.npz)
#   N1000: new labels, N0 = 10, N = 1,000 (keyed noise: the first 100 estimation samples are the same)
# Each router is judged by dual certification of the 500 held-out training images (idx 49,500-49,999,
# not test images; the experts trained on them, the routers did not) at N0 = 100, N = HN (default 2,000) per stage, total alpha = 0.001,
# ONNX Runtime fp32, as in benchmarks/router_sweep.sh.
# Cost on a 2-core CPU: labels about 47 min, each router about 4 min, each certification about 15 min.
# Usage: bash benchmarks/label_budget.sh     (resumable: the labels file resumes, finished steps are kept)
# Writes runs/label-budget/ (git-ignored) and $RESULTS/ (TSVs, table, training logs).
set -euo pipefail
cd "$(dirname "$0")/.."
HN=${HN:-2000}
EPOCHS=${EPOCHS:-20}
RESULTS=${RESULTS:-benchmarks/results/label-budget}
RUNS=runs/label-budget
# shellcheck source=benchmarks/zoo_common.sh
source benchmarks/zoo_common.sh
mkdir -p "$RUNS" "$RESULTS"
dualrs-route labels "${E[@]}" --dataset cifar10 --data "$DATA" --split train --max 2000 --N0 10 --N 1000 \
  --alpha 0.001 --seed 0 --batch 400 --chunk 32 --engine onnxruntime --threads 2 --quiet \
  --out "$RUNS/labels-train-2000-N1000.npz"
holdout_npz "$RUNS/holdout.npz"
for arm in N100 N1000; do
  if [ $arm = N100 ]; then labels=$ZOO_LABELS/labels-train-2000.npz; else labels=$RUNS/labels-train-2000-N1000.npz; fi
  if [ ! -f "$RUNS/router-$arm/model.onnx" ]; then
    dualrs-route train-router --labels "$labels" "${E[@]}" --init ${Z}1.0 --arch confidence_head \
      --arch-args '{"base": "cifar_resnet20", "base_classes": 10, "hidden": 32}' --sigma-e 1.0 --epochs "$EPOCHS" \
      --weight-decay 0.01 --eta 0.5 --seed 0 --threads 2 --data "$DATA" --holdout $ZOO_LABELS/labels-holdout-500.npz \
      --batch 64 --lr 0.001 --lambda 20 --temperature 0.1 --quiet --out "$RUNS/router-$arm" \
      > "$RESULTS/train-$arm.log" 2>&1
    dualrs-route export "$RUNS/router-$arm" --to onnx > /dev/null
  fi
  if [ ! -f "$RESULTS/holdout-router-$arm.tsv" ]; then
    dualrs-route certify --router "$RUNS/router-$arm" --dataset "npz:$RUNS/holdout.npz" --N0 100 --N "$HN" \
      --alpha 0.001 --seed 0 --batch 400 --engine onnxruntime --threads 2 --quiet \
      --out "$RESULTS/holdout-router-$arm.tsv" > /dev/null
  fi
done
S=benchmarks/results/router-sweep
dualrs-route analyze $S/holdout-expert-{0.25,0.5,1.0}.tsv $S/holdout-router-C.tsv "$RESULTS"/holdout-router-N100.tsv \
  "$RESULTS"/holdout-router-N1000.tsv --radii 0,0.25,0.5,0.75,1.0,1.25,1.5 | tee "$RESULTS/holdout-table.md"
for arm in N100 N1000; do echo "== $arm"; dualrs-route router-report --results "$RESULTS/holdout-router-$arm.tsv"; done \
  | tee "$RESULTS/holdout-bottleneck.txt"
