#!/usr/bin/env bash
# Router design for the consistency zoo (issue 12), chosen on the 500 held-out training images only
# (idx 49,500-49,999: no router trained on them, but every expert did; never test images), each variant judged by its replayed dual
# certificate (router-scores + compose: the exact rows of certify --router, tested), total alpha 0.001:
#   experts   each consistency expert alone, certify N0 = 100, N = HN (default 2,000); the files keep their
#             counts, so the Multiscale cascade is composed from them (compose-cascade) at p0 0.5-0.8
#   se1.0     the pipeline's router (zoo2_pipeline.sh: C's recipe, sigma_e 1.0, --init the sigma 1.0 expert)
#   se0.75    C's recipe trained end to end at sigma_e 0.75 (--init the sigma 1.0 expert)
#   se0.5     C's recipe at sigma_e 0.5 (--init the sigma 0.5 expert)
#   se1.0-l5 / se1.0-l80   the consistency weight lambda 5 and 80 instead of 20
#   se1.25-l80 / se1.5-l80 lambda 80 at sigma_e 1.25 and 1.5 (ACR rose with sigma_e from 0.5 to 1.0)
#   router N  each router at N = HN and at N = 1,000 (the first 1,000 estimation samples of the same streams)
#   offsets   calibrate-router's logit offsets per router, with its split-half check (calibrate-VARIANT.txt)
# Resumable: every finished file is kept (delete one to redo it). Needs the pipeline's labels and router:
#   STEPS="train export labels router" bash benchmarks/zoo2_pipeline.sh
# Usage: bash benchmarks/zoo2_levers.sh        (VARIANTS="se1.0 se0.5 se0.75 se1.0-l5 se1.0-l80" HN=2000 [PRECISION=fp32|bf16])
# Writes benchmarks/results/zoo2-levers/: holdout-*.tsv (+ .json), holdout-table.md, holdout-bottleneck.txt;
# choice.txt: the router with the best held-out ACR at router N = HN (read by zoo2_pipeline.sh's certify step);
# the variants' folders are router/zoo/cifar10-router-cr[-VARIANT], their scores in the git-ignored runs/zoo2-levers/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/zoo_common.sh
source benchmarks/zoo_common.sh
HN=${HN:-2000}
THREADS=${THREADS:-2}
VARIANTS=${VARIANTS:-"se1.0 se0.5 se0.75 se1.0-l5 se1.0-l80"}
# bf16 autocast where this CPU has native bf16 (as the pipeline's router step), else fp32
if python3 -c "import sys; from dualrs_route.experts.training import bf16_supported; sys.exit(not bf16_supported())"; then
  PRECISION=${PRECISION:-bf16}
else
  PRECISION=${PRECISION:-fp32}
fi
X=benchmarks/training/cifar10-resnet20-cr-sigma
CR=(--expert ${X}0.25 --expert ${X}0.5 --expert ${X}1.0)
LABELS_DIR=benchmarks/results/zoo2-labels
LABELS=(--labels $LABELS_DIR/labels-train-2000.npz --labels $LABELS_DIR/labels-train-2000-8000.npz)
WORK=${WORK:-runs/zoo2-levers}
OUT=benchmarks/results/zoo2-levers
mkdir -p "$WORK" "$OUT"
for f in $LABELS_DIR/labels-train-2000.npz $LABELS_DIR/labels-train-2000-8000.npz; do
  [ -f "$f" ] || { echo "error: no $f; run: STEPS='train export labels' bash benchmarks/zoo2_pipeline.sh" >&2; exit 1; }
done
[ -f "$WORK/holdout.npz" ] || holdout_npz "$WORK/holdout.npz"
# 1. the experts' held-out certificates (with guess and counts)
hold=()
for s in 0.25 0.5 1.0; do
  dualrs-route certify --expert ${X}$s --dataset "npz:$WORK/holdout.npz" --N0 100 --N "$HN" --alpha 0.001 --seed 0 \
    --batch 400 --threads "$THREADS" --engine onnxruntime --quiet --out "$OUT/holdout-expert-$s.tsv"
  hold+=(--expert-results "$OUT/holdout-expert-$s.tsv")
done
# 2. the cascade baseline, its p0 chosen here too (free: composed from the expert files)
for p0 in 0.5 0.6 0.7 0.8; do
  dualrs-route compose-cascade "${hold[@]}" --alpha 0.001 --cascade-p0 $p0 --force --out "$OUT/holdout-cascade-p$p0.tsv"
done
# 3. router variants (C's recipe: confidence_head on a whole ResNet-20 expert, T 0.1, batch 64, lr 1e-3)
recipe() {  # recipe VARIANT -> train-router options beyond the common ones
  case $1 in
    se1.0) echo "--sigma-e 1.0 --init ${X}1.0 --lambda 20" ;;
    se0.75) echo "--sigma-e 0.75 --init ${X}1.0 --lambda 20" ;;
    se0.5) echo "--sigma-e 0.5 --init ${X}0.5 --lambda 20" ;;
    se1.0-l5) echo "--sigma-e 1.0 --init ${X}1.0 --lambda 5" ;;
    se1.0-l80) echo "--sigma-e 1.0 --init ${X}1.0 --lambda 80" ;;
    se1.25-l80) echo "--sigma-e 1.25 --init ${X}1.0 --lambda 80" ;;
    se1.5-l80) echo "--sigma-e 1.5 --init ${X}1.0 --lambda 80" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}
# se1.0 is the pipeline's router; the others sit beside it, so that the chosen one is committed as is
# (a router lists its experts relative to its own folder)
router_of() { if [ "$1" = se1.0 ]; then echo router/zoo/cifar10-router-cr; else echo router/zoo/cifar10-router-cr-$1; fi; }
for v in $VARIANTS; do
  R=$(router_of "$v")
  if [ ! -f "$R/config.json" ]; then
    # shellcheck disable=SC2046
    dualrs-route train-router "${LABELS[@]}" "${CR[@]}" $(recipe "$v") --arch confidence_head \
      --arch-args '{"base": "cifar_resnet20", "base_classes": 10, "hidden": 32}' --epochs 20 --weight-decay 0.01 \
      --eta 0.5 --seed 0 --threads "$THREADS" --precision "$PRECISION" --data "$DATA" --batch 64 --lr 0.001 --temperature 0.1 \
      --holdout $LABELS_DIR/labels-holdout-500.npz --quiet --out "$R" > "$OUT/train-$v.log" 2>&1
  fi
  [ -f "$R/model.onnx" ] || dualrs-route export "$R" --to onnx
  S=$WORK/scores-$v.npz
  [ -f "$S" ] || dualrs-route router-scores --router "$R" --dataset "npz:$WORK/holdout.npz" --router-N0 100 \
    --router-N "$HN" --seed 0 --batch 400 --engine onnxruntime --threads "$THREADS" --quiet --out "$S"
  dualrs-route compose --router "$R" --scores "$S" "${hold[@]}" --alpha 0.001 --force --out "$OUT/holdout-$v-N$HN.tsv"
  # router N = 1,000: the first 1,000 estimation samples of the same streams
  [ -f "$WORK/scores-$v-N1000.npz" ] || scores_prefix "$S" "$WORK/scores-$v-N1000.npz" 1000
  dualrs-route compose --router "$R" --scores "$WORK/scores-$v-N1000.npz" "${hold[@]}" --alpha 0.001 --force \
    --out "$OUT/holdout-$v-N1000.tsv"
  # logit offsets (calibrate-router): reported with their split-half check, not used for the choice
  [ -f "$OUT/calibrate-$v.txt" ] || dualrs-route calibrate-router --router "$R" --scores "$S" "${hold[@]}" \
    --alpha 0.001 --grid=-2:2:0.5 --quiet --force --out "$WORK/calibrated-$v" > "$OUT/calibrate-$v.txt"
done
dualrs-route analyze "$OUT"/holdout-expert-{0.25,0.5,1.0}.tsv "$OUT"/holdout-cascade-p*.tsv "$OUT"/holdout-se*.tsv \
  --radii 0,0.25,0.5,0.75,1.0,1.25,1.5 | tee "$OUT/holdout-table.md"
for f in "$OUT"/holdout-se*-N"$HN".tsv; do echo "== $f"; dualrs-route router-report --results "$f"; done \
  | tee "$OUT/holdout-bottleneck.txt"
# the choice: the best held-out ACR at router N = HN over every variant measured so far (this run's VARIANTS
# and earlier runs' files; ties: the earlier variant in ALL_VARIANTS)
ALL_VARIANTS="se1.0 se0.5 se0.75 se1.0-l5 se1.0-l80 se1.25-l80 se1.5-l80"
measured=""
for v in $ALL_VARIANTS; do [ -f "$OUT/holdout-$v-N$HN.tsv" ] && measured="$measured $v"; done
best=""; best_acr=-1
for v in $measured; do
  acr=$(python3 -c "
import sys
from dualrs_route.router.results import read_results
t = read_results(sys.argv[1]); print(float((t.radius * t.correct).mean()))" "$OUT/holdout-$v-N$HN.tsv")
  if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$acr" "$best_acr"; then
    best=$v; best_acr=$acr
  fi
done
printf '%s\n%s\n' "$(router_of "$best")" "variant $best: held-out ACR $best_acr at router N = $HN (of:$measured)" \
  | tee "$OUT/choice.txt"
