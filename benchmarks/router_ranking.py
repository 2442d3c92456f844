"""How well does a router's score rank images for the sigma 0.5 / sigma 1.0 choice? (issue 12, eighth session)

The seventh session's routers lose most of their ACR on images routed to sigma 0.5 where sigma 1.0 certifies
far (on sel, 43 of the 99 images with R_1.0 >= 1.5 went to sigma 0.5 with router radii near 2.8). This measures
the information in each per-image score s (larger = "sigma 1.0"): the **regret-weighted AUC**, the probability
that an image where sigma 1.0 is the better choice scores above one where sigma 0.5 is, each pair weighted by
the two images' radius at stake |R_1.0 - R_0.5| (ties count one half). 0.5 is no information, 1.0 a perfect
ranking. Radii are each expert's own (alpha not split) at ``--scale`` times the stored N, as
``unseen_replay.py`` replays them; images where the two radii are equal carry no weight.

Scores per file (``dualrs-route router-scores`` output):
  router files (``--scores NAME=FILE``): the logit of the last expert minus the one before (sigma 1.0 minus
    sigma 0.5), on one noisy copy, averaged over every copy, and the share of copies whose argmax is the last
    expert (the vote the smoothed router counts);
  the probe (``--probe FILE``, ``rule_router.py probe``: the sigma 1.0 expert's sorted probabilities): its
    margin p1 - p2 on one copy and averaged over 10 and over every copy.

Usage:
  python benchmarks/router_ranking.py --expert-results A.tsv B.tsv C.tsv [--scores NAME=S.npz ...] [--probe P.npz]
      [--scale 10] [--alpha 0.001]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.router import calibrate  # noqa: E402
from dualrs_route.router.dual import split_alpha  # noqa: E402


def weighted_auc(score: np.ndarray, better: np.ndarray, weight: np.ndarray) -> float:
    """P(score of a "better" image > score of an other image), pairs weighted by the product of their weights;
    ties count 1/2. Rows with weight 0 are ignored."""
    score, better, weight = (np.asarray(v, dtype=np.float64) for v in (score, better, weight))
    keep = weight > 0
    pos, neg = keep & (better > 0), keep & (better <= 0)
    if not pos.any() or not neg.any():
        raise ValueError("weighted_auc needs weighted images on both sides")
    sp, wp, sn, wn = score[pos], weight[pos], score[neg], weight[neg]
    diff = sp[:, None] - sn[None, :]
    wins = (diff > 0) + 0.5 * (diff == 0)
    return float((wp[:, None] * wn[None, :] * wins).sum() / (wp.sum() * wn.sum()))


def router_scores(scores: calibrate.RouterScores) -> dict[str, np.ndarray]:
    diff = scores.estimate[..., -1].astype(np.float64) - scores.estimate[..., -2]
    votes = np.argmax(scores.estimate, axis=-1) == scores.estimate.shape[-1] - 1
    return {"logit difference, one copy": diff[:, 0], "logit difference, mean": diff.mean(1),
            "vote share": votes.mean(1)}


def probe_scores(scores: calibrate.RouterScores) -> dict[str, np.ndarray]:
    margin = scores.estimate[..., 0].astype(np.float64) - scores.estimate[..., 1]
    return {"margin, one copy": margin[:, 0], "margin, mean of 10": margin[:, :10].mean(1),
            "margin, mean": margin.mean(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expert-results", nargs=3, required=True, metavar=("S0.25", "S0.5", "S1.0"))
    parser.add_argument("--scores", action="append", default=[], help="NAME=router-scores.npz")
    parser.add_argument("--probe", default=None)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.001)
    args = parser.parse_args()
    files = [(spec.partition("=")[0], spec.partition("=")[2], router_scores) for spec in args.scores]
    if args.probe:
        files.append(("sigma 1.0 probe", args.probe, probe_scores))
    if not files:
        sys.exit("error: give --scores NAME=FILE or --probe FILE")
    a, beta = split_alpha(args.alpha, None)
    radii = None
    print(f"| file | score | regret-weighted AUC (sigma 1.0 vs 0.5, x{args.scale}) |")
    print("|---|---|---|")
    for name, path, kind in files:
        scores = calibrate.load_scores(path)
        if radii is None:
            stages = [calibrate.load_expert_stage(p, scores) for p in args.expert_results]
            own = calibrate.constant_routers(scores, stages, alpha=a, beta=beta, scale=args.scale)
            radii = np.stack([r["radius"] * r["correct"] for r in own.values()], axis=1)
            idx = scores.idx
        elif not np.array_equal(scores.idx, idx):
            sys.exit(f"error: {path} holds other images than {files[0][1]}")
        better, weight = radii[:, 2] >= radii[:, 1], np.abs(radii[:, 2] - radii[:, 1])
        for label, s in kind(scores).items():
            print(f"| {name} | {label} | {weighted_auc(s, better, weight):.3f} |")


if __name__ == "__main__":
    main()
