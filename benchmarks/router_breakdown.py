"""Where a router gains and loses against the largest-sigma expert, by the groups of ``oracle_breakdown.py``
(issue 12, ninth session). A diagnosis on replayed certificates; it chooses nothing.

For each router scores file, the router's replayed certificate (``unseen_replay.py``'s K = 3 candidate at
``--scale``, dual CERTIFY and router sets at ``--tau``) is compared image by image with the constant router to the
largest-sigma expert (the alpha split paid, as every replay here). Each group's row is the sum of the per-image
differences divided by all images, so the rows add up to the router's ACR gap to that constant router.
A finished routed results file (``--results NAME=R.tsv``, e.g. a test run's ``router-sets.tsv``) is compared
with the largest-sigma expert's own results file instead, as the test table compares them.

Usage:
  python benchmarks/router_breakdown.py [--scores NAME=S.npz ...] [--results NAME=R.tsv ...]
      --expert-results A.tsv B.tsv C.tsv [--scale 10] [--tau 0.05] [--alpha 0.001]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dualrs_route.router import calibrate  # noqa: E402
from dualrs_route.router.cascade_replay import load_expert_counts  # noqa: E402
from dualrs_route.router.dual import split_alpha  # noqa: E402
from oracle_breakdown import BINS, GROUPS, breakdown  # noqa: E402
from paired_gap import per_image as file_values  # noqa: E402
from unseen_replay import candidate, per_image  # noqa: E402


def router_rows(scores, stages, *, scale: int, alpha: float, tau: float) -> dict[str, np.ndarray]:
    """Per-image values (radius where correct) of the dual and the sets certificate, and of the constant router to
    the largest-sigma expert, in the scores' image order."""
    a, beta = split_alpha(alpha, None)
    stand_in, experts, counts = candidate(scores, stages, None, scale)
    offsets = np.zeros(len(experts), dtype=np.float32)
    plain = calibrate.simulate(stand_in, experts, offsets, alpha=a, beta=beta, counts=counts)
    sets = calibrate.simulate_sets(stand_in, experts, offsets, alpha=a, beta=beta, tau=tau, counts=counts)
    constants = calibrate.constant_routers(scores, stages, alpha=a, beta=beta, scale=scale)
    widest = max(range(len(stages)), key=lambda k: stages[k].sigma)
    return {"dual": per_image(plain), "sets": per_image(sets),
            "constant": per_image(list(constants.values())[widest])}


def table(groups: np.ndarray, radius: np.ndarray, rows: dict[str, np.ndarray]) -> list[str]:
    """Markdown rows: per group (and per radius bin of the decided-right group) the images and the summed gains
    of every column of ``rows`` but ``constant`` (the reference), in ``rows``' order."""
    m = len(groups)
    columns = [k for k in rows if k != "constant"]

    def row(label: str, keep: np.ndarray) -> str:
        cells = [f"{(rows[k][keep] - rows['constant'][keep]).sum() / m:+.4f}" for k in columns]
        return f"| {label} | {int(keep.sum())} | {' | '.join(cells)} |"

    out = []
    for name in GROUPS:
        keep = groups == name
        out.append(row(name, keep))
        if name == GROUPS[0]:
            out += [row(f"- its radius in [{lo:g}, {hi:g})", keep & (radius >= lo) & (radius < hi)) for lo, hi in BINS]
    out.append(row("all", np.ones(m, dtype=bool)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scores", action="append", default=[], help="NAME=router-scores.npz")
    parser.add_argument("--results", action="append", default=[], help="NAME=routed results TSV")
    parser.add_argument("--expert-results", nargs="+", required=True)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.001)
    args = parser.parse_args()
    if not args.scores and not args.results:
        sys.exit("error: give --scores NAME=S.npz or --results NAME=R.tsv")
    files = [load_expert_counts(p) for p in args.expert_results]
    b = breakdown(files, scale=args.scale, alpha=args.alpha, p0=0.5)
    for spec in args.scores:
        name, _, path = spec.partition("=")
        scores = calibrate.load_scores(path)
        if not np.array_equal(np.asarray(scores.idx), b["idx"]):
            sys.exit(f"error: {path} holds other images than the expert results (or in another order)")
        stages = [calibrate.load_expert_stage(p, scores) for p in args.expert_results]
        rows = router_rows(scores, stages, scale=args.scale, alpha=args.alpha, tau=args.tau)
        print(f"\n{name}, x{args.scale}: gain over the constant router to sigma {b['sigmas'][0]:g} "
              f"(ACR {rows['constant'].mean():.4f}), summed per group / all images")
        print(f"| group | images | dual | sets, tau {args.tau:g} |")
        print("|---|---|---|---|")
        print("\n".join(table(b["group"], b["radii"][:, 0], rows)))
    widest = max(files, key=lambda f: f.sigma).path
    for spec in args.results:
        name, _, path = spec.partition("=")
        (idx, routed), (ref_idx, reference) = file_values(path), file_values(widest)
        if not (np.array_equal(idx, b["idx"]) and np.array_equal(ref_idx, b["idx"])):
            sys.exit(f"error: {path} holds other images than the expert results")
        print(f"\n{name}: gain over the sigma {b['sigmas'][0]:g} expert's own results (ACR {reference.mean():.4f}), "
              "summed per group / all images")
        print("| group | images | gain |")
        print("|---|---|---|")
        print("\n".join(table(b["group"], b["radii"][:, 0], {"routed": routed, "constant": reference})))


if __name__ == "__main__":
    main()
