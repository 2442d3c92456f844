"""Set-valued router certificates for the same routed classifier: how much of the router's min does it win back?

Dual RS certifies h(x') = f_{g(x')}(x'), where g is the smoothed router and f_k the smoothed experts,
with min(R_sigma, R_c): R_sigma keeps g(x') on the chosen expert. Where the router hesitates between
two experts, R_sigma is small although both experts may certify the same class far out. Another proof
for the *same* h then applies:

* if g(x') stays inside a set S of experts for ||x' - x|| < R_S, and every expert in S certifies the
  same class c with radius R_k, then h(x') = c for ||x' - x|| < min(R_S, min_{k in S} R_k);
* g(x') is in S when the base router's probability of landing outside S, p_out(x'), is below
  1 / (|S| + 1) (then some member of S has more than 1 / (|S| + 1) > p_out >= any outsider); with
  p_out(x) <= U from the estimation samples, Cohen's Lemma gives p_out(x') <= Phi(Phi^-1(U) + r / sigma_e),
  so R_S = sigma_e * (Phi^-1(1 / (|S| + 1)) - Phi^-1(U)); |S| = 1 is Cohen's radius, |S| = K is infinite.

S is picked from the router's *selection* samples only (every expert with a share of at least TAU, plus
the top one), so the estimation samples stay independent of the choice. Failure probability: one router
bound at beta and each of the |S| experts at alpha / |S| (union bound: beta + alpha in all).

This script replays both certificates from stored router scores and expert results (the inputs of
`dualrs-route compose`), on held-out images. It is an analysis, not a certify mode.

Usage:
  python benchmarks/router_sets.py --router R --scores S.npz --expert-results E0.tsv --expert-results E1.tsv \
      --expert-results E2.tsv [--alpha 0.001] [--tau 0.01 0.02 0.05 0.1 0.2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.experts.stats import ABSTAIN  # noqa: E402
from dualrs_route.router.calibrate import acr, bound_tables, routed_counts, simulate  # noqa: E402


def set_certify(scores, experts, offsets, *, alpha: float, beta: float, tau: float) -> dict:
    """Per image: the set-valued certificate (S from the selection shares >= tau), arrays like simulate's."""
    offsets = np.asarray(offsets, dtype=np.float32)
    select = routed_counts(scores.select, offsets)
    estimate = routed_counts(scores.estimate, offsets)
    n0, n = scores.select.shape[1], scores.estimate.shape[1]
    k = select.shape[1]
    top = select.argmax(axis=1)
    members = (select >= tau * n0) | (np.arange(k)[None, :] == top[:, None])
    size = members.sum(axis=1)
    n_in = (estimate * members).sum(axis=1)
    p_lower, _ = bound_tables(n, beta, scores.sigma)
    lower = p_lower[n_in]  # the lower bound of P(base router in S) = 1 - the upper bound of p_out
    with np.errstate(divide="ignore"):
        r_set = scores.sigma * (norm.ppf(1.0 / (size + 1)) + norm.ppf(lower))
    r_set = np.where(size == k, np.inf, r_set)
    m = len(top)
    predict = np.full(m, ABSTAIN)
    radius = np.zeros(m)
    for i in range(m):
        if not r_set[i] >= 0:
            continue
        s = int(size[i])
        classes, radii = set(), []
        for j in np.flatnonzero(members[i]):
            e = experts[j]
            _, r_e = bound_tables(e.n, alpha / s, e.sigma)
            if e.guess[i] == ABSTAIN or r_e[e.count[i]] < 0:
                classes.add(None)
                break
            classes.add(int(e.guess[i]))
            radii.append(float(r_e[e.count[i]]))
        if len(classes) == 1 and None not in classes:
            predict[i] = classes.pop()
            radius[i] = min(float(r_set[i]), min(radii))
    correct = (predict == scores.label).astype(np.int64)
    return {"predict": predict, "radius": np.where(predict != ABSTAIN, radius, 0.0), "correct": correct,
            "size": size}


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

    def line(name, res):
        accs = " | ".join(f"{100 * np.mean((res['correct'] == 1) & (res['radius'] >= r)):.1f}" for r in radii)
        return f"| {name} | {accs} | {acr(res):.4f} |"

    rows = {"dual (min with R_sigma)": simulate(scores, stages, offsets, alpha=a, beta=beta)}
    for tau in args.tau:
        res = set_certify(scores, stages, offsets, alpha=a, beta=beta, tau=tau)
        sizes = np.bincount(res["size"], minlength=len(stages) + 1)[1:]
        rows[f"set, tau {tau:g} (|S| = 1/2/3: {'/'.join(str(int(v)) for v in sizes)})"] = res
    print("| certificate | " + " | ".join(f"r={r:g}" for r in radii) + " | ACR |")
    print("|---|" + "---|" * (len(radii) + 1))
    for name, res in rows.items():
        print(line(name, res))
    if args.json:
        Path(args.json).write_text(json.dumps({name: {"acr": acr(res)} for name, res in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
