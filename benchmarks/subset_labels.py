"""A labels file restricted to some of its experts (issue 12, the level-2 router of ``choice-l2.txt``).

Every image is kept with the chosen experts' columns only, in the order given, so ``train-router`` can train a
router over those experts (``--expert`` naming the same ones, in that order). Images where every kept expert has
radius 0 are kept too: ``train-router`` drops them as it drops any such image.

Usage:
  python benchmarks/subset_labels.py IN.npz OUT.npz --keep 0 1
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
from dualrs_route.router.labels import LabelSet, load_labels, save_labels  # noqa: E402


def subset(labels: LabelSet, keep: list[int]) -> LabelSet:
    """``labels`` with the columns of experts ``keep`` only (DataError for a bad or repeated index)."""
    k = len(labels.experts)
    if not keep or len(set(keep)) != len(keep) or not all(0 <= j < k for j in keep):
        raise DataError(f"--keep {keep}: give distinct expert indices in 0..{k - 1}")
    meta = dict(labels.meta, subset={"kept": [labels.experts[j] for j in keep], "by": "benchmarks/subset_labels.py"})
    if isinstance(meta.get("models"), list) and len(meta["models"]) == k:
        meta["models"] = [meta["models"][j] for j in keep]
    return dataclasses.replace(
        labels, radii=labels.radii[:, keep], predictions=labels.predictions[:, keep], p_lower=labels.p_lower[:, keep],
        experts=[labels.experts[j] for j in keep], references=[labels.references[j] for j in keep],
        sha256=[labels.sha256[j] for j in keep], sigmas=labels.sigmas[keep], meta=meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("labels")
    parser.add_argument("out")
    parser.add_argument("--keep", type=int, nargs="+", required=True, help="expert indices to keep, in order")
    args = parser.parse_args()
    if Path(args.out).exists():
        sys.exit(f"error: {args.out} exists")
    try:
        out = subset(load_labels(args.labels, require_complete=True), args.keep)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    save_labels(args.out, out)
    routable = out.radii.max(1) > 0
    print(json.dumps({"images": len(out.indices), "experts": out.experts, "routable": int(routable.sum()),
                      "best_expert": np.bincount(out.radii.argmax(1)[routable], minlength=len(out.experts)).tolist()}))


if __name__ == "__main__":
    main()
