#!/usr/bin/env bash
# Calibrate the CIFAR-10 zoo router (per-expert logit offsets chosen on 500 held-out training
# images) and evaluate it on the test images of benchmarks/results/cifar10/gaussian-zoo (idx 0, 20, ..., 9980).
#
# 1. router scores on the held-out images (N0 = 100, N = 2,000: the budget of router_sweep.sh),
# 2. calibrate-router against the experts' held-out certificates (benchmarks/results/router-sweep),
# 3. router scores on the 500 test images (N0 = 100, N = 10,000),
# 4. compose: the dual certificates of the calibrated router (and, as a cross-check, of the
#    uncalibrated one) with the experts' test certificates from benchmarks/results/cifar10/gaussian-zoo,
# 5. analyze.
# The offsets are fixed in step 2, before any test image is scored. Resumable (router-scores resumes;
# finished steps are skipped). Stops after step 2 when the best offsets are 0, unless CROSSCHECK=1
# (then steps 3-5 replay the uncalibrated router with this machine's noise). About 10 + 48 min of
# ONNX Runtime on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/zoo_common.sh
WORK=${WORK:-runs/calibrate}
ROUTER=${ROUTER:-router/zoo/cifar10-router}
OUT=${OUT:-$WORK/cifar10-router-calibrated}
RESULTS=benchmarks/results/cifar10/gaussian-zoo
SWEEP=benchmarks/results/router-sweep
THREADS=${THREADS:-2}
mkdir -p "$WORK" benchmarks/results/calibrate
[ -f "$WORK/holdout.npz" ] || holdout_npz "$WORK/holdout.npz"
[ -f "$ROUTER/model.onnx" ] || dualrs-route export "$ROUTER" --to onnx
scores() {  # scores OUT DATASET-OPTIONS...
  local out=$1; shift
  [ -f "$out" ] || dualrs-route router-scores --router "$ROUTER" "$@" --seed 0 --batch 400 --engine onnxruntime \
    --threads "$THREADS" --out "$out"
}
scores "$WORK/holdout-scores.npz" --dataset "npz:$WORK/holdout.npz" --router-N0 100 --router-N 2000
hold=(); test=()
for s in 0.25 0.5 1.0; do
  hold+=(--expert-results "$SWEEP/holdout-expert-$s.tsv"); test+=(--expert-results "$RESULTS/expert-$s.tsv")
done
if [ ! -f "$OUT/config.json" ]; then
  dualrs-route calibrate-router --router "$ROUTER" --scores "$WORK/holdout-scores.npz" "${hold[@]}" --alpha 0.001 --force \
    --out "$OUT" | tee benchmarks/results/calibrate/calibrate.txt
fi
python3 -c "import json, sys; json.dump(json.load(open(sys.argv[1]))['calibration'], open(sys.argv[2], 'w'), indent=1)" \
  "$OUT/config.json" benchmarks/results/calibrate/calibration-record.json
zero=$(python3 -c "import json, sys; print(int(not any(json.load(open(sys.argv[1]))['logit_offsets'])))" "$OUT/config.json")
if [ "$zero" = 1 ] && [ "${CROSSCHECK:-0}" != 1 ]; then
  echo "the held-out optimum is offsets 0: the calibrated router is the uncalibrated one; nothing to evaluate" \
    "(CROSSCHECK=1 still replays the uncalibrated router on the test images)" >&2
  exit 0
fi
scores "$WORK/test-scores.npz" --dataset cifar10 --data "$DATA" --split test --skip 20 --max 10000 \
  --router-N0 100 --router-N 10000
files=("$RESULTS"/expert-0.25.tsv "$RESULTS"/expert-0.5.tsv "$RESULTS"/expert-1.0.tsv "$RESULTS"/router.tsv)
if [ "$zero" = 0 ]; then
  dualrs-route compose --router "$OUT" --scores "$WORK/test-scores.npz" "${test[@]}" --alpha 0.001 --force \
    --out "$RESULTS/router-calibrated.tsv"
  files+=("$RESULTS/router-calibrated.tsv")
fi
# the uncalibrated router again, with this machine's router noise: how much the router row moves with its noise
dualrs-route compose --router "$ROUTER" --scores "$WORK/test-scores.npz" "${test[@]}" --alpha 0.001 --force \
  --out benchmarks/results/calibrate/router-uncalibrated-cpu.tsv
files+=(benchmarks/results/calibrate/router-uncalibrated-cpu.tsv)
dualrs-route analyze "${files[@]}" --radii 0,0.25,0.5,0.75,1.0,1.25,1.5 | tee benchmarks/results/calibrate/test-table.md
