"""Does a smaller (or adaptive) selection budget N0 lose certificates? Computed from stored per-image results.

The selection draw only picks the class to certify; the certificate comes from the fresh estimation
samples, so any N0, fixed or adaptive, keeps the guarantee. What a small N0 can lose is a certificate:
if the selection picks another class than the top one, that row abstains.

For each row that certified correctly in a stored file, with p = its stored top-class frequency
(count / N), the probability that selection still picks that class is at least the probability that
it wins a strict majority, P[Bin(N0, p) > N0 / 2] (all other classes merged into one, ties counted as
lost: a lower bound). Expected certified accuracy at each radius is the sum of these probabilities over
the rows certified at that radius, divided by the rows; rows that did not certify count as lost for
every N0 (the study cannot see a certificate a different guess would have found). Router files need
both stages' selections: the product of the router's (p = n_router / router_N) and the routed
expert's. "adaptive" draws 10 samples and stops if one class has at least 9 of them, else extends the
same stream to 100 (exact binomial arithmetic, same merged-classes bound).

Command (from the repository root; a few seconds):

    python benchmarks/n0_study.py benchmarks/results/cifar10/gaussian-zoo/*.tsv
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import binom

from dualrs_route.router.results import DEFAULT_RADII, read_results

N0S = (10, 25, 50, 100)
ADAPTIVE_FIRST, ADAPTIVE_STOP, ADAPTIVE_FULL = 10, 9, 100


def majority(p: np.ndarray, n0: int) -> np.ndarray:
    """P[Bin(n0, p) > n0 / 2]: a lower bound on the chance that selection picks the class of probability p."""
    return binom.sf(n0 // 2, n0, p)


def adaptive(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower bound on P[correct pick], expected selection samples) of the adaptive 10 -> 100 rule."""
    a = np.arange(ADAPTIVE_FIRST + 1)
    first = binom.pmf(a[:, None], ADAPTIVE_FIRST, p[None, :])  # [11, rows]
    sure = first[a >= ADAPTIVE_STOP].sum(axis=0)
    extend = (a > ADAPTIVE_FIRST - ADAPTIVE_STOP) & (a < ADAPTIVE_STOP)
    rest = ADAPTIVE_FULL - ADAPTIVE_FIRST
    later = sum(first[k] * binom.sf(ADAPTIVE_FULL // 2 - k, rest, p) for k in a[extend])
    samples = ADAPTIVE_FIRST + rest * first[extend].sum(axis=0)
    return sure + later, samples


def stage_probabilities(table) -> tuple[np.ndarray, list[np.ndarray]]:
    """(certified-correct mask, per-stage top-class frequencies) of a results table."""
    s, cols = table.metadata.get("settings", {}), table.columns
    good = (table.correct == 1) & (table.predict != -1)
    freq = lambda name, n: np.array([float(v) / n if v != "-" else 0.0 for v in cols[name]])  # noqa: E731
    stages = [freq("n_expert", int(s["N"]))]
    if table.mode == "router":
        stages.append(freq("n_router", int(s["router_N"])))
    return good, stages


def study(path: str) -> list[tuple[str, float, list[float]]]:
    """Rows of (rule, selection samples per stage, expected certified accuracy at DEFAULT_RADII)."""
    table = read_results(path)
    good, stages = stage_probabilities(table)
    rules = {f"N0 = {n0}": ([majority(p, n0) for p in stages], n0) for n0 in N0S}
    pairs = [adaptive(p) for p in stages]
    rules["adaptive 10->100"] = ([q for q, _ in pairs], float(np.mean(pairs[0][1][good])) if good.any() else 10.0)
    out = []
    for name, (probs, cost) in rules.items():
        keep = np.prod(probs, axis=0) * good
        acc = [float(np.sum(keep * (table.radius >= r)) / len(table.idx)) for r in DEFAULT_RADII]
        out.append((name, float(cost), acc))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    head = ["file", "selection", "selection samples / stage"] + [f"r={r:g}" for r in DEFAULT_RADII] + ["max loss (points)"]
    print("Expected certified accuracy (%, a lower bound) by selection rule; the stored run used N0 = 100. "
          "Max loss: the largest drop against the stored run's certified accuracy over the radii.\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for path in args.files:
        rows = study(path)
        stored = read_results(path)
        exact = [float(np.mean((stored.correct == 1) & (stored.radius >= r))) for r in DEFAULT_RADII]
        for name, cost, acc in rows:
            loss = max(100 * (b - a) for a, b in zip(acc, exact))
            print("| " + " | ".join([path.split("/")[-1], name, f"{cost:.0f}"] + [f"{100 * a:.1f}" for a in acc]
                                    + [f"{loss:.1f}"]) + " |")


if __name__ == "__main__":
    main()
