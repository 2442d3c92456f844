"""Selector levers replayed on the sel images (issue 12, eleventh session): where else can a smoothed selector win?

Every family here keeps the base router of ``cifar10-router-unseen-rn`` (its stored sel scores) and changes the
*selector* built on it, replayed at ``--scale`` times the stored N from the router scores and the experts' own
certify files (same seed: the same noise as ``certify --router``), as ``compose`` does. Nothing here is run on test
images; each family's test-look rule is declared in ``benchmarks/results/unseen/choice-*.txt`` first.

``threshold`` (choice-threshold.txt). Two outputs (sigma 0.25's votes merged into sigma 0.5); the selector picks the
  largest-sigma expert D where p_D(x) > t and the other otherwise. Phi^-1(p_D) is 1/sigma_e-Lipschitz (Cohen et al.,
  Salman et al. 2019), so the choice stays put within sigma_e * (Phi^-1(L) - Phi^-1(theta)), L the Clopper-Pearson
  lower bound of the chosen side's estimation count at beta and theta = t for D, 1 - t for the other side (the side is
  chosen from the selection votes). t = 1/2 is dual CERTIFY (tested equal to ``calibrate.simulate``).

``guard``. D is chosen where the router says D *or* D's own smoothed top-class probability exceeds t_hi (a
  cascade-like guard that keeps the images D certifies far). Staying on D: the larger of the router's radius and
  sigma_D * (Phi^-1(L_top) - Phi^-1(t_hi)); leaving D: the smaller of the router's radius and
  sigma_D * (Phi^-1(t_hi) - Phi^-1(U)), U a Bonferroni upper bound on every class of D. Levels beta, alpha and
  alpha_guard share the failure budget. Replayed as an upper bound: each row takes the better side with hindsight,
  which no certificate may do, so a loss here is a loss for any side rule.

``level2-bounds``. Under the router's own R_sigma for leaving D, the rows it sends to sigma 0.5 re-chosen between
  sigma 0.25 and 0.5 with the label (an oracle level 2, a bound), or by a 2-stage cascade (sigma 0.5, then 0.25).

``two-level`` (choice-l2.txt). Level 1 is the router over {rest, D} (sigma 0.25 merged into 0.5) at sigma_e1; where it
  leaves D, a level-2 router over {sigma 0.25, sigma 0.5} at its own sigma_e2 picks. The selector is a deterministic
  function of x: on a row that leaves D it stays put within min(R_1, R_2), each level's Cohen radius at half of beta.
  Each level is replayed plain and with its set proof (``router.sets.certify_set``; S = both outputs needs no bound
  for that level), the level-1 set proof taking the level-2 certificate as the "rest" member's: four rows. One union
  bound: beta/2 per level, alpha over the experts as ``certify_set`` splits it.

Usage:
  python benchmarks/selector_levers.py threshold --router-scores R.npz --expert-results A.tsv B.tsv C.tsv [--scale 10]
  python benchmarks/selector_levers.py guard --router-scores R.npz --expert-results A.tsv B.tsv C.tsv [--scale 10]
  python benchmarks/selector_levers.py level2-bounds --router-scores R.npz --expert-results A.tsv B.tsv C.tsv
  python benchmarks/selector_levers.py two-level --router-scores R.npz --level2-scores R2.npz \
      --expert-results A.tsv B.tsv C.tsv [--scale 10] [--tau 0.05] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.experts.stats import ABSTAIN, Certificate  # noqa: E402
from dualrs_route.router import calibrate  # noqa: E402
from dualrs_route.router.cascade import cascade_from_counts  # noqa: E402
from dualrs_route.router.cascade_replay import load_expert_counts  # noqa: E402
from dualrs_route.router.dual import split_alpha  # noqa: E402
from dualrs_route.router.sets import certify_set, set_members  # noqa: E402

Z_GRID = tuple(round(z, 2) for z in np.arange(0.0, 3.0 + 1e-9, 0.25))
"""threshold t = Phi(-z) (the D side), guard t_hi = Phi(z)."""


# ---------------------------------------------------------------------------------------------
# Shared: the sel data at a scale
# ---------------------------------------------------------------------------------------------

class Replay:
    """A router's vote counts and the experts' stages on the scored images, at ``scale`` times the stored N."""

    def __init__(self, scores_path: str, expert_results: list[str], scale: int):
        self.scores = calibrate.load_scores(scores_path)
        stages = [calibrate.load_expert_stage(p, self.scores) for p in expert_results]
        votes = calibrate.router_votes(self.scores, np.zeros(self.scores.select.shape[-1], np.float32))
        self.stand_in, self.experts, (self.select, self.estimate) = calibrate.scaled(self.scores, stages, votes, scale)
        self.scale, self.paths = int(scale), list(expert_results)
        self.n0, self.n = int(self.select.sum(1)[0]), int(self.estimate.sum(1)[0])
        self.label = self.scores.label
        self.d = len(self.experts) - 1  # the largest-sigma expert, last by the files' order

    def binary(self) -> tuple[np.ndarray, np.ndarray]:
        """(selection, estimation) votes for D, every other expert's votes counting against it."""
        return self.select[:, self.d], self.estimate[:, self.d]

    def expert_radius(self, j: int, level: float, rows) -> np.ndarray:
        """Expert j's certified radius at ``level`` on ``rows`` where it certifies the true class, else 0."""
        ok, radius, _, _ = calibrate.expert_stage(self.experts[j], level, rows)
        return np.where(ok & (self.experts[j].guess[rows] == self.label[rows]), radius, 0.0)


def lcb_table(n: int, level: float) -> np.ndarray:
    return calibrate.bound_tables(n, level, 1.0)[0]


def summary(per: np.ndarray) -> dict:
    per = np.asarray(per, dtype=float)
    return {"acr": float(per.mean()), "halves": [float(per[0::2].mean()), float(per[1::2].mean())]}


def halves_text(s: dict) -> str:
    return f"{s['acr']:.4f} | {s['halves'][0]:.4f} / {s['halves'][1]:.4f}"


# ---------------------------------------------------------------------------------------------
# threshold
# ---------------------------------------------------------------------------------------------

def threshold_radius(lower, theta, sigma_e):
    """sigma_e * (Phi^-1(lower) - Phi^-1(theta)) where lower > theta, else -1 (abstain)."""
    lower, theta = np.asarray(lower, dtype=float), np.asarray(theta, dtype=float)
    with np.errstate(divide="ignore"):
        r = sigma_e * (norm.ppf(lower) - norm.ppf(theta))
    return np.where(lower > theta, r, -1.0)


def threshold_replay(rp: Replay, t: float, *, alpha: float) -> dict:
    """Per-row radius (0 unless certified and correct), and where it routes, for the threshold selector at t."""
    a, beta = split_alpha(alpha)
    sel_d, est_d = rp.binary()
    to_d = sel_d > t * rp.n0
    p = lcb_table(rp.n, beta)
    lower = np.where(to_d, p[est_d], p[rp.n - est_d])
    r_sigma = threshold_radius(lower, np.where(to_d, t, 1.0 - t), rp.scores.sigma)
    rows = np.arange(len(rp.label))
    r_d, r_o = rp.expert_radius(rp.d, a, rows), rp.expert_radius(rp.d - 1, a, rows)
    per = np.where(r_sigma < 0, 0.0, np.minimum(np.maximum(r_sigma, 0.0), np.where(to_d, r_d, r_o)))
    return {"per": per, "to_d": int((to_d & (r_sigma >= 0)).sum()), "other": int((~to_d & (r_sigma >= 0)).sum())}


def cmd_threshold(args) -> dict:
    rp = Replay(args.router_scores, args.expert_results, args.scale)
    print(f"# threshold selector on {len(rp.label)} images, router N {rp.n // rp.scale} replayed at x{rp.scale}; "
          f"D = {rp.experts[rp.d].name}, the other side = {rp.experts[rp.d - 1].name} (every other vote counts for it)")
    print("| t = Phi(-z) | z | ACR | even / odd halves | routes other / D |")
    print("|---|---|---|---|---|")
    out = {}
    for z in Z_GRID:
        t = float(norm.cdf(-z))
        res = threshold_replay(rp, t, alpha=args.alpha)
        s = summary(res["per"])
        out[str(z)] = dict(s, t=t, routes=[res["other"], res["to_d"]])
        print(f"| {t:.4f} | {z:g} | {halves_text(s)} | {res['other']} / {res['to_d']} |")
    return out


# ---------------------------------------------------------------------------------------------
# guard
# ---------------------------------------------------------------------------------------------

def class_counts(rp: Replay, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection guess, estimation counts [m, classes] at the replay's scale) of expert j's certify file."""
    ec = load_expert_counts(rp.paths[j])
    guess = np.array([ec.rows[int(i)][1] for i in rp.scores.idx])
    counts = np.array([ec.rows[int(i)][2] for i in rp.scores.idx], dtype=np.int64) * rp.scale
    return guess, counts


def guard_replay(rp: Replay, z: float, *, beta: float, alpha: float, alpha_guard: float) -> np.ndarray:
    """Per-row radius of the guarded selector at t_hi = Phi(z), each row on its better side (an upper bound)."""
    _, est_d = rp.binary()
    p_beta, p_alpha = lcb_table(rp.n, beta), lcb_table(rp.n, alpha)
    p_guard = lcb_table(rp.n, alpha_guard / 10.0)
    sigma_e = rp.scores.sigma
    r_on_router = np.where(p_beta[est_d] > 0.5, sigma_e * norm.ppf(p_beta[est_d]), 0.0)
    r_off_router = np.where(p_beta[rp.n - est_d] > 0.5, sigma_e * norm.ppf(p_beta[rp.n - est_d]), 0.0)
    guess, counts = class_counts(rp, rp.d)
    ar = np.arange(len(guess))
    lower_top = p_alpha[counts[ar, guess]]
    sigma_d = rp.experts[rp.d].sigma
    r_on_guard = np.maximum(sigma_d * (norm.ppf(lower_top) - z), 0.0)
    upper_every = (1.0 - p_guard[rp.n - counts]).max(axis=1)  # Bonferroni over the classes, at alpha_guard
    with np.errstate(divide="ignore"):
        r_off_guard = np.maximum(sigma_d * (z - norm.ppf(upper_every)), 0.0)
    rows = np.arange(len(rp.label))
    r_d, r_o = rp.expert_radius(rp.d, alpha, rows), rp.expert_radius(rp.d - 1, alpha, rows)
    on = np.minimum(np.maximum(r_on_router, r_on_guard), r_d)
    off = np.minimum(np.minimum(r_off_router, r_off_guard), r_o)
    return np.maximum(on, off)


def cmd_guard(args) -> dict:
    rp = Replay(args.router_scores, args.expert_results, args.scale)
    beta, alpha, alpha_guard = 0.4 * args.alpha, 0.4 * args.alpha, 0.2 * args.alpha
    print(f"# guarded selector (router OR {rp.experts[rp.d].name}'s top-class probability > t_hi) on "
          f"{len(rp.label)} images at x{rp.scale}; beta / alpha / alpha_guard = {beta:g} / {alpha:g} / {alpha_guard:g}; "
          "each row on its better side (an upper bound on any side rule)")
    print("| t_hi = Phi(z) | z | ACR (upper bound) | even / odd halves |")
    print("|---|---|---|---|")
    out = {}
    for z in Z_GRID:
        s = summary(guard_replay(rp, z, beta=beta, alpha=alpha, alpha_guard=alpha_guard))
        out[str(z)] = s
        print(f"| {norm.cdf(z):.4f} | {z:g} | {halves_text(s)} |")
    return out


# ---------------------------------------------------------------------------------------------
# level2-bounds
# ---------------------------------------------------------------------------------------------

def leave_d(rp: Replay, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows the router's selection sends away from D, the router's Cohen radius for that side at beta)."""
    sel_d, est_d = rp.binary()
    off = sel_d * 2 < rp.n0
    p = lcb_table(rp.n, beta)[rp.n - est_d]
    return off, np.where(p > 0.5, rp.scores.sigma * norm.ppf(p), 0.0)


def cmd_level2_bounds(args) -> dict:
    rp = Replay(args.router_scores, args.expert_results, args.scale)
    a, beta = split_alpha(args.alpha)
    plain = calibrate.simulate(rp.stand_in, rp.experts, np.zeros(len(rp.experts)), alpha=a, beta=beta,
                               counts=(rp.select, rp.estimate))
    base = plain["radius"] * plain["correct"]
    off, r1 = leave_d(rp, beta)
    rows = np.arange(len(rp.label))
    r25, r5 = rp.expert_radius(0, a, rows), rp.expert_radius(1, a, rows)
    as_is = np.where(off, np.minimum(r1, r5), base)
    oracle = np.where(off, np.minimum(r1, np.maximum(r25, r5)), base)
    ec = [load_expert_counts(p) for p in rp.paths[:2]]
    out = {"plain": summary(base), "off_rows": int(off.sum()), "as_is": summary(as_is), "oracle": summary(oracle),
           "sigma0.25_better": int((np.minimum(r1, r25) > np.minimum(r1, r5))[off].sum()), "cascade": {}}
    print(f"# {len(rp.label)} images at x{rp.scale}: the router leaves {rp.experts[rp.d].name} on {out['off_rows']} "
          f"rows; sigma 0.25 certifies further than sigma 0.5 there on {out['sigma0.25_better']}")
    print("| level 2 on those rows | ACR | even / odd halves |")
    print("|---|---|---|")
    print(f"| the router's own choice (dual CERTIFY) | {halves_text(out['as_is'])} |")
    print(f"| oracle between sigma 0.25 and 0.5 (with the label: a bound) | {halves_text(out['oracle'])} |")
    for p0 in (0.5, 0.6, 0.7, 0.8, 0.9):
        per = base.copy()
        for i in np.flatnonzero(off):
            idx = int(rp.scores.idx[i])
            draws = [(ec[k].rows[idx][1], np.asarray(ec[k].rows[idx][2]) * rp.scale) for k in (1, 0)]
            c = cascade_from_counts(draws, sigmas=[ec[1].sigma, ec[0].sigma], n0=ec[0].n0, alpha=a, p0=p0)
            per[i] = min(r1[i], c.radius) if c.prediction == rp.label[i] else 0.0
        out["cascade"][str(p0)] = summary(per)
        print(f"| cascade sigma 0.5 then 0.25, p0 {p0:g} | {halves_text(out['cascade'][str(p0)])} |")
    return out


# ---------------------------------------------------------------------------------------------
# two-level
# ---------------------------------------------------------------------------------------------

class TwoLevel:
    """The two-level selector's certificate per row, from both routers' scaled votes (class docstring of the module)."""

    def __init__(self, rp: Replay, rp2: Replay, *, alpha: float):
        if not np.array_equal(rp.scores.idx, rp2.scores.idx) or rp.n != rp2.n:
            raise SystemExit("error: the two routers' scores cover different images or N")
        if len(rp2.experts) != 2 or [e.name for e in rp2.experts] != [e.name for e in rp.experts[:2]]:
            raise SystemExit("error: the level-2 router must be over the level-1 router's first two experts")
        self.rp, self.rp2 = rp, rp2
        self.alpha, self.beta = split_alpha(alpha)
        self.b1 = self.b2 = self.beta / 2.0
        sel_d, est_d = rp.binary()
        self.select1 = np.stack([rp.n0 - sel_d, sel_d], axis=1)  # [rest, D] per row
        self.estimate1 = np.stack([rp.n - est_d, est_d], axis=1)

    def level2(self, i: int, level: float, tau2: float | None) -> Certificate:
        """Level 2's certificate of row i (its router at beta/2, its experts within ``level``)."""
        rp2 = self.rp2
        sel, est = rp2.select[i], rp2.estimate[i]
        top = int(np.argmax(sel))
        members = set_members(sel, tau2) if tau2 is not None else np.eye(2, dtype=bool)[top]
        if members.sum() > 1:
            res = certify_set(members, top, int(est[top]), int(est[members].sum()), rp2.n, beta=self.b2, alpha=level,
                              sigma_e=rp2.scores.sigma, expert=lambda k, lv: calibrate.expert_certificate(rp2.experts[k], lv, i))
            return Certificate(res.prediction, res.radius if res.prediction != ABSTAIN else 0.0, 0.0, 0, rp2.n)
        p = lcb_table(rp2.n, self.b2)[int(est[top])]
        if p <= 0.5:
            return Certificate(ABSTAIN, 0.0, float(p), int(est[top]), rp2.n)
        cert = calibrate.expert_certificate(rp2.experts[top], level, i)
        if cert.abstained:
            return cert
        return Certificate(cert.prediction, min(rp2.scores.sigma * norm.ppf(p), cert.radius), cert.p_lower,
                           cert.count, cert.n)

    def row(self, i: int, *, tau1: float | None, tau2: float | None) -> float:
        """Row i's certified radius if correct, else 0."""
        rp = self.rp
        sel, est = self.select1[i], self.estimate1[i]
        top = int(np.argmax(sel))

        def member(k: int, level: float) -> Certificate:
            return calibrate.expert_certificate(rp.experts[rp.d], level, i) if k == 1 else self.level2(i, level, tau2)

        members = set_members(sel, tau1) if tau1 is not None else np.eye(2, dtype=bool)[top]
        if members.sum() > 1:
            res = certify_set(members, top, int(est[top]), int(est.sum()), rp.n, beta=self.b1, alpha=self.alpha,
                              sigma_e=rp.scores.sigma, expert=member)
            prediction, radius = res.prediction, res.radius
        else:
            p = lcb_table(rp.n, self.b1)[int(est[top])]
            if p <= 0.5:
                return 0.0
            cert = member(top, self.alpha)
            prediction, radius = cert.prediction, min(rp.scores.sigma * norm.ppf(p), cert.radius)
        return float(radius) if prediction != ABSTAIN and prediction == rp.label[i] else 0.0

    def run(self, *, tau1, tau2) -> np.ndarray:
        return np.array([self.row(i, tau1=tau1, tau2=tau2) for i in range(len(self.rp.label))])


def cmd_two_level(args) -> dict:
    rp = Replay(args.router_scores, args.expert_results, args.scale)
    rp2 = Replay(args.level2_scores, args.expert_results[:2], args.scale)
    two = TwoLevel(rp, rp2, alpha=args.alpha)
    print(f"# two-level selector on {len(rp.label)} images at x{rp.scale}: level 1 sigma_e {rp.scores.sigma:g} "
          f"({Path(args.router_scores).name}), level 2 sigma_e {rp2.scores.sigma:g} ({Path(args.level2_scores).name}); "
          f"beta/2 per level, sets at TAU {args.tau:g}")
    print("| level-1 proof | level-2 proof | ACR | even / odd halves |")
    print("|---|---|---|---|")
    out = {}
    for tau1 in (None, args.tau):
        for tau2 in (None, args.tau):
            s = summary(two.run(tau1=tau1, tau2=tau2))
            key = f"level1 {'sets' if tau1 else 'plain'}, level2 {'sets' if tau2 else 'plain'}"
            out[key] = s
            print(f"| {'sets' if tau1 else 'plain'} | {'sets' if tau2 else 'plain'} | {halves_text(s)} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("threshold", "guard", "level2-bounds", "two-level"):
        p = sub.add_parser(name)
        p.add_argument("--router-scores", required=True)
        p.add_argument("--expert-results", nargs="+", required=True, help="by increasing sigma; the last is D")
        p.add_argument("--scale", type=int, default=10)
        p.add_argument("--alpha", type=float, default=0.001)
        p.add_argument("--json")
        if name == "two-level":
            p.add_argument("--level2-scores", required=True)
            p.add_argument("--tau", type=float, default=0.05)
    args = parser.parse_args()
    out = {"threshold": cmd_threshold, "guard": cmd_guard, "level2-bounds": cmd_level2_bounds,
           "two-level": cmd_two_level}[args.command](args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
