#!/usr/bin/env bash
# Cheap levers on the trained CIFAR-10 router, each judged on the 500 held-out training images by
# its replayed dual certificate (`router-scores` + `compose`, exact; see router/calibrate.py):
#   C          the zoo router as is (router N = 2,000 and N = 1,000)
#   se1.5      the same network smoothed at sigma_e = 1.5 (a larger router radius per unit of p)
#   ft-l80/200 C fine-tuned 4 epochs at lambda 80 / 200 (more consistency -> fewer bottlenecks?)
#   ft-15k     C fine-tuned 6 epochs on 15,000 label images (5,000 more, labelled here)
# plus the offsets calibration (benchmarks/calibrate_router.sh) and the alpha split, replayed.
# Expert stage: the experts' held-out certificates from router_sweep.sh (N = 2,000, GPU noise).
# Resumable: every finished file is kept. About 60 min of ONNX Runtime + training on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/zoo_common.sh
WORK=${WORK:-runs/calibrate}
OUT=benchmarks/results/calibrate
SWEEP=benchmarks/results/router-sweep
mkdir -p "$WORK" "$OUT"
[ -f "$WORK/holdout.npz" ] || holdout_npz "$WORK/holdout.npz"
hold=(); for s in 0.25 0.5 1.0; do hold+=(--expert-results "$SWEEP/holdout-expert-$s.tsv"); done
ROUTER_ARGS=(--arch confidence_head --arch-args '{"base": "cifar_resnet20", "base_classes": 10, "hidden": 32}'
             --sigma-e 1.0 --weight-decay 0.01 --eta 0.5 --seed 0 --threads 2 --device cpu --data "$DATA"
             --batch 64 --temperature 0.1 --quiet)
LABELS=(--labels "$ZOO_LABELS/labels-train-2000.npz" --labels "$ZOO_LABELS/labels-train-2000-8000.npz")
scores() {  # scores ROUTER OUT N
  [ -f "$2" ] || dualrs-route router-scores --router "$1" --dataset "npz:$WORK/holdout.npz" --router-N0 100 \
    --router-N "$3" --seed 0 --batch 400 --engine onnxruntime --threads 2 --quiet --out "$2"
}
judge() {  # judge ROUTER SCORES NAME
  dualrs-route compose --router "$1" --scores "$2" "${hold[@]}" --alpha 0.001 --force --out "$OUT/holdout-$3.tsv"
}
# the zoo router; the N = 1,000 file is the first 1,000 estimation samples of the same streams
C=router/zoo/cifar10-router
scores "$C" "$WORK/holdout-scores.npz" 2000
judge "$C" "$WORK/holdout-scores.npz" C-N2000
[ -f "$WORK/holdout-scores-N1000.npz" ] || scores_prefix "$WORK/holdout-scores.npz" "$WORK/holdout-scores-N1000.npz" 1000
judge "$C" "$WORK/holdout-scores-N1000.npz" C-N1000
# the same network at sigma_e = 1.5: a copy of the folder with another sigma
if [ ! -f "$WORK/router-se1.5/config.json" ]; then
  python3 - "$C" "$WORK/router-se1.5" <<'PY'
import json, os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in ("model.safetensors", "model.onnx"):
    shutil.copy2(src / f, dst / f)
c = json.loads((src / "config.json").read_text())
c.update(sigma=1.5, name=dst.name, experts=[os.path.relpath((src / e).resolve(), dst.resolve()) for e in c["experts"]])
(dst / "config.json").write_text(json.dumps(c, indent=1))
PY
fi
scores "$WORK/router-se1.5" "$WORK/holdout-scores-se1.5.npz" 1000
judge "$WORK/router-se1.5" "$WORK/holdout-scores-se1.5.npz" se1.5-N1000
# fine-tuning C: more consistency
for L in 80 200; do
  R=$WORK/ft-l$L
  [ -f "$R/config.json" ] || dualrs-route train-router "${LABELS[@]}" "${E[@]}" --init "$C" "${ROUTER_ARGS[@]}" \
    --epochs 4 --lr 0.0002 --lambda $L --out "$R"
  [ -f "$R/model.onnx" ] || dualrs-route export "$R" --to onnx
  scores "$R" "$WORK/holdout-scores-ft-l$L.npz" 1000
  judge "$R" "$WORK/holdout-scores-ft-l$L.npz" ft-l$L-N1000
done
# fine-tuning C on 5,000 more label images (training images 10,000-14,999)
MORE=$ZOO_LABELS/labels-train-10000-5000.npz
dualrs-route labels "${E[@]}" --dataset cifar10 --data "$DATA" --split train --start 10000 --max 5000 --N0 10 \
  --N 100 --alpha 0.001 --seed 0 --batch 400 --chunk 32 --engine onnxruntime --threads 2 --quiet --out "$MORE"
R=$WORK/ft-15k
[ -f "$R/config.json" ] || dualrs-route train-router "${LABELS[@]}" --labels "$MORE" "${E[@]}" --init "$C" \
  "${ROUTER_ARGS[@]}" --epochs 6 --lr 0.00025 --lambda 20 --out "$R"
[ -f "$R/model.onnx" ] || dualrs-route export "$R" --to onnx
scores "$R" "$WORK/holdout-scores-ft-15k.npz" 1000
judge "$R" "$WORK/holdout-scores-ft-15k.npz" ft-15k-N1000
# the alpha split, replayed on C's N = 2,000 scores
for beta in 0.0001 0.0002 0.0003 0.0007; do
  dualrs-route compose --router "$C" --scores "$WORK/holdout-scores.npz" "${hold[@]}" --alpha 0.001 \
    --alpha-router $beta --force --out "$OUT/holdout-C-N2000-beta$beta.tsv"
done
dualrs-route analyze "$SWEEP"/holdout-expert-{0.25,0.5,1.0}.tsv "$OUT"/holdout-C-N2000.tsv "$OUT"/holdout-C-N1000.tsv \
  "$OUT"/holdout-se1.5-N1000.tsv "$OUT"/holdout-ft-l80-N1000.tsv "$OUT"/holdout-ft-l200-N1000.tsv \
  "$OUT"/holdout-ft-15k-N1000.tsv "$OUT"/holdout-C-N2000-beta*.tsv --radii 0,0.25,0.5,0.75,1.0,1.25,1.5 \
  | tee "$OUT/holdout-levers.md"
for f in "$OUT"/holdout-C-N2000.tsv "$OUT"/holdout-C-N1000.tsv "$OUT"/holdout-se1.5-N1000.tsv \
         "$OUT"/holdout-ft-*-N1000.tsv; do
  echo "== $f"; dualrs-route router-report --results "$f"
done | tee "$OUT/holdout-bottleneck.txt"
