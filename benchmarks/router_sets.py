"""Set-valued router certificates (router/sets.py) beside dual CERTIFY's rows, replayed on held-out images.

Dual RS certifies h(x') = f_{g(x')}(x') with min(R_sigma, R_c); where the router hesitates between
experts, R_sigma is small. router/sets.py certifies the same h with a set S of experts too (the router's
top one plus every expert with a selection share >= TAU): the larger of the top expert's dual radius
and min(R_S, min_{k in S} R_k), router bounds at beta / 2 each, members at alpha / |S|. This script replays both from stored router scores and expert results (the inputs of
`dualrs-route compose`), for several TAU, to choose TAU on held-out images (never test images).

Usage:
  python benchmarks/router_sets.py --router R --scores S.npz --expert-results E0.tsv --expert-results E1.tsv \
      --expert-results E2.tsv [--alpha 0.001] [--tau 0.01 0.02 0.05 0.1 0.2 0.3 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.router.calibrate import acr, markdown_row, simulate, simulate_sets  # noqa: E402


def main() -> None:
    from dualrs_route.cli.calibrate import _load_stages
    from dualrs_route.router.dual import split_alpha

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router", required=True)
    parser.add_argument("--scores", required=True)
    parser.add_argument("--expert-results", action="append", required=True)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--tau", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 2.0],
                        help="selection-share thresholds; tau > 1 never adds an expert (= dual CERTIFY's rows)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder, _, scores, stages = _load_stages(args.router, args.scores, args.expert_results)
    a, beta = split_alpha(args.alpha, None)
    offsets = np.asarray(folder.config.logit_offsets or [0.0] * len(stages), dtype=np.float32)
    radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

    rows = {"dual (min with R_sigma)": simulate(scores, stages, offsets, alpha=a, beta=beta)}
    for tau in args.tau:
        res = simulate_sets(scores, stages, offsets, alpha=a, beta=beta, tau=tau)
        sizes = np.bincount([len(m) for m in res["members"]], minlength=len(stages) + 1)[1:]
        rows[f"set, tau {tau:g} (|S| = 1/2/3: {'/'.join(str(int(v)) for v in sizes)})"] = res
    print("| certificate | " + " | ".join(f"r={r:g}" for r in radii) + " | ACR |")
    print("|---|" + "---|" * (len(radii) + 1))
    for name, res in rows.items():
        print(markdown_row(name, res, radii))
    if args.json:
        Path(args.json).write_text(json.dumps({name: {"acr": acr(res)} for name, res in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
