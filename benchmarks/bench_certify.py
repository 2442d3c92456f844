"""Certification speed: the torch engine against a naive Cohen-style loop, and Dual RS overhead.

Measured side by side in one process, on the same cifar_resnet20 (random weights
unless --expert is given: speed does not depend on the weights):

1. noisy samples/s of ``experts.engine.TorchCounter`` vs a loop in the style of Cohen
   et al.'s ``_sample_noise`` (fp32 eager, ``x.repeat``, ``randn_like``, Python-side
   counting), at several batch sizes; medians over repeats and their ratio;
2. seconds per certified CIFAR-10 image (N0 = 100, N = 10,000) with the torch engine;
3. Dual RS: seconds per image of router + expert certification vs the expert alone, at
   the same N, for a router as large as the expert (cifar_resnet20) and a small one
   (small_cnn), i.e. the paper's "+60%" figure for our models.

Usage:
    python benchmarks/bench_certify.py --threads 2 [--expert DIR] [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import numpy as np
import torch

from dualrs_route.experts.architectures import build_model, count_flops
from dualrs_route.experts.data import CIFAR10_MEAN, CIFAR10_STD
from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.router.dual import DualCertifier, router_smoothed

SHAPE = (3, 32, 32)


def cifar_model(arch: str, num_classes: int = 10, **args):
    torch.manual_seed(0)
    return build_model(arch, num_classes=num_classes, input_shape=SHAPE, mean=CIFAR10_MEAN, std=CIFAR10_STD, **args).eval()


def naive_counts(model, x: torch.Tensor, sigma: float, num: int, batch_size: int, num_classes: int = 10) -> np.ndarray:
    """Cohen et al.'s sampling loop, re-written: repeat, randn_like, argmax, count in Python."""
    counts = np.zeros(num_classes, dtype=int)
    with torch.no_grad():
        remaining = num
        for _ in range(math.ceil(num / batch_size)):
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1).numpy()
            for p in predictions:  # Python-side counting, as in _count_arr
                counts[p] += 1
    return counts


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--expert", default=None, help="expert folder (default: random cifar_resnet20)")
    parser.add_argument("--samples", type=int, default=2000, help="noisy samples per timing repeat")
    parser.add_argument("--batches", default="100,400,1000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--certify-images", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sigma = 0.25
    if args.expert:
        from dualrs_route.experts.folders import load_folder

        model = load_folder(args.expert).load_torch_model()
        source = args.expert
    else:
        model = cifar_model("cifar_resnet20")
        source = "cifar_resnet20, random weights"
    flops = count_flops(model, SHAPE)
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE, dtype=np.float32)
    x = torch.from_numpy(image)[None]
    report = {"machine": platform.platform(), "processor": platform.processor(), "threads": args.threads,
              "torch": torch.__version__, "model": source, "flops_per_sample": flops, "samples_per_repeat": args.samples,
              "repeats": args.repeats, "throughput": [], "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"model: {source}, {flops / 1e6:.1f} MFLOP/sample, {args.threads} threads")
    print("| batch | naive samples/s | engine samples/s | ratio |\n|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        model = model.to(memory_format=torch.contiguous_format)  # the engine converts it; the baseline gets it plain
        t_naive = median_time(lambda: naive_counts(model, x, sigma, args.samples, batch), args.repeats)
        engine = TorchCounter(model, num_classes=10, input_shape=SHAPE, batch_size=batch)
        key = NoiseKey(0, 0, Stage.EXPERT_ESTIMATE)
        t_engine = median_time(lambda: engine.counts(image, sigma, args.samples, key=key), args.repeats)
        row = {"batch": batch, "naive_samples_per_s": args.samples / t_naive,
               "engine_samples_per_s": args.samples / t_engine, "ratio": t_naive / t_engine}
        report["throughput"].append(row)
        print(f"| {batch} | {row['naive_samples_per_s']:.0f} | {row['engine_samples_per_s']:.0f} | {row['ratio']:.2f}x |")

    # Seconds per certified image, N0 = 100, N = 10,000.
    engine = TorchCounter(model, num_classes=10, input_shape=SHAPE, batch_size=400)
    expert = SmoothedClassifier(engine, sigma)
    images = [rng.random(SHAPE, dtype=np.float32) for _ in range(args.certify_images)]

    def certify_single(i):
        return expert.certify(images[i], n0=100, n=10_000, alpha=0.001, index=i)

    single = [median_time(lambda i=i: certify_single(i), 1) for i in range(len(images))]
    report["seconds_per_certified_image_N10000"] = statistics.median(single)
    print(f"\nseconds per certified image (N0=100, N=10,000, torch engine, batch 400): {statistics.median(single):.2f}")

    # Dual RS overhead: router + expert vs expert alone, same N, per router size.
    report["dual"] = []
    print("\n| router | router MFLOP | single s/img | dual s/img | overhead |\n|---|---|---|---|---|")
    for name, arch, arch_args in [("cifar_resnet20 (as large as the expert)", "cifar_resnet20", {}),
                                  ("small_cnn [16,32,64]", "small_cnn", {"channels": [16, 32, 64], "hidden": 64})]:
        router_model = cifar_model(arch, num_classes=3, **arch_args)
        # Bias the router towards expert 0 so that the expert stage always runs (like a confident router).
        last = [m for m in router_model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
        router = router_smoothed(TorchCounter(router_model, num_classes=3, input_shape=SHAPE, batch_size=400), 1.0)
        dual = DualCertifier(router, [expert, expert, expert])
        t_dual, t_single = [], []
        for i in range(len(images)):
            t_single.append(median_time(lambda i=i: certify_single(i), 1))
            t_dual.append(median_time(lambda i=i: dual.certify(images[i], n0=100, n=10_000, alpha=0.0005, router_n0=100,
                                                               router_n=10_000, beta=0.0005, index=i), 1))
        s, d = statistics.median(t_single), statistics.median(t_dual)
        rflops = count_flops(router_model, SHAPE)
        report["dual"].append({"router": name, "router_flops": rflops, "single_s": s, "dual_s": d, "overhead": d / s - 1})
        print(f"| {name} | {rflops / 1e6:.1f} | {s:.2f} | {d:.2f} | +{100 * (d / s - 1):.0f}% |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
