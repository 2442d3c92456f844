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
# holdout_npz OUT: training images 49,500-49,999 (no router trained on them; the experts did: they trained on all 50,000) for `--dataset npz:OUT`
holdout_npz() {
  python3 -c "import numpy as np, sys; a = np.load(sys.argv[1]); np.savez(sys.argv[2], x=a['x'][49500:], y=a['y'][49500:])" \
    "$DATA/cifar10_train.npz" "$1"
}
# scores_prefix IN OUT N: router scores IN cut to their first N estimation samples (the scores router-scores
# writes at router N = N with the same seed: a prefix of the same streams)
scores_prefix() {
  python3 -c "
import json, numpy as np, sys
d = np.load(sys.argv[1]); n = int(sys.argv[3]); meta = json.loads(str(d['meta'])); meta['n'] = n
np.savez(sys.argv[2], idx=d['idx'], label=d['label'], select=d['select'], estimate=d['estimate'][:, :n],
         meta=np.asarray(json.dumps(meta)))" "$1" "$2" "$3"
}
