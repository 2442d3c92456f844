#!/usr/bin/env bash
# The confidence-threshold router (benchmarks/rule_router.py), chosen on the 500 held-out training images
# (idx 49,500-49,999), judged by the replayed dual certificate at router N = HN, total alpha 0.001.
# The probe router (the sigma 1.0 expert's sorted probabilities at sigma_e SE) is scored on the held-out images at
# router N = HN (2,000, as zoo2_levers.sh); the rule's feature, thresholds and router-sets TAU are fitted by the
# replayed dual certificate -> benchmarks/results/rule-router/rule-se$SE.json and fit-se$SE.txt.
# No test run: the fit's split-half check did not carry its gain over (benchmarks/RESULTS.md). To certify a rule:
#   python benchmarks/rule_router.py write --rule RULE.json --expert E --sigma-e SE --experts A B C --out DIR, then
#   dualrs-route export DIR and ROUTER=DIR RESULTS=folder bash benchmarks/cifar_certify.sh.
# Resumable: each finished file is kept. Usage: bash benchmarks/rule_router.sh   (SE=1.0 HN=2000)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/zoo_common.sh
source benchmarks/zoo_common.sh
SE=${SE:-1.0}
HN=${HN:-2000}
THREADS=${THREADS:-2}
X=benchmarks/training/cifar10-resnet20-cr-sigma
EXPERTS=(${X}0.25 ${X}0.5 ${X}1.0)
WORK=runs/rule
OUT=benchmarks/results/rule-router
LEVERS=benchmarks/results/zoo2-levers
mkdir -p "$WORK" runs/zoo2-levers "$OUT"
hold=("$LEVERS"/holdout-expert-{0.25,0.5,1.0}.tsv)
for f in "${hold[@]}"; do
  [ -f "$f" ] || { echo "error: no $f; run: bash benchmarks/zoo2_levers.sh" >&2; exit 1; }
done
[ -f runs/zoo2-levers/holdout.npz ] || holdout_npz runs/zoo2-levers/holdout.npz
probe=$WORK/probe-se$SE
if [ ! -f "$probe/model.onnx" ]; then
  python benchmarks/rule_router.py probe --expert ${X}1.0 --sigma-e "$SE" --experts "${EXPERTS[@]}" --out "$probe"
  dualrs-route export "$probe" --to onnx
fi
scores=$WORK/holdout-probe-se$SE.npz
[ -f "$scores" ] || dualrs-route router-scores --router "$probe" --dataset npz:runs/zoo2-levers/holdout.npz \
  --router-N0 100 --router-N "$HN" --seed 0 --batch 400 --engine onnxruntime --threads "$THREADS" --quiet --out "$scores"
[ -f "$OUT/rule-se$SE.json" ] || python benchmarks/rule_router.py fit --scores "$scores" --expert-results "${hold[@]}" \
  --alpha 0.001 --step 0.05 --taus 2,0.05,0.2 --top 25 --out "$OUT/rule-se$SE.json" | tee "$OUT/fit-se$SE.txt"
