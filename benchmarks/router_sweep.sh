#!/usr/bin/env bash
# Router variants for the CIFAR-10 zoo, trained side by side and judged by dual certification on the
# 500 held-out training images (idx 49,500-49,999: not test images; the experts trained on them, the routers did not), at N0 = 100,
# N = HN (default 2,000) per stage, total alpha = 0.001. Picks nothing itself: compare the ACR column.
# Made for a GPU (DEVICE=cuda: the eight trainings and eleven certifications run at once, ~6 min on an
# H100); on 2 CPU cores run fewer variants (VARIANTS="C") and expect hours.
# Usage: DEVICE=cuda bash benchmarks/router_sweep.sh      (needs the zoo and its labels: benchmarks/cifar_zoo.sh)
# Writes router/zoo/sweep-<V> folders (not committed) and $RESULTS/holdout-*.tsv, holdout-table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
EPOCHS=${EPOCHS:-20}
HN=${HN:-2000}
VARIANTS=${VARIANTS:-"A B C D E F G H"}
RESULTS=${RESULTS:-benchmarks/results/router-sweep}
RUNS=benchmarks/results/zoo-labels
# shellcheck source=benchmarks/zoo_common.sh
source benchmarks/zoo_common.sh
LABELS=(--labels $RUNS/labels-train-2000.npz --labels $RUNS/labels-train-2000-8000.npz)
declare -A RECIPE=(
  [A]="--lambda 4 --temperature 0.1"  [B]="--lambda 10 --temperature 0.1" [C]="--lambda 20 --temperature 0.1"
  [D]="--lambda 40 --temperature 0.1" [E]="--lambda 4 --temperature 0.25" [F]="--lambda 10 --temperature 0.25"
  [G]="--lambda 10 --temperature 0.1 --no-class-balance" [H]="--lambda 40 --temperature 1.0")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
# the held-out images as an npz for `certify --dataset npz:` (a temporary copy, outside the repository)
holdout_npz "$WORK/holdout.npz"
pids=()
for v in $VARIANTS; do
  # shellcheck disable=SC2086
  dualrs-route train-router "${LABELS[@]}" "${E[@]}" --init ${Z}1.0 --arch confidence_head \
    --arch-args '{"base": "cifar_resnet20", "base_classes": 10, "hidden": 32}' --sigma-e 1.0 --epochs "$EPOCHS" \
    --weight-decay 0.01 --eta 0.5 --seed 0 --threads 2 --device "$DEVICE" --data "$DATA" \
    --holdout $RUNS/labels-holdout-500.npz --batch 64 --lr 0.001 ${RECIPE[$v]} --quiet \
    --out router/zoo/sweep-$v > "$RESULTS/train-$v.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
cert() {  # name, then the model options
  local name=$1; shift
  dualrs-route certify "$@" --dataset "npz:$WORK/holdout.npz" --N0 100 --N "$HN" --alpha 0.001 --seed 0 \
    --batch $(( HN + 100 )) --device "$DEVICE" --engine torch --quiet --out "$RESULTS/holdout-$name.tsv" > /dev/null
}
pids=()
for s in 0.25 0.5 1.0; do cert expert-$s --expert ${Z}$s & pids+=($!); done
for v in $VARIANTS; do cert router-$v --router router/zoo/sweep-$v & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
dualrs-route analyze "$RESULTS"/holdout-expert-{0.25,0.5,1.0}.tsv "$RESULTS"/holdout-router-*.tsv \
  --radii 0,0.25,0.5,0.75,1.0,1.25,1.5 | tee "$RESULTS/holdout-table.md"
for v in $VARIANTS; do echo "== $v"; dualrs-route router-report --results "$RESULTS/holdout-router-$v.tsv"; done \
  | tee "$RESULTS/holdout-bottleneck.txt"
