#!/usr/bin/env bash
# Router labels and router choice on images the EXPERTS never trained on (issue 12, seventh session).
# Why: the consistency zoo's experts trained on all 50,000 training images, so the "held-out" training images
# 49,500-49,999 and the label images 0-9,999 were held out from the router only. On them the low-sigma experts are
# more accurate than on unseen images (sigma 0.25 certifies 81.2% at r = 0 there, 74.6% on Cohen's test images),
# which biases both the router's labels and every held-out choice towards low sigma.
# Here the images are CIFAR-10 *test* images outside Cohen's 500 (idx 0, 20, ..., 9980), which stay untouched:
#   sel  500 images, test idx 10, 30, ..., 9990 (idx % 20 == 10): the router is chosen on these
#   lab  9,000 images, every other test idx with idx % 20 not in {0, 10}: the router's labels
# Steps (STEPS="split labels routers experts scores rule replay choose", in this order; each resumes or skips what
# is done):
#   split    runs/unseen/{sel,lab}.npz (x, y and the test idx of each image)
#   labels   benchmarks/results/unseen/labels-lab.npz: the pipeline's label budget (N0 10, N 100, alpha 0.001)
#   experts  benchmarks/results/unseen/sel-expert-<sigma>.tsv: each expert alone, N0 100, N = HN (1,000), alpha 0.001
#   routers  each of VARIANTS trained on the lab labels (folders runs/unseen-routers/NAME, git-ignored; their
#            configs with training histories copied to benchmarks/results/unseen/NAME.json)
#   scores   each variant's router scores on sel (router N0 100, N = HN), then router_sets.py's table (plain dual
#            CERTIFY and router sets at TAU 0.05) in benchmarks/results/unseen/sel-NAME.md
#   rule     the confidence-threshold router (benchmarks/rule_router.py) fitted on sel: the probe's scores at router
#            N = HN, the fit replayed at 10x N (--scale 10) -> benchmarks/results/unseen/rule-x10.json, fit-x10.txt
#   replay   benchmarks/unseen_replay.py: every variant at N and at 10x N (counts scaled, as the test's N = 10,000),
#            as trained and with one expert merged out -> benchmarks/results/unseen/replay.md, replay.json
#   choose   benchmarks/results/unseen/choice.txt: the variant with the highest sel ACR with router sets at TAU 0.05
#            at the stored N (the first rule, fixed in the seventh session before any of its test runs), and
#            choice-x10.txt: the second rule (fixed before its test run, after the first rule's choice was known
#            but before its test run): the highest sel ACR at 10x N over every variant, merge and certificate
#            (dual or sets at TAU 0.05) of replay.json, and the rule router scored by its split-half check
#            (mean of the two other-half ACRs: its thresholds are fitted on sel itself)
# Variants (NAME: recipe):
#   u-se1.0-l80       the chosen recipe of the training-image levers (confidence_head on the sigma 1.0 expert, its
#                     init, sigma_e 1.0, lambda 80, 20 epochs)
#   u-se1.0-l80-n10k  the same on labels re-scored at N = 10,000 (benchmarks/rescale_labels.py; not in the default VARIANTS)
#   u-p8-se1.0-l80 / u-p8-se2.0   pooled_mlp routers on 4x4 block means (as pooled_routers.sh)
#   u-p8-se1.0-l80-n10k / u-p8-se2.0-n10k   the same on the re-scored labels
#   u-p8-se1.0-l80-n10k-rw / u-p8-se2.0-n10k-rw   the same with --regret-weights (each image weighted by its radius
#                     spread over the experts; added after both choices' test runs: VARIANTS must name them)
#   u-se1.0-l80-mg    u-se1.0-l80's recipe on margin labels (benchmarks/margin_labels.py: the sigma 1.0 expert's mean
#                     softmax margin on the lab images, regressed on the re-scored labels; eighth session, after every
#                     test run above: VARIANTS must name it)
#   u-se1.0-l80-n10k-rw  u-se1.0-l80-n10k with --regret-weights (ninth session; VARIANTS must name it)
#   u-se1.0-l5-n10k   u-se1.0-l80-n10k at consistency lambda 5: does consistency cost the router its ranking?
#                     (ninth session; VARIANTS must name it)
#   u-se1.0-l80-n10k-e60  u-se1.0-l80-n10k trained for 60 epochs instead of 20 (tenth session; VARIANTS must name it)
#   u2-se0.5-l80-n10k  a level-2 router over sigma 0.25 and 0.5 only (choice-l2.txt): u-se1.0-l80-n10k's recipe on the
#                     re-scored labels without sigma 1.0's column, sigma_e 0.5, init the sigma 0.5 expert (eleventh
#                     session; VARIANTS must name it; left out of the replay step: benchmarks/selector_levers.py
#                     two-level replays it under -rn)
# Usage: bash benchmarks/unseen_pipeline.sh        (STEPS=... VARIANTS=... HN=1000 THREADS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/zoo_common.sh
source benchmarks/zoo_common.sh
STEPS=${STEPS:-"split labels routers experts scores rule replay choose"}
VARIANTS=${VARIANTS:-"u-se1.0-l80 u-p8-se1.0-l80 u-p8-se2.0 u-p8-se1.0-l80-n10k u-p8-se2.0-n10k"}
HN=${HN:-1000}
THREADS=${THREADS:-2}
X=benchmarks/training/cifar10-resnet20-cr-sigma
WORK=runs/unseen
OUT=benchmarks/results/unseen
mkdir -p "$WORK" "$OUT"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has split && [ ! -f "$WORK/lab.npz" ]; then
  python3 - "$DATA/cifar10_test.npz" "$WORK" <<'PY'
import numpy as np, sys
a = np.load(sys.argv[1]); idx = np.arange(len(a["y"]))
for name, keep in (("sel", idx % 20 == 10), ("lab", (idx % 20 != 0) & (idx % 20 != 10))):
    np.savez(f"{sys.argv[2]}/{name}.npz", x=a["x"][keep], y=a["y"][keep], test_idx=idx[keep])
    print(name, int(keep.sum()), "images")
PY
fi
if has labels; then
  dualrs-route labels --expert ${X}0.25 --expert ${X}0.5 --expert ${X}1.0 --dataset "npz:$WORK/lab.npz" --N0 10 --N 100 \
    --alpha 0.001 --seed 0 --batch 400 --chunk 32 --threads "$THREADS" --engine onnxruntime --quiet \
    --out "$OUT/labels-lab.npz"
fi
CR=(--expert ${X}0.25 --expert ${X}0.5 --expert ${X}1.0)
RW=runs/unseen-routers
mkdir -p "$RW"
if has routers && [ ! -f "$OUT/labels-lab-n10k.npz" ]; then
  python benchmarks/rescale_labels.py "$OUT/labels-lab.npz" "$OUT/labels-lab-n10k.npz" --n 10000
fi
if has routers && [[ " $VARIANTS " == *" u2-"* ]] && [ ! -f "$OUT/labels-lab-n10k-l2.npz" ]; then
  python benchmarks/subset_labels.py "$OUT/labels-lab-n10k.npz" "$OUT/labels-lab-n10k-l2.npz" --keep 0 1
fi
if has routers && [[ " $VARIANTS " == *" u-se1.0-l80-mg "* ]] && [ ! -f "$OUT/labels-lab-mg.npz" ]; then
  # the sigma 1.0 probe (as the rule step's) on the lab images, 32 noisy copies each, then the margin labels
  probe=$WORK/probe-se1.0
  if [ ! -f "$probe/model.onnx" ]; then
    python benchmarks/rule_router.py probe --expert ${X}1.0 --sigma-e 1.0 --experts ${X}0.25 ${X}0.5 ${X}1.0 \
      --out "$probe" > /dev/null
    dualrs-route export "$probe" --to onnx
  fi
  [ -f "$WORK/probe-lab.npz" ] || dualrs-route router-scores --router "$probe" --dataset "npz:$WORK/lab.npz" \
    --router-N0 1 --router-N 32 --seed 0 --batch 400 --engine onnxruntime --threads "$THREADS" --quiet \
    --out "$WORK/probe-lab.npz"
  python benchmarks/margin_labels.py --labels "$OUT/labels-lab-n10k.npz" --probe "$WORK/probe-lab.npz" \
    --out "$OUT/labels-lab-mg.npz" --temperature 0.1 | tee "$OUT/labels-lab-mg.txt"
fi
PRECISION=fp32
if python3 -c "import sys; from dualrs_route.experts.training import bf16_supported; sys.exit(not bf16_supported())"; then
  PRECISION=bf16
fi
train() {  # train NAME: the variant's train-router command
  local resnet=(--arch confidence_head --arch-args '{"base": "cifar_resnet20", "base_classes": 10, "hidden": 32}'
                --epochs 20 --weight-decay 0.01 --batch 64 --lr 0.001 --init ${X}1.0 --sigma-e 1.0 --lambda 80
                --precision "$PRECISION")
  local experts=("${CR[@]}")
  local pooled=(--arch pooled_mlp --arch-args '{"pool": 8, "hidden": [256, 256]}' --epochs 60 --batch 256 --lr 0.001
                --no-augment)
  case $1 in
    u-se1.0-l80) set -- --labels "$OUT/labels-lab.npz" "${resnet[@]}" ;;
    u-se1.0-l80-n10k) set -- --labels "$OUT/labels-lab-n10k.npz" "${resnet[@]}" ;;
    u-se1.0-l80-mg) set -- --labels "$OUT/labels-lab-mg.npz" "${resnet[@]}" ;;
    u-se1.0-l80-n10k-rw) set -- --labels "$OUT/labels-lab-n10k.npz" "${resnet[@]}" --regret-weights ;;
    u-se1.0-l5-n10k) set -- --labels "$OUT/labels-lab-n10k.npz" "${resnet[@]}" --lambda 5 ;;
    u-se1.0-l80-n10k-e60) set -- --labels "$OUT/labels-lab-n10k.npz" "${resnet[@]}" --epochs 60 ;;
    u2-se0.5-l80-n10k) set -- --labels "$OUT/labels-lab-n10k-l2.npz" "${resnet[@]}" --init ${X}0.5 --sigma-e 0.5
      experts=(--expert ${X}0.25 --expert ${X}0.5) ;;
    u-p8-se1.0-l80) set -- --labels "$OUT/labels-lab.npz" "${pooled[@]}" --sigma-e 1.0 --lambda 80 ;;
    u-p8-se2.0) set -- --labels "$OUT/labels-lab.npz" "${pooled[@]}" --sigma-e 2.0 --lambda 20 ;;
    u-p8-se1.0-l80-n10k) set -- --labels "$OUT/labels-lab-n10k.npz" "${pooled[@]}" --sigma-e 1.0 --lambda 80 ;;
    u-p8-se2.0-n10k) set -- --labels "$OUT/labels-lab-n10k.npz" "${pooled[@]}" --sigma-e 2.0 --lambda 20 ;;
    u-p8-se1.0-l80-n10k-rw) set -- --labels "$OUT/labels-lab-n10k.npz" "${pooled[@]}" --sigma-e 1.0 --lambda 80 \
      --regret-weights ;;
    u-p8-se2.0-n10k-rw) set -- --labels "$OUT/labels-lab-n10k.npz" "${pooled[@]}" --sigma-e 2.0 --lambda 20 \
      --regret-weights ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
  dualrs-route train-router "$@" "${experts[@]}" --eta 0.5 --temperature 0.1 --seed 0 --threads "$THREADS" --data "$DATA" \
    --quiet --out "$R"
}
sel=(--expert-results "$OUT/sel-expert-0.25.tsv" --expert-results "$OUT/sel-expert-0.5.tsv"
     --expert-results "$OUT/sel-expert-1.0.tsv")
for v in $VARIANTS; do
  R=$RW/$v
  if has routers && [ ! -f "$R/model.onnx" ]; then
    [ -f "$R/config.json" ] || train "$v" > "$WORK/train-$v.log" 2>&1
    dualrs-route export "$R" --to onnx
    cp "$R/config.json" "$OUT/$v.json"
  fi
done
if has experts; then
  for s in 0.25 0.5 1.0; do
    dualrs-route certify --expert ${X}$s --dataset "npz:$WORK/sel.npz" --N0 100 --N "$HN" --alpha 0.001 --seed 0 \
      --batch 400 --threads "$THREADS" --engine onnxruntime --quiet --out "$OUT/sel-expert-$s.tsv"
  done
fi
for v in $VARIANTS; do
  R=$RW/$v
  if has scores; then
    S=$WORK/scores-$v.npz
    [ -f "$S" ] || dualrs-route router-scores --router "$R" --dataset "npz:$WORK/sel.npz" --router-N0 100 \
      --router-N "$HN" --seed 0 --batch 400 --engine onnxruntime --threads "$THREADS" --quiet --out "$S"
    given=("${sel[@]}")
    [[ $v == u2-* ]] && given=("${sel[@]:0:4}")  # a level-2 router: the sigma 0.25 and 0.5 experts only
    [ -f "$OUT/sel-$v.md" ] || python benchmarks/router_sets.py --router "$R" --scores "$S" "${given[@]}" --tau 2 0.05 \
      --json "$OUT/sel-$v.json" > "$OUT/sel-$v.md"
  fi
done
if has rule; then
  probe=$WORK/probe-se1.0
  if [ ! -f "$probe/model.onnx" ]; then
    python benchmarks/rule_router.py probe --expert ${X}1.0 --sigma-e 1.0 --experts ${X}0.25 ${X}0.5 ${X}1.0 \
      --out "$probe" > /dev/null
    dualrs-route export "$probe" --to onnx
  fi
  S=$WORK/scores-probe-se1.0.npz
  [ -f "$S" ] || dualrs-route router-scores --router "$probe" --dataset "npz:$WORK/sel.npz" --router-N0 100 \
    --router-N "$HN" --seed 0 --batch 400 --engine onnxruntime --threads "$THREADS" --quiet --out "$S"
  [ -f "$OUT/rule-x10.json" ] || python benchmarks/rule_router.py fit --scores "$S" \
    --expert-results "$OUT"/sel-expert-{0.25,0.5,1.0}.tsv --alpha 0.001 --step 0.05 --taus 2,0.05,0.2 --top 25 \
    --scale 10 --out "$OUT/rule-x10.json" > "$OUT/fit-x10.txt"
fi
if has replay; then
  given=()
  for v in $VARIANTS; do
    [[ $v == u2-* ]] && continue
    [ -f "$WORK/scores-$v.npz" ] && given+=(--scores "$v=$WORK/scores-$v.npz")
  done
  python benchmarks/unseen_replay.py "${given[@]}" "${sel[@]}" --scale 1 10 --tau 0.05 --json "$OUT/replay.json" \
    > "$OUT/replay.md"
fi
if has choose; then
  python3 - "$OUT" <<'PY' | tee "$OUT/choice-x10.txt"
import json, sys
out = sys.argv[1]
table = json.load(open(f"{out}/replay.json"))
est = {}
for v, rows in table.items():
    if v.startswith("constant"):
        continue
    for key, r in rows.items():
        merge, _, scale = key.partition(", ")
        if scale == "x10":
            for kind in ("plain", "sets"):
                est[(v, merge, kind)] = r[kind]
try:
    rule = json.load(open(f"{out}/rule-x10.json"))
    est[("rule", "K3", "tau %g" % rule["tau"])] = sum(c["acr_other_half"] for c in rule["split_half"]) / 2
except FileNotFoundError:
    rule = None
best = max(est, key=lambda k: est[k])
constants = {k: v for k, v in table["constant"].items() if k.endswith("x10")}
print(" ".join(best))
print(f"sel ACR at 10x N: {est[best]:.4f}; best constant router {max(constants.values()):.4f} ("
      + ", ".join(f"{k} {v:.4f}" for k, v in constants.items()) + "); next: "
      + ", ".join(f"{' '.join(k)} {est[k]:.4f}" for k in sorted(est, key=lambda k: -est[k])[1:6]))
if rule:
    print(f"rule router fitted on all of sel: {rule['feature']} t1 {rule['t1']} t2 {rule['t2']} tau {rule['tau']}, "
          f"ACR at 10x N {rule['search_acr']:.4f} (in-sample)")
PY
  python3 - "$OUT" $VARIANTS <<'PY' | tee "$OUT/choice.txt"
import json, sys
out, names = sys.argv[1], sys.argv[2:]
acr = {}
for v in names:
    try:
        rows = json.load(open(f"{out}/sel-{v}.json"))
    except FileNotFoundError:
        continue
    acr[v] = next(r["acr"] for k, r in rows.items() if k.startswith("set, tau 0.05"))
best = max(acr, key=lambda v: (acr[v], -names.index(v)))
from dualrs_route.router import calibrate
from dualrs_route.router.dual import split_alpha
scores = calibrate.load_scores(f"runs/unseen/scores-{best}.npz")
stages = [calibrate.load_expert_stage(f"{out}/sel-expert-{s}.tsv", scores) for s in ("0.25", "0.5", "1.0")]
a, b = split_alpha(0.001, None)
constant = {k: calibrate.acr(r) for k, r in calibrate.constant_routers(scores, stages, alpha=a, beta=b).items()}
print(f"runs/unseen-routers/{best}")
print(f"variant {best}: sel ACR with router sets TAU 0.05 {acr[best]:.4f} (of: "
      + ", ".join(f"{v} {a:.4f}" for v, a in acr.items()) + "); constant routers: "
      + ", ".join(f"{k} {a:.4f}" for k, a in constant.items()))
PY
fi
