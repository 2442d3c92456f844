"""Replay routers on the sel images at the test's N, and with experts merged out: the seventh session's choice.

The sel tables of ``unseen_pipeline.sh`` certify the experts and score the routers at N = 1,000 (the budget these
two cores allow), while the test table runs at N = 10,000. N moves the choice: the radius cap grows from about
2.5 sigma to 3.2 sigma, which favours the sigma 1.0 expert (the held-out sessions saw sigma 0.5 and 1.0 tied at
N = 2,000 and sigma 1.0 ahead by 0.07 on test). This script replays every candidate at ``--scale`` s times the
stored N, each stored count scaled by s (the same vote share; as ``rescale_labels.py`` does for labels), both for
the router's estimation votes and for each expert's count. It is an approximation used only to choose: the
certificate that is reported is the test run's, at its own N.

Candidates per router (each replayed as dual CERTIFY and with router sets at ``--tau``):
  K = 3      the router as trained
  merges     a two-expert router from the same network: the votes for one expert are given to another
             (``0.5>0.25``: votes for sigma 0.5 count for sigma 0.25). The base classifier "argmax, then map" is
             deterministic, so the smoothed router and its certificate are those of any other router; with two
             experts a router set holds both, so R_S is infinite and a set row is min(R_a, R_b) where both agree.
and the constant routers (every image to one expert, the alpha split paid), which any router must beat. Each row
also gives the standard error of its paired gap to the best constant router (per-image differences, as
``paired_gap.py``): the resolution of a choice on these 500 images, and each certificate's ACR on the two split
halves of the images (even and odd positions in idx order; ninth session), for the declared split-half checks.

Usage:
  python benchmarks/unseen_replay.py --scores NAME=S.npz [--scores ...] --expert-results E0.tsv --expert-results E1.tsv \
      --expert-results E2.tsv [--scale 1 10] [--tau 0.05] [--alpha 0.001] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.router import calibrate  # noqa: E402
from dualrs_route.router.dual import split_alpha  # noqa: E402
from paired_gap import paired_se  # noqa: E402  (benchmarks/, this script's folder)

MERGES = {"K3": None, "0.5>0.25": {1: 0}, "0.5>1.0": {1: 2}, "0.25>0.5": {0: 1}}


def candidate(scores: calibrate.RouterScores, stages, merge, scale: int):
    """(scores stand-in, expert stages, (selection, estimation) vote counts) of one candidate at ``scale``."""
    k = scores.select.shape[-1]
    votes = calibrate.router_votes(scores, np.zeros(k))
    kept = list(range(k))
    if merge:
        kept = calibrate.merge_groups(k, merge)[1]
        votes = tuple(calibrate.merged_votes(v, merge) for v in votes)
    stand_in, experts, counts = calibrate.scaled(scores, stages, votes, scale)
    return stand_in, [experts[j] for j in kept], counts


def replay(scores, stages, merge, scale: int, *, alpha: float, beta: float, tau: float) -> dict:
    """{"plain": ACR, "sets": ACR} of one candidate."""
    stand_in, experts, counts = candidate(scores, stages, merge, scale)
    offsets = np.zeros(len(experts), dtype=np.float32)
    plain = calibrate.simulate(stand_in, experts, offsets, alpha=alpha, beta=beta, counts=counts)
    sets = calibrate.simulate_sets(stand_in, experts, offsets, alpha=alpha, beta=beta, tau=tau, counts=counts)
    return {"plain": calibrate.acr(plain), "sets": calibrate.acr(sets),
            "routes": np.bincount(plain["expert"] + 1, minlength=len(experts) + 1)[1:].tolist(),
            "per_image": {"plain": per_image(plain), "sets": per_image(sets)}}


def per_image(result: dict) -> np.ndarray:
    """Each image's share of the ACR: its radius where correct, else 0."""
    return result["radius"] * result["correct"]


def halves(values: np.ndarray) -> list[float]:
    """[ACR on the even positions, ACR on the odd positions] of per-image values in idx order."""
    values = np.asarray(values, dtype=np.float64)
    return [float(values[0::2].mean()), float(values[1::2].mean())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scores", action="append", required=True, help="NAME=router-scores.npz")
    parser.add_argument("--expert-results", action="append", required=True)
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    a, beta = split_alpha(args.alpha, None)
    table: dict = {}
    for spec in args.scores:
        name, _, path = spec.partition("=")
        scores = calibrate.load_scores(path)
        stages = [calibrate.load_expert_stage(p, scores) for p in args.expert_results]
        if "constant" not in table:
            table["constant"], best = {}, {}
            for s in args.scale:
                results = calibrate.constant_routers(scores, stages, alpha=a, beta=beta, scale=s)
                table["constant"].update({f"{k}, x{s}": calibrate.acr(r) for k, r in results.items()})
                table.setdefault("constant halves", {}).update(
                    {f"{k}, x{s}": halves(per_image(r)) for k, r in results.items()})
                best[s] = per_image(max(results.values(), key=calibrate.acr))
        for merge_name, merge in MERGES.items():
            for s in args.scale:
                r = replay(scores, stages, merge, s, alpha=a, beta=beta, tau=args.tau)
                images = r.pop("per_image")
                r["se"] = {kind: paired_se(best[s], images[kind]) for kind in images}
                r["halves"] = {kind: halves(images[kind]) for kind in images}
                table.setdefault(name, {})[f"{merge_name}, x{s}"] = r
    print(f"| router | merge | scale | dual ACR | sets ACR (tau {args.tau:g}) | se of the gap to the best constant "
          "(dual / sets) | sets ACR, even / odd images | routes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in table.items():
        if name.startswith("constant"):
            continue
        for key, r in rows.items():
            merge_name, _, s = key.partition(", ")
            print(f"| {name} | {merge_name} | {s} | {r['plain']:.4f} | {r['sets']:.4f} | {r['se']['plain']:.4f} / "
                  f"{r['se']['sets']:.4f} | {r['halves']['sets'][0]:.4f} / {r['halves']['sets'][1]:.4f} | "
                  f"{'/'.join(map(str, r['routes']))} |")
    for key, v in table["constant"].items():
        even, odd = table["constant halves"][key]
        print(f"| constant | {key} | | {v:.4f} | | | {even:.4f} / {odd:.4f} (dual) | |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
