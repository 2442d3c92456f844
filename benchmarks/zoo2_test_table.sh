#!/usr/bin/env bash
# Issue 12's test table, from the certify step's files (STEPS=certify bash benchmarks/zoo2_pipeline.sh): Cohen's
# 500 test images, N0 = 100, N = 10,000, total alpha 0.001. No new samples: everything here is composed or read.
#   router-sets.tsv   the chosen router with set-valued certificates at TAU (default 0.05, chosen on the held-out
#                     images: benchmarks/results/zoo2-levers/), composed from its scores and the expert files
#   test-table.md     dualrs-route analyze: each expert, the cascade, the router (plain dual and with sets),
#                     the envelope, the oracle and the share of the oracle's gain each router row captures
#   bottleneck.txt    dualrs-route router-report --results: how often R_sigma < R_c
# Usage: bash benchmarks/zoo2_test_table.sh      (RESULTS=folder TAU=0.05 ROUTER=folder ROUTER_SIGMAS="0.25 0.5 1.0")
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/cifar10}
TAU=${TAU:-0.05}
choice=benchmarks/results/zoo2-levers/choice.txt
ROUTER=${ROUTER:-$(head -1 "$choice")}
for f in expert-0.25.tsv expert-0.5.tsv expert-1.0.tsv cascade.tsv router.tsv; do
  [ -f "$RESULTS/$f" ] || { echo "error: no $RESULTS/$f; run: STEPS=certify bash benchmarks/zoo2_pipeline.sh" >&2; exit 1; }
done
experts=()  # the router's own experts, in its order (ROUTER_SIGMAS: a grouped router routes to fewer)
for s in ${ROUTER_SIGMAS:-0.25 0.5 1.0}; do experts+=(--expert-results "$RESULTS/expert-$s.tsv"); done
if [ ! -f "$RESULTS/router-sets.tsv" ]; then
  [ -f "$RESULTS/router-scores.npz" ] || { echo "error: no $RESULTS/router-scores.npz (git-ignored: 60 MB); rerun the" \
    "certify step to score the router again" >&2; exit 1; }
  dualrs-route compose --router "$ROUTER" --scores "$RESULTS/router-scores.npz" "${experts[@]}" --alpha 0.001 \
    --router-sets "$TAU" --out "$RESULTS/router-sets.tsv"
fi
dualrs-route analyze "$RESULTS"/expert-{0.25,0.5,1.0}.tsv "$RESULTS/cascade.tsv" "$RESULTS/router.tsv" \
  "$RESULTS/router-sets.tsv" --radii 0,0.25,0.5,0.75,1.0,1.25,1.5 | tee "$RESULTS/test-table.md"
for f in router.tsv router-sets.tsv; do echo "== $f"; dualrs-route router-report --results "$RESULTS/$f"; done \
  | tee "$RESULTS/bottleneck.txt"
