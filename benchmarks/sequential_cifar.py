"""Summarise `benchmarks/sequential_cifar.sh`: the 500-image CIFAR-10 runs with `--sequential --radius-grid 0.25
--max-radius 1.5` (cap N = 10,000) against fixed N = 10,000.

Three comparisons per model (each zoo expert, the routed run):
* samples per image: the sequential rows' ``n_used`` (selection included) against N0 + N per stage;
* seconds per image: median and mean of the rows' ``time`` column, sequential (500 images) against the
  fixed-N run on every 20th of them (25 images, same machine, same engine);
* certified accuracy at r = 0, 0.25, ..., 1.5: the sequential run against the committed fixed-N run
  (`--fixed-dir`, another device's noise, so they differ by sampling noise too) and, row for row on
  the 25 shared images, against the fixed run on this machine (same keyed noise: the sequential
  samples are a prefix of the fixed run's).
Also the whole routed evaluation's wall-clock: the four sequential runs' sidecar session seconds summed.

    python benchmarks/sequential_cifar.py benchmarks/results/sequential-cifar10 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from dualrs_route.router.results import DEFAULT_RADII as GRID
from dualrs_route.router.results import read_results
from sequential_savings import fixed_samples_per_image


def _times(table) -> list[float]:
    return [float(v) for v in table.columns["time"]]


def _accuracy(table, keep=None) -> list[float]:
    mask = np.ones(len(table.idx), bool) if keep is None else np.isin(table.idx, list(keep))
    ok = table.correct.astype(bool) & mask
    return [100 * float(np.sum(ok & (table.radius >= r))) / max(int(mask.sum()), 1) for r in GRID]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results")
    parser.add_argument("--fixed-dir", default="benchmarks/results/cifar10/gaussian-zoo")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.results)
    rows, total_wall = [], 0.0
    for name in ("expert-0.25", "expert-0.5", "expert-1.0", "router"):
        seq_path, fixed_path = out / f"sequential-{name}.tsv", out / f"fixed25-{name}.tsv"
        if not seq_path.exists():
            continue
        seq = read_results(seq_path)
        meta = json.loads(Path(str(seq_path) + ".json").read_text())
        total_wall += float(meta.get("last_session_seconds") or 0.0)
        row = {"model": name, "images": len(seq.idx), "samples": float(np.mean([float(v) for v in seq.columns["n_used"]])),
               "s_median": statistics.median(_times(seq)), "s_mean": float(np.mean(_times(seq))),
               "session_s": meta.get("last_session_seconds"), "accuracy": _accuracy(seq)}
        committed = Path(args.fixed_dir) / f"{name}.tsv"
        if committed.exists():
            ref = read_results(committed)
            row["fixed_samples"] = fixed_samples_per_image(ref, 100, 10_000)
            row["fixed_accuracy_committed"] = _accuracy(ref)
        if fixed_path.exists():
            fixed = read_results(fixed_path)
            row["fixed25_images"] = len(fixed.idx)
            row["fixed25_s_median"] = statistics.median(_times(fixed))
            row["fixed25_s_mean"] = float(np.mean(_times(fixed)))
            row["fixed25_accuracy"] = _accuracy(fixed)
            row["seq_on_25_accuracy"] = _accuracy(seq, keep=fixed.idx)
            seq_time = {int(i): t for i, t in zip(seq.idx, _times(seq))}
            row["seq_on_25_s_median"] = statistics.median(seq_time[int(i)] for i in fixed.idx)
        rows.append(row)
    grid = " | ".join(f"r={r:g}" for r in GRID)
    print(f"| model | run | images | samples / image | x fewer | s / image (median) | x faster | {grid} |")
    print("|" + "---|" * (7 + len(GRID)))
    for r in rows:
        fs = r.get("fixed_samples", float("nan"))
        print(f"| {r['model']} | fixed N (committed, GPU noise) | 500 | {fs:,.0f} | 1.0 | - | - | "
              + " | ".join(f"{a:.1f}" for a in r.get("fixed_accuracy_committed", [])) + " |")
        print(f"| {r['model']} | sequential | {r['images']} | {r['samples']:,.0f} | {fs / r['samples']:.1f} | "
              f"{r['s_median']:.3f} | {r.get('fixed25_s_median', float('nan')) / r['s_median']:.1f} | "
              + " | ".join(f"{a:.1f}" for a in r["accuracy"]) + " |")
        if "fixed25_images" in r:
            print(f"| {r['model']} | fixed N, 25 images (this CPU) | 25 | {fs:,.0f} | 1.0 | {r['fixed25_s_median']:.3f} | "
                  f"1.0 | " + " | ".join(f"{a:.1f}" for a in r["fixed25_accuracy"]) + " |")
            print(f"| {r['model']} | sequential, same 25 images | 25 | - | - | {r['seq_on_25_s_median']:.3f} | "
                  f"{r['fixed25_s_median'] / r['seq_on_25_s_median']:.1f} | "
                  + " | ".join(f"{a:.1f}" for a in r["seq_on_25_accuracy"]) + " |")
    print(f"\nwhole routed evaluation (the four sequential runs, session seconds summed): {total_wall / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "sequential_wall_s": total_wall}, indent=2) + "\n")


if __name__ == "__main__":
    main()
