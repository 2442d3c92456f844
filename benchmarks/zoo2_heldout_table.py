"""Held-out table of the consistency zoo's router variants (issue 12): dual CERTIFY replayed at router N 2,000 and
1,000, the routed experts' own radii ("choices alone", not a certificate), the router-bottleneck share, routes,
and the same router with set-valued certificates (router/sets.py, TAU 0.05), on the 500 held-out training images.

Usage (after bash benchmarks/zoo2_levers.sh): python benchmarks/zoo2_heldout_table.py se1.0 se0.75 se0.5 se1.0-l5 se1.0-l80
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import numpy as np

from dualrs_route.cli.calibrate import _load_stages
from dualrs_route.router.calibrate import markdown_row, simulate, simulate_sets
from dualrs_route.router.results import read_results

HELD_OUT = "benchmarks/results/zoo2-levers"
EXPERTS = [f"{HELD_OUT}/holdout-expert-{k}.tsv" for k in ("0.25", "0.5", "1.0")]
RADII = (0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def main(variants: list[str]) -> None:
    warnings.simplefilter("ignore")
    tables = [read_results(e) for e in EXPERTS]
    own = [np.where(t.correct == 1, t.radius, 0.0) for t in tables]  # each expert's own certified-correct radius
    print("| router (held-out) | " + " | ".join(f"r={r:g}" for r in RADII)
          + " | ACR | choices alone | R_sigma < R_c | routes 0.25/0.5/1.0/abstain |")
    print("|---|" + "---|" * (len(RADII) + 4))
    for v in variants:
        router = "router/zoo/cifar10-router-cr" if v == "se1.0" else f"router/zoo/cifar10-router-cr-{v}"
        scores_path = f"runs/zoo2-levers/scores-{v}.npz"
        if not os.path.exists(scores_path):
            print(f"skipping {v}: {scores_path} is absent (run bash benchmarks/zoo2_levers.sh)", file=sys.stderr)
            continue
        _, _, scores, stages = _load_stages(router, scores_path, EXPERTS)
        for n in (2000, 1000):
            sc = scores if n == 2000 else dataclasses.replace(scores, estimate=scores.estimate[:, :1000])
            d = simulate(sc, stages, [0, 0, 0], alpha=0.0005, beta=0.0005)
            routed = d["expert"]
            choice = np.array([own[k][i] if k >= 0 else 0.0 for i, k in enumerate(routed)])
            both = d["predict"] >= 0
            bottleneck = np.mean(d["radius_router"][both] < d["radius_expert"][both]) * 100
            routes = np.bincount(routed + 1, minlength=4)
            print(markdown_row(f"{v}, router N {n}", d, RADII)
                  + f" {choice.mean():.4f} | {bottleneck:.1f}% of {both.sum()} | "
                  f"{routes[1]}/{routes[2]}/{routes[3]}/{routes[0]} |")
            s = simulate_sets(sc, stages, [0, 0, 0], alpha=0.0005, beta=0.0005, tau=0.05)
            print(markdown_row(f"{v}, router N {n}, router sets tau 0.05", s, RADII) + " - | - | - |")


if __name__ == "__main__":
    main(sys.argv[1:])
