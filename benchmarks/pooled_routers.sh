#!/usr/bin/env bash
# Lever (issue 12): routers on block means of the image (--arch pooled_mlp), chosen on the 500 held-out training
# images (idx 49,500-49,999) by the replayed dual certificate, plain and with router sets (TAU 0.05), at router
# N = HN (2,000, as zoo2_levers.sh), total alpha 0.001.
# Why: a block mean of pool^2 pixels moves by at most ||delta|| / pool, and carries noise sigma_e / pool, so the
# router sees a nearly clean low-resolution image even at a large sigma_e, which raises the cap on R_sigma
# (about 3.2 sigma_e at N = 10,000).
# pool 8: 0.16 MFLOP per sample against ResNet-20's 81.6 (520x fewer); training takes 1 s per epoch here and scoring
# the 500 images at N = 2,000 about 40 s (noise generation bound).
# Variants (NAME:POOL:SIGMA_E:LAMBDA[:EXTRA train-router options]); hidden widths 256, 256; 60 epochs, batch 256,
# lr 1e-3, T 0.1, eta 0.5, no crop/flip (the labels belong to the exact images), the pipeline's 10,000 labels.
# Writes benchmarks/results/pooled-routers/NAME.md (router_sets.py's table) and NAME.json (the config with its
# training history); folders and scores in the git-ignored runs/pooled/. Resumable: finished files are kept.
# Usage: bash benchmarks/pooled_routers.sh        (VARIANTS="p8-se2.0:8:2.0:20 ..." HN=2000)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/zoo_common.sh
source benchmarks/zoo_common.sh
HN=${HN:-2000}
THREADS=${THREADS:-2}
VARIANTS=${VARIANTS:-"p8-se1.0:8:1.0:20 p8-se2.0:8:2.0:20 p16-se1.0:16:1.0:20 p16-se2.0:16:2.0:20 p4-se1.0:4:1.0:20
p8-se1.0-l80:8:1.0:80 p8-se2.0-l80:8:2.0:80 p8-se2.0-nobal:8:2.0:20:--no-class-balance p8-se3.0:8:3.0:20"}
X=benchmarks/training/cifar10-resnet20-cr-sigma
LD=benchmarks/results/zoo2-labels
L=benchmarks/results/zoo2-levers/holdout-expert-
WORK=runs/pooled
OUT=benchmarks/results/pooled-routers
mkdir -p "$WORK" "$OUT" runs/zoo2-levers
for f in $LD/labels-train-2000.npz $LD/labels-train-2000-8000.npz $LD/labels-holdout-500.npz ${L}0.25.tsv ${L}0.5.tsv \
         ${L}1.0.tsv; do
  [ -f "$f" ] || { echo "error: no $f; run: STEPS='train export labels' bash benchmarks/zoo2_pipeline.sh and bash benchmarks/zoo2_levers.sh" >&2; exit 1; }
done
[ -f runs/zoo2-levers/holdout.npz ] || holdout_npz runs/zoo2-levers/holdout.npz
for v in $VARIANTS; do
  IFS=: read -r name pool se lam extra <<< "$v"
  R=$WORK/$name
  if [ ! -f "$R/model.onnx" ]; then
    # shellcheck disable=SC2086
    dualrs-route train-router --labels $LD/labels-train-2000.npz --labels $LD/labels-train-2000-8000.npz \
      --expert ${X}0.25 --expert ${X}0.5 --expert ${X}1.0 --sigma-e "$se" --arch pooled_mlp \
      --arch-args "{\"pool\": $pool, \"hidden\": [256, 256]}" --epochs 60 --batch 256 --lr 0.001 --lambda "$lam" \
      --eta 0.5 --temperature 0.1 --no-augment ${extra:-} --seed 0 --threads "$THREADS" --data "$DATA" --quiet --out "$R"
    dualrs-route export "$R" --to onnx
  fi
  S=$WORK/scores-$name.npz
  [ -f "$S" ] || dualrs-route router-scores --router "$R" --dataset npz:runs/zoo2-levers/holdout.npz --router-N0 100 \
    --router-N "$HN" --seed 0 --batch 2100 --engine onnxruntime --threads "$THREADS" --quiet --out "$S"
  [ -f "$OUT/$name.md" ] || python benchmarks/router_sets.py --router "$R" --scores "$S" --expert-results ${L}0.25.tsv \
    --expert-results ${L}0.5.tsv --expert-results ${L}1.0.tsv --tau 2 0.05 > "$OUT/$name.md"
  cp "$R/config.json" "$OUT/$name.json"
done
for v in $VARIANTS; do
  name=${v%%:*}
  echo "== $name"; grep -E "^\| (dual|set, tau 0.05)" "$OUT/$name.md"
done
