"""Diagnostic (issue 12): how much a confidence rule could route, before its certificate is paid for.

For each image, each expert's certify TSV holds the top class's estimation count n_k of N, so p_k = n_k / N is
the expert's smoothed top-class probability. A rule on them, e.g. "sigma 1.0 if p_1.0 >= t2, else sigma 0.5 if
p_0.5 >= t1, else sigma 0.25", taken at each routed expert's own radius (R_sigma ignored: not a certificate),
shows whether the experts' own confidence tells the best expert apart. The thresholds are the best on a grid,
for the files given (an upper bound on each set; no choice for a certificate is made from it).

Why it is not a certificate: the rule switches where p_1.0(x') crosses t2, and Phi^-1(p_1.0) is only known to be
(1 / sigma)-Lipschitz, so a proof that x' stays on the sigma 1.0 side reaches sigma (Phi^-1(p_1.0) - Phi^-1(t2)):
the Multiscale cascade's radius at p0 = t2, which shrinks as t2 grows (compose-cascade at p0 0.5-0.8).

Usage: python benchmarks/confidence_routing_bound.py A.tsv B.tsv C.tsv   (the experts in increasing sigma)
"""

from __future__ import annotations

import argparse

import numpy as np

from dualrs_route.router.results import read_results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs=3, help="certify --expert TSVs of the same images, in increasing sigma")
    p.add_argument("--step", type=float, default=0.0125)
    args = p.parse_args(argv)
    tables = [read_results(f) for f in args.results]
    for t in tables[1:]:
        if not np.array_equal(t.idx, tables[0].idx):
            raise SystemExit("error: the files do not hold the same images in the same order")
    gain = np.stack([t.radius * t.correct for t in tables], axis=1)
    n = [int(t.metadata["settings"]["N"]) for t in tables]
    p_top = np.stack([np.array([float(v) for v in t.columns["n_expert"]]) / nk for t, nk in zip(tables, n)], axis=1)
    rows = np.arange(len(gain))
    grid = np.round(np.arange(0.0, 1.0 + 1e-9, args.step), 6)
    print(f"{len(gain)} images; experts {np.round(gain.mean(0), 4).tolist()}, oracle {gain.max(1).mean():.4f}")
    rules = {
        "p_top of sigma 1.0, then of sigma 0.5": lambda t1, t2: np.where(p_top[:, 2] >= t2, 2, np.where(p_top[:, 1] >= t1, 1, 0)),
        "p_top of sigma 1.0 only (two thresholds)": lambda t1, t2: np.where(p_top[:, 2] >= t2, 2, np.where(p_top[:, 2] >= t1, 1, 0)),
        "sigma 1.0 vs 0.5": lambda t1, t2: np.where(p_top[:, 2] >= t2, 2, 1),
    }
    for name, rule in rules.items():
        best = max(((gain[rows, rule(t1, t2)].mean(), t1, t2) for t1 in grid for t2 in grid if t2 >= t1 or "only" not in name),
                   key=lambda r: r[0])
        routes = np.bincount(rule(best[1], best[2]), minlength=3).tolist()
        print(f"{name}: ACR at own radii {best[0]:.4f} (t1 {best[1]:g}, t2 {best[2]:g}; routes {routes})")


if __name__ == "__main__":
    main()
