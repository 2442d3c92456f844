# Sourced by the CIFAR-10 router scripts (router_sweep.sh, label_budget.sh): the data check, the zoo's
# three experts as `dualrs-route` options, and the 500 held-out training images as an npz.
DATA=${DATA:-../shared/data}
if [ ! -f "$DATA/cifar10_train.npz" ]; then
  echo "skip: $DATA/cifar10_train.npz not found (set DATA=folder with cifar10_train.npz)" >&2
  exit 0
fi
Z=experts/zoo/cifar10-resnet20-sigma
E=(--expert ${Z}0.25 --expert ${Z}0.5 --expert ${Z}1.0)
ZOO_LABELS=benchmarks/results/zoo-labels
# holdout_npz OUT: training images 49,500-49,999 (never trained on, not test images) for `--dataset npz:OUT`
holdout_npz() {
  python3 -c "import numpy as np, sys; a = np.load(sys.argv[1]); np.savez(sys.argv[2], x=a['x'][49500:], y=a['y'][49500:])" \
    "$DATA/cifar10_train.npz" "$1"
}
