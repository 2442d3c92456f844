"""How sure is an ACR difference? The paired gap between two results files on the same images.

ACR is the mean over images of (certified radius if correct, else 0). Two rows certified on the same images
differ by the mean of the per-image differences d_i, whose standard error is std(d) / sqrt(n); a bootstrap over
images (resampling the pairs) gives a 95% interval. On 500 CIFAR-10 images the per-image radii spread over
0 ... 3.7, so an ACR gap of 0.02 is near the resolution of one such set: this script says how near.

Usage:
  python benchmarks/paired_gap.py A.tsv B.tsv [C.tsv ...] [--bootstrap 10000] [--seed 0]
prints, for each file after the first, ACR(file) - ACR(first) with its standard error and bootstrap interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.router.results import read_results  # noqa: E402


def per_image(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(idx, radius where correct else 0) of one results file, sorted by idx."""
    table = read_results(path)
    order = np.argsort(table.idx)
    return np.asarray(table.idx)[order], np.where(np.asarray(table.correct)[order] == 1,
                                                  np.asarray(table.radius, dtype=np.float64)[order], 0.0)


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(b - a) over images: std(d) / sqrt(n), d the per-image differences."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def paired_gap(a: np.ndarray, b: np.ndarray, *, bootstrap: int = 10_000, seed: int = 0) -> dict:
    """mean(b - a), its standard error and a 95% percentile-bootstrap interval over images."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(d)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(bootstrap, n))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"gap": float(d.mean()), "se": paired_se(a, b), "ci95": (float(lo), float(hi)), "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--bootstrap", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if len(args.files) < 2:
        parser.error("give a reference file and at least one more")
    idx0, ref = per_image(args.files[0])
    print(f"reference {args.files[0]}: ACR {ref.mean():.4f} on {len(ref)} images")
    for path in args.files[1:]:
        idx, other = per_image(path)
        if not np.array_equal(idx, idx0):
            sys.exit(f"error: {path} holds other images than {args.files[0]}")
        g = paired_gap(ref, other, bootstrap=args.bootstrap, seed=args.seed)
        print(f"{path}: ACR {other.mean():.4f}, gap {g['gap']:+.4f} (se {g['se']:.4f}, 95% bootstrap "
              f"[{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}])")


if __name__ == "__main__":
    main()
