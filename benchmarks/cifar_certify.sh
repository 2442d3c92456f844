#!/usr/bin/env bash
# Certified accuracy on CIFAR-10 for the zoo: each expert alone, the trained router, and
# (from the per-expert files) the envelope and the oracle. Test images idx 0, 20, 40, ...
# below MAX (default 10000: Cohen's 500 images), N0 = 100, N = 10,000, total alpha = 0.001.
# Resumable: re-running continues every unfinished TSV.
# Usage: bash benchmarks/cifar_certify.sh        (needs the zoo: bash benchmarks/zoo2_pipeline.sh, or cifar_zoo.sh for the first one)
# On a GPU: ENGINE=torch DEVICE=cuda BATCH=10100 MAX=10000 bash benchmarks/cifar_certify.sh (500 images)
# ROUTER=folder certifies another router (ROUTER_SIGMAS="0.5 1.0": the experts it routes to, for a grouped router); RESULTS=folder writes the TSVs elsewhere; EXPERTS=prefix takes the
# experts PREFIX0.25, PREFIX0.5, PREFIX1.0. Default: the consistency zoo (benchmarks/training/cifar10-resnet20-cr-sigma,
# router router/zoo/cifar10-router-cr-se1.0-l80, results in benchmarks/results/cifar10); the first 6-epoch zoo:
# EXPERTS=experts/zoo/cifar10-resnet20-sigma ROUTER=router/zoo/cifar10-router RESULTS=benchmarks/results/cifar10/gaussian-zoo.
# Also writes cascade.tsv (the Multiscale cascade at
# p0 0.5, composed from the expert files' counts) and router.tsv (router-scores + compose, see below).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
MAX=${MAX:-10000}
THREADS=${THREADS:-2}
ENGINE=${ENGINE:-onnxruntime}
DEVICE=${DEVICE:-cpu}
BATCH=${BATCH:-400}
ROUTER=${ROUTER:-router/zoo/cifar10-router-cr-se1.0-l80}
RESULTS=${RESULTS:-benchmarks/results/cifar10}
EXPERTS=${EXPERTS:-benchmarks/training/cifar10-resnet20-cr-sigma}
if [ ! -f "$DATA/cifar10_test.npz" ]; then
  echo "skip: $DATA/cifar10_test.npz not found (set DATA=folder with cifar10_test.npz)" >&2
  exit 0
fi
mkdir -p "$RESULTS"
# ONNX Runtime fp32 draws the same keyed host noise as the torch CPU engine and gave identical
# certificates in every comparison (benchmarks/RESULTS.md), at ~1.6x its speed on this CPU.
if [ "$ENGINE" = onnxruntime ]; then
  for m in "${EXPERTS}0.25" "${EXPERTS}0.5" "${EXPERTS}1.0" "$ROUTER"; do
    if [ -f "$m/config.json" ] && [ ! -f "$m/model.onnx" ]; then dualrs-route export "$m" --to onnx; fi
  done
fi
common=(--dataset cifar10 --data "$DATA" --split test --skip 20 --max "$MAX" --N0 100 --N 10000 --alpha 0.001
        --seed 0 --batch "$BATCH" --threads "$THREADS" --engine "$ENGINE" --device "$DEVICE" --quiet)
if [ ! -f "$ROUTER/config.json" ]; then
  echo "no router at $ROUTER (bash benchmarks/cifar_zoo.sh router): certifying the experts only" >&2
fi
# PARALLEL=1 runs the certifications at once (a GPU is far from busy with one ResNet-20 stream)
pids=()
run() { if [ "${PARALLEL:-0}" = 1 ]; then "$@" & pids+=($!); else "$@"; fi; }
for s in 0.25 0.5 1.0; do
  run dualrs-route certify --expert "${EXPERTS}$s" "${common[@]}" --out "$RESULTS/expert-$s.tsv"
done
# The router's network on its own N0 + N noisy copies (the expensive half of dual CERTIFY); its expert
# stage is then re-derived from the expert files (compose: the rows `certify --router` gives, tested).
# ROUTER_MODE=certify runs `certify --router` instead (about one more expert's samples per image).
if [ -f "$ROUTER/config.json" ] && [ "${ROUTER_MODE:-compose}" = compose ]; then
  # a finished scores file is kept (compose checks that it is this router's); unfinished parts resume
  [ -f "$RESULTS/router-scores.npz" ] || run dualrs-route router-scores --router "$ROUTER" --dataset cifar10 \
    --data "$DATA" --split test --skip 20 --max "$MAX" --router-N0 100 --router-N 10000 --seed 0 --batch "$BATCH" \
    --threads "$THREADS" --engine "$ENGINE" --device "$DEVICE" --quiet --out "$RESULTS/router-scores.npz"
elif [ -f "$ROUTER/config.json" ]; then
  run dualrs-route certify --router "$ROUTER" "${common[@]}" --out "$RESULTS/router.tsv"
fi
for pid in "${pids[@]}"; do wait "$pid"; done
experts=(--expert-results "$RESULTS/expert-0.25.tsv" --expert-results "$RESULTS/expert-0.5.tsv"
         --expert-results "$RESULTS/expert-1.0.tsv")
# The cascade reads each expert's guess and counts: the rows of `certify --select cascade`, no new samples.
dualrs-route compose-cascade "${experts[@]}" --alpha 0.001 --cascade-p0 0.5 --out "$RESULTS/cascade.tsv" --force
if [ -f "$ROUTER/config.json" ] && [ "${ROUTER_MODE:-compose}" = compose ]; then
  routed=()  # the router's own experts, in its order (ROUTER_SIGMAS: a grouped router routes to fewer)
  for s in ${ROUTER_SIGMAS:-0.25 0.5 1.0}; do routed+=(--expert-results "$RESULTS/expert-$s.tsv"); done
  dualrs-route compose --router "$ROUTER" --scores "$RESULTS/router-scores.npz" "${routed[@]}" --alpha 0.001 \
    --out "$RESULTS/router.tsv" --force
fi
if [ ! -f "$ROUTER/config.json" ]; then exit 0; fi
dualrs-route analyze "$RESULTS"/expert-0.25.tsv "$RESULTS"/expert-0.5.tsv "$RESULTS"/expert-1.0.tsv "$RESULTS"/cascade.tsv \
  "$RESULTS"/router.tsv \
  --radii 0,0.25,0.5,0.75,1.0,1.25,1.5
