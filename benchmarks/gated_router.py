"""The gated router (issue 12 lever, tenth session): a trained router, overruled by an expert's own confidence.

The best trained router (``cifar10-router-unseen-rn``) gains where the sigma 1.0 expert fails or barely certifies,
and loses on the images that expert certifies beyond 2.5, where its vote share for sigma 1.0 stays below the 0.9987
a radius of 3 needs (``router_breakdown.py``). The gated router's base classifier runs both networks on the same
noisy copy z = x + N(0, sigma_e^2 I) and reads the expert's confidence s(z) (``p1`` or ``margin`` = p1 - p2 of
its softmax). Family ``gate``: where s >= t_hi it votes for ``--gate-class`` (the sigma 1.0 expert), otherwise
as the router does. Family ``blend``: the router's logit for that expert is raised by w * s + b first.
It is a deterministic function of z, so its smoothed router is certified like any other (Cohen et al.'s theorem
needs nothing more of a base classifier).

The router-scores noise is keyed by (seed, image, stage, sample) alone, so two score files of the same images at the
same seed, N0, N and sigma_e saw the same noisy copies: the gate's votes are exact functions of the router's stored
logits and the probe's stored sorted probabilities (``rule_router.py probe``). ``fit`` replays dual CERTIFY from
them (``router.calibrate.simulate`` / ``simulate_sets``, the code behind ``compose``) for every configuration
and certificate on its family's grid, optionally at ``--scale`` times the stored N, with the split-half check of
the declared rule (``benchmarks/results/unseen/choice-gate.txt``).

Usage:
  python benchmarks/gated_router.py fit --router-scores R.npz --probe-scores P.npz --expert-results A.tsv B.tsv C.tsv
      [--family gate|blend] [--scale 10] [--tau 0.05] [--alpha 0.001] [--all] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dualrs_route.router import calibrate  # noqa: E402
from dualrs_route.router.dual import split_alpha  # noqa: E402
from rule_router import FEATURES, feature  # noqa: E402  (benchmarks/, this script's folder)

GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.01)
"""``gate`` family: t_hi values; 1.01 never gates (the router alone)."""
WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0)
BIASES = tuple(round(float(v), 2) for v in np.arange(-0.4, 0.2 + 1e-9, 0.02))
"""``blend`` family: the router's logit for the gate class is raised by w * s + b (w = 0: a logit offset)."""


def check_paired(router: calibrate.RouterScores, probe: calibrate.RouterScores) -> None:
    """The two score files must hold the same noisy copies: same images, N0, N, seed and sigma_e."""
    problems = []
    if not np.array_equal(router.idx, probe.idx):
        problems.append("different images")
    if router.select.shape[:2] != probe.select.shape[:2] or router.estimate.shape[:2] != probe.estimate.shape[:2]:
        problems.append(f"different N0/N ({router.select.shape[1]}/{router.estimate.shape[1]} against "
                        f"{probe.select.shape[1]}/{probe.estimate.shape[1]})")
    for key in ("seed", "sigma"):
        a, b = router.meta.get(key), probe.meta.get(key)
        if a != b:
            problems.append(f"{key} {a} against {b}")
    if problems:
        raise SystemExit("error: the router and probe scores did not see the same noise: " + "; ".join(problems))


def combined_logits(logits: np.ndarray, probe: np.ndarray, spec: dict) -> np.ndarray:
    """float32 [..., K]: what the ``gated_router`` folder of ``spec`` (mode, feature, gate_class and threshold, or
    weight and bias) outputs on copies where the router gave ``logits`` and the probe ``probe`` (sorted p)."""
    s = feature(probe.astype(np.float32), spec["feature"])
    g = spec["gate_class"]
    out = np.array(logits, dtype=np.float32)
    if spec["mode"] == "blend":
        out[..., g] += s * np.float32(spec["weight"]) + np.float32(spec["bias"])
        return out
    gated = s >= np.float32(spec["threshold"])
    out[gated] = 0.0
    out[gated, g] = 1e4
    return out


def combined_counts(logits: np.ndarray, probe: np.ndarray, spec: dict) -> np.ndarray:
    """int64 [m, K]: the combined router's vote counts per image."""
    return calibrate.routed_counts(combined_logits(logits, probe, spec), np.zeros(logits.shape[-1], np.float32))


def specs(family: str, gate_class: int) -> list[dict]:
    """Every configuration of a family's grid."""
    if family == "gate":
        return [{"mode": "gate", "feature": f, "threshold": t, "gate_class": gate_class}
                for f in FEATURES for t in GRID]
    return [{"mode": "blend", "feature": "margin", "weight": w, "bias": b, "gate_class": gate_class}
            for w in WEIGHTS for b in BIASES]


def replay(router, probe, stages, spec, *, scale, alpha, tau):
    """{"plain": result, "sets": result} of one configuration at ``scale`` times the stored N."""
    a, beta = split_alpha(alpha)
    votes = (combined_counts(router.select, probe.select, spec), combined_counts(router.estimate, probe.estimate, spec))
    stand_in, experts, counts = calibrate.scaled(router, stages, votes, scale)
    offsets = np.zeros(len(experts), dtype=np.float32)
    return {"plain": calibrate.simulate(stand_in, experts, offsets, alpha=a, beta=beta, counts=counts),
            "sets": calibrate.simulate_sets(stand_in, experts, offsets, alpha=a, beta=beta, tau=tau, counts=counts)}


def label(spec: dict) -> str:
    if spec["mode"] == "blend":
        return f"blend {spec['feature']} w {spec['weight']:g} b {spec['bias']:+.2f}"
    return f"gate {spec['feature']} >= {spec['threshold']:g}"


def halves(result: dict) -> list[float]:
    """[ACR on the even positions, ACR on the odd positions] (idx order)."""
    per = result["radius"] * result["correct"]
    return [float(per[0::2].mean()), float(per[1::2].mean())]


def fit(args) -> dict:
    router, probe = calibrate.load_scores(args.router_scores), calibrate.load_scores(args.probe_scores)
    check_paired(router, probe)
    stages = [calibrate.load_expert_stage(p, router) for p in args.expert_results]
    gate = len(stages) - 1 if args.gate_class is None else args.gate_class
    rows = []
    for spec in specs(args.family, gate):
        out = replay(router, probe, stages, spec, scale=args.scale, alpha=args.alpha, tau=args.tau)
        for cert, result in out.items():
            rows.append({"spec": spec, "certificate": cert, "acr": calibrate.acr(result), "halves": halves(result),
                         "routes": np.bincount(result["expert"][result["expert"] >= 0],
                                               minlength=len(stages)).tolist()})
    print(f"# {len(router.idx)} images, router N {router.estimate.shape[1]}, replayed at x{args.scale}, "
          f"{args.family} towards {stages[gate].name}, router sets at TAU {args.tau:g}")
    print("| configuration | certificate | ACR | even / odd halves | routes |")
    print("|---|---|---|---|---|")
    for r in rows:
        if args.all or r is max((q for q in rows if q["spec"] is r["spec"]), key=lambda q: q["acr"]):
            print(f"| {label(r['spec'])} | {r['certificate']} | {r['acr']:.4f} | "
                  f"{r['halves'][0]:.4f} / {r['halves'][1]:.4f} | {' / '.join(map(str, r['routes']))} |")
    best = max(rows, key=lambda r: r["acr"])
    checks = []
    for h in (0, 1):
        chosen = max(rows, key=lambda r: r["halves"][h])
        rule = {**chosen["spec"], "certificate": chosen["certificate"]}
        checks.append({"chosen_on": ["even", "odd"][h], "rule": rule,
                       "acr_chosen_half": chosen["halves"][h], "acr_other_half": chosen["halves"][1 - h]})
    print(f"\nbest: {label(best['spec'])} {best['certificate']}: ACR {best['acr']:.4f}")
    for c in checks:
        print(f"split half, chosen on the {c['chosen_on']} images: {c['rule']}: ACR {c['acr_chosen_half']:.4f} there, "
              f"{c['acr_other_half']:.4f} on the other half")
    report = {"rows": rows, "best": best, "split_half": checks, "scale": args.scale, "tau": args.tau,
              "alpha": args.alpha, "router_scores": args.router_scores, "probe_scores": args.probe_scores}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("fit", help="replay every gate on a grid from a router's and a probe's scores")
    p.add_argument("--router-scores", required=True)
    p.add_argument("--probe-scores", required=True)
    p.add_argument("--expert-results", nargs="+", required=True)
    p.add_argument("--family", choices=("gate", "blend"), default="gate")
    p.add_argument("--gate-class", type=int, default=None, help="expert index the gate votes for (default: the last)")
    p.add_argument("--all", action="store_true",
                   help="print every configuration (default: the better certificate of each)")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--json")
    args = parser.parse_args(argv)
    fit(args)


if __name__ == "__main__":
    main()
