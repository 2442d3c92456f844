"""What ``certify --share-noise`` saves: the same images certified by the zoo router with and without it.

The images are test images the committed router routes to its sigma 1.0 expert (sigma_e = 1.0), so every
row's expert stage can read the router stage's noisy inputs. Runs alternate (plain, shared) ``--repeats``
times in fresh processes; the medians of the per-run wall-clock are compared. Also times the noise draw
itself against a cache copy (``experts.noise``), the part sharing removes.

    python benchmarks/bench_share_noise.py --data ../shared/data --images 8 --repeats 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def noise_costs(samples: int = 4000) -> dict:
    import torch

    from dualrs_route.experts.noise import NoiseKey, Stage, fill_torch_noise, sharing

    key, gen, out = NoiseKey(0, 1, Stage.ROUTER_ESTIMATE), torch.Generator(), torch.empty(400, 3, 32, 32)
    fill_torch_noise(out, gen, key, 0, 400)
    start = time.perf_counter()
    for i in range(samples // 400):
        fill_torch_noise(out, gen, key, i * 400, (i + 1) * 400)
    draw = (time.perf_counter() - start) / samples
    with sharing():
        for i in range(samples // 400):
            fill_torch_noise(out, gen, key, i * 400, (i + 1) * 400)
        start = time.perf_counter()
        for i in range(samples // 400):
            fill_torch_noise(out, gen, key, i * 400, (i + 1) * 400)
        copy = (time.perf_counter() - start) / samples
    return {"draw_us_per_sample": 1e6 * draw, "cached_copy_us_per_sample": 1e6 * copy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--router", default="router/zoo/cifar10-router")
    parser.add_argument("--routed", default="benchmarks/results/cifar10/gaussian-zoo/router.tsv",
                        help="a results file of this router: images routed to its sigma 1.0 expert are taken")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--N", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", default="onnxruntime")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    lines = Path(args.routed).read_text().splitlines()[1:]
    idx = [int(line.split("\t")[0]) for line in lines if line.split("\t")[6].startswith("2:")][:args.images]
    test = np.load(Path(args.data) / "cifar10_test.npz")
    work = Path(tempfile.mkdtemp(prefix="share-noise-"))
    np.savez(work / "images.npz", x=test["x"][idx], y=test["y"][idx])
    base = [sys.executable, "-c", "from dualrs_route.cli import main; main()", "certify", "--router", args.router,
            "--dataset", f"npz:{work / 'images.npz'}", "--N0", "100", "--N", str(args.N), "--alpha", "0.001",
            "--seed", "0", "--threads", str(args.threads), "--engine", args.engine, "--quiet"]
    walls: dict[str, list[float]] = {"plain": [], "shared": []}
    for r in range(args.repeats):
        for name, extra in (("plain", []), ("shared", ["--share-noise"])):
            out = work / f"{name}-{r}.tsv"
            start = time.perf_counter()
            subprocess.run([*base, *extra, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
            walls[name].append(time.perf_counter() - start)
            print(f"{name} run {r}: {walls[name][-1]:.2f} s", flush=True)
    rows = {name: [line.split("\t") for line in (work / f"{name}-0.tsv").read_text().splitlines()[1:]]
            for name in walls}
    routed = sum(row[6].startswith("2:") for row in rows["shared"])
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "images": idx, "routed_to_sigma_e": routed,
              "N": args.N, "engine": args.engine, "threads": args.threads,
              "median_s": {k: statistics.median(v) for k, v in walls.items()}, "runs_s": walls,
              "noise": noise_costs()}
    result["speedup"] = result["median_s"]["plain"] / result["median_s"]["shared"]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
