"""Router labels re-scored at a larger certification budget (issue 12, lever "labels at the test's N").

A labels file holds each expert's N = 100 certificate on each image. At N = 100 a radius is capped at
1.50 sigma_k and its Clopper-Pearson bound is loose, while the test table certifies at N = 10,000 (cap 3.2
sigma_k). This rewrites every *certified, correct* label radius as the radius the same vote share would give at
``--n`` samples: the label's count c is recovered exactly from its stored p_lower (the bound is strictly
increasing in c), and the new radius is sigma_k Phi^-1(p_lower(c * n / N, n, alpha)). Zero radii (abstained or
wrong at N = 100) stay zero. The result is a training target, not a certificate.

Usage:
  python benchmarks/rescale_labels.py IN.npz OUT.npz [--n 10000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.experts.errors import DataError  # noqa: E402
from dualrs_route.experts.stats import certified_radius, lower_confidence_bound  # noqa: E402
from dualrs_route.router.labels import LabelSet, load_labels, save_labels  # noqa: E402


def label_counts(p_lower: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """int64 counts whose Clopper-Pearson lower bound at (n, alpha) is ``p_lower`` (DataError if one is not)."""
    table = np.array([lower_confidence_bound(c, n, alpha) for c in range(n + 1)])
    counts = np.searchsorted(table, p_lower - 1e-12)
    counts = np.clip(counts, 0, n)
    if not np.allclose(table[counts], p_lower, rtol=0, atol=1e-9):
        bad = int(np.argmax(~np.isclose(table[counts], p_lower, rtol=0, atol=1e-9)))
        raise DataError(f"p_lower {p_lower.flat[bad]!r} is no Clopper-Pearson bound at N = {n}, alpha = {alpha:g}")
    return counts.astype(np.int64)


def rescale(labels: LabelSet, n_to: int) -> LabelSet:
    """``labels`` with every positive radius re-derived at ``n_to`` samples from the same vote share."""
    settings = labels.meta.get("settings", labels.meta)
    n, alpha = int(settings["N"]), float(settings["alpha"])
    if n_to % n:
        raise DataError(f"--n {n_to} must be a multiple of the labels' N = {n}")
    counts = label_counts(labels.p_lower, n, alpha)
    radii = np.zeros_like(labels.radii)
    cache: dict[tuple[int, float], float] = {}
    for i, k in zip(*np.nonzero(labels.radii > 0)):
        key = (int(counts[i, k]) * (n_to // n), float(labels.sigmas[k]))
        if key not in cache:
            cache[key] = certified_radius(key[1], lower_confidence_bound(key[0], n_to, alpha))
        radii[i, k] = cache[key]
    meta = dict(labels.meta, rescaled={"from_N": n, "to_N": int(n_to), "by": "benchmarks/rescale_labels.py"})
    return dataclasses.replace(labels, radii=radii.astype(labels.radii.dtype), meta=meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("labels")
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    if Path(args.out).exists():
        sys.exit(f"error: {args.out} exists")
    try:
        labels = load_labels(args.labels, require_complete=True)
        out = rescale(labels, args.n)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    save_labels(args.out, out)
    best = np.bincount(out.radii.argmax(1)[out.radii.max(1) > 0], minlength=len(out.sigmas))
    print(json.dumps({"images": len(out.indices), "best_expert_before": np.bincount(
        labels.radii.argmax(1)[labels.radii.max(1) > 0], minlength=len(out.sigmas)).tolist(),
        "best_expert_after": best.tolist()}))


if __name__ == "__main__":
    main()
