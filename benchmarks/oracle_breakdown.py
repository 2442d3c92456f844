"""Where the oracle's ACR gain over the largest-sigma expert lies, and how much of it a cascade-first selector
can reach (issue 12, ninth session). A diagnosis from stored counts; nothing here is a certificate.

Every image falls in one of three groups by the largest-sigma expert's own CERTIFY (its one-sided
Clopper-Pearson lower bound L of its guess, at alpha):

* **decided right**: L > 1/2 and the guess is the label (it certifies the image);
* **decided wrong**: L > 1/2 and the guess is not the label (it is confidently wrong);
* **undecided**: L <= 1/2 (it abstains).

Per group: the images, the mean radius of that expert (0 unless right), the mean of the oracle (the largest
radius over all experts, 0 where none is right: every expert at alpha, as ``zoo2_test_table.sh``'s oracle) and
its gain summed over the group and divided by all images (the groups' gains add up to the oracle's ACR gain).
The decided-right group is split further by that expert's radius.

**Cascade-first bound.** A selector that first runs the largest-sigma stage of the Multiscale cascade
(router/cascade.py, p0, its share alpha / K of the cascade's split), keeps its decision where it decides and
abstains where it abstains, and otherwise picks the best of the other experts *knowing the label*: that
expert's radius at alpha / K, min'ed with the first stage's cap for the label (the radius within which it keeps
every other class below p0). This bounds every design that leaves the largest-sigma expert's decided images to
it (the cascade with any later stages, or a router behind a cascade gate); its row sits beside the cascade.

Counts are multiplied by ``--scale`` (the replay of a larger N with the same vote shares, as
``unseen_replay.py``). Usage:

  python benchmarks/oracle_breakdown.py A.tsv B.tsv C.tsv [--scale 10] [--alpha 0.001] [--p0 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.experts.stats import certify_from_counts, lower_confidence_bound  # noqa: E402
from dualrs_route.router.cascade import (ABSTAIN_HERE, DECIDE, cascade_from_counts, decided_radius,  # noqa: E402
                                         evaluate_stage, other_classes_upper, skipped_radius, stage_levels)
from dualrs_route.router.cascade_replay import load_expert_counts  # noqa: E402

GROUPS = ("decided right", "decided wrong", "undecided")
BINS = ((0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.5), (2.5, np.inf))


def own_radius(guess: int, counts: np.ndarray, label: int, sigma: float, alpha: float) -> float:
    """The expert's CERTIFY radius at ``alpha`` if it certifies the label, else 0."""
    cert = certify_from_counts(guess, int(counts[guess]), int(counts.sum()), sigma, alpha)
    return float(cert.radius) if cert.prediction == label else 0.0


def first_stage_bound(draw: tuple[int, np.ndarray], others: list[tuple[int, np.ndarray, float]], label: int,
                      sigma: float, alpha: float, p0: float, stages: int) -> float:
    """The cascade-first bound of one image (module docstring): ``draw`` = (guess, counts) of the largest-sigma
    expert, ``others`` = (guess, counts, sigma) of the rest."""
    levels = stage_levels(alpha, stages)[0]
    guess, counts = draw
    stage = evaluate_stage(guess, counts, sigma=sigma, n0=0, levels=levels, p0=p0, expert=0)
    if stage.outcome == DECIDE:
        return min(decided_radius(sigma, stage.p_lower, p0), 1e9) if guess == label else 0.0
    if stage.outcome == ABSTAIN_HERE:
        return 0.0
    cap = skipped_radius(sigma, other_classes_upper(counts, label, levels.upper), p0)
    best = max(own_radius(g, c, label, s, alpha / stages) for g, c, s in others)
    return max(0.0, min(best, cap))


def breakdown(files, *, scale: int, alpha: float, p0: float) -> dict:
    """Per-image arrays (radius of each expert in ``files`` order, oracle, group, cascade, bound) and the table."""
    order = sorted(range(len(files)), key=lambda k: -files[k].sigma)
    top = files[order[0]]
    idx = sorted(top.rows)
    radii, groups, cascade, bound = [], [], [], []
    for i in idx:
        label = top.rows[i][0]
        draws = [(files[k].rows[i][1], np.asarray(files[k].rows[i][2], dtype=np.int64) * scale) for k in order]
        radii.append([own_radius(g, c, label, files[k].sigma, alpha) for k, (g, c) in zip(order, draws)])
        g, c = draws[0]
        decided = lower_confidence_bound(int(c[g]), int(c.sum()), alpha) >= 0.5
        groups.append(GROUPS[2] if not decided else GROUPS[0] if g == label else GROUPS[1])
        result = cascade_from_counts(draws, sigmas=[files[k].sigma for k in order], n0=top.n0, alpha=alpha, p0=p0)
        cascade.append(result.radius if result.prediction == label else 0.0)
        others = [(g2, c2, files[k].sigma) for k, (g2, c2) in zip(order[1:], draws[1:])]
        bound.append(first_stage_bound(draws[0], others, label, top.sigma, alpha, p0, len(files)))
    radii = np.asarray(radii)  # columns in cascade order (largest sigma first)
    return {"idx": np.asarray(idx), "sigmas": [files[k].sigma for k in order], "radii": radii,
            "oracle": radii.max(1), "group": np.asarray(groups), "cascade": np.asarray(cascade),
            "bound": np.asarray(bound)}


def report(b: dict) -> str:
    r1, oracle, group, m = b["radii"][:, 0], b["oracle"], b["group"], len(b["oracle"])
    s = b["sigmas"][0]
    lines = [f"| group (sigma {s:g} expert) | images | its mean radius | oracle's mean radius | gain / all images |",
             "|---|---|---|---|---|"]
    for name in GROUPS:
        k = group == name
        lines.append(f"| {name} | {int(k.sum())} | {r1[k].mean() if k.any() else 0:.3f} | "
                     f"{oracle[k].mean() if k.any() else 0:.3f} | {(oracle[k] - r1[k]).sum() / m:+.4f} |")
        if name == GROUPS[0]:
            for lo, hi in BINS:
                kk = k & (r1 >= lo) & (r1 < hi)
                lines.append(f"| - its radius in [{lo:g}, {hi:g}) | {int(kk.sum())} | "
                             f"{r1[kk].mean() if kk.any() else 0:.3f} | {oracle[kk].mean() if kk.any() else 0:.3f} | "
                             f"{(oracle[kk] - r1[kk]).sum() / m:+.4f} |")
    lines += ["", "| ACR | value |", "|---|---|"]
    for j, sigma in enumerate(b["sigmas"]):
        lines.append(f"| expert sigma {sigma:g} | {b['radii'][:, j].mean():.4f} |")
    lines += [f"| Multiscale cascade | {b['cascade'].mean():.4f} |",
              f"| cascade-first bound (label-aware after the first stage) | {b['bound'].mean():.4f} |",
              f"| oracle | {oracle.mean():.4f} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("expert_results", nargs="+", help="certify --expert TSVs of the same images (>= 2)")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--p0", type=float, default=0.5)
    args = parser.parse_args()
    if len(args.expert_results) < 2:
        sys.exit("error: give at least two experts' results files")
    if args.scale < 1:
        sys.exit(f"error: --scale must be >= 1, got {args.scale}")
    files = [load_expert_counts(p) for p in args.expert_results]
    print(report(breakdown(files, scale=args.scale, alpha=args.alpha, p0=args.p0)))


if __name__ == "__main__":
    main()
