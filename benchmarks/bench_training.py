"""Expert-training step time, fp32 against bf16 autocast, Gaussian augmentation against consistency
regularisation (m = 2), measured side by side in one process on the same inputs.

A step is what `train-expert` does per batch: vectorised crop/flip, noise, forward, loss, backward,
SGD step (ResNet-20, channels_last, batch 128). Seconds per epoch = median step x ceil(50,000 / batch).

    python benchmarks/bench_training.py [--threads 2] [--steps 6] [--json out.json]

``--compare A.pt B.pt ...``: accuracy instead of speed. For training checkpoints of the same recipe (e.g.
fp32 and bf16 runs stopped at the same epoch), print each run's per-epoch training record side by side
and each model's noisy accuracy (one Gaussian copy per image at the checkpoint's sigma, seed 0) on the
first 2,000 CIFAR-10 test images (``--data``, default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path


def cpu_description() -> dict:
    info = {"machine": platform.machine(), "model": "?", "family": "?", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and info["model"] == "?":
            info["model"] = value
        elif key == "cpu family" and info["family"] == "?":
            info["family"] = value
        elif key == "flags" and not info["flags"]:
            info["flags"] = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma")))
    return info


def compare(paths: list[str], data: str, threads: int, out: str | None) -> None:
    import numpy as np
    import torch

    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.data import CIFAR10_MEAN, CIFAR10_STD, load_dataset
    from dualrs_route.experts.training import noisy_accuracy

    torch.set_num_threads(threads)
    test = load_dataset("cifar10", split="test", data=data)
    runs = []
    for path in paths:
        state = torch.load(path, weights_only=True)
        settings = state["settings"]
        model = build_model(settings["arch"], num_classes=10, input_shape=(3, 32, 32), mean=CIFAR10_MEAN,
                            std=CIFAR10_STD, **settings.get("arch_args", {}))
        model.load_state_dict(state["model"])
        accuracy = noisy_accuracy(model, test, np.arange(2000), settings["sigma"], 0)
        runs.append({"checkpoint": path, "precision": settings["precision"], "sigma": settings["sigma"],
                     "epoch": state["epoch"], "history": state["history"], "noisy_test_accuracy_2000": accuracy})
    head = "epoch | " + " | ".join(f"{r['precision']} loss | {r['precision']} noisy train acc" for r in runs)
    print(head)
    for e in range(min(r["epoch"] for r in runs)):
        print(f"{e + 1} | " + " | ".join(f"{r['history'][e]['loss']:.4f} | {100 * r['history'][e]['noisy_train_accuracy']:.2f}"
                                         for r in runs))
    for r in runs:
        print(f"{r['checkpoint']}: {r['precision']}, epoch {r['epoch']}, noisy test accuracy (sigma {r['sigma']}, "
              f"2,000 images) {100 * r['noisy_test_accuracy_2000']:.2f}%")
    if out:
        Path(out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "runs": runs},
                                        indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", nargs="+", default=None, metavar="CHECKPOINT")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.data, args.threads, args.json)
        return

    import torch

    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.data import CIFAR10_MEAN, CIFAR10_STD
    from dualrs_route.experts.training import augment, bf16_supported, consistency_loss

    torch.set_num_threads(args.threads)
    x0 = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    steps_per_epoch = math.ceil(50_000 / args.batch)
    rows = []
    for precision in ("fp32", "bf16"):
        for copies in (1, 2):
            torch.manual_seed(0)
            model = build_model("cifar_resnet20", num_classes=10, input_shape=(3, 32, 32), mean=CIFAR10_MEAN,
                                std=CIFAR10_STD).to(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            gen = torch.Generator().manual_seed(0)
            times = []
            for step in range(args.steps + 2):
                start = time.perf_counter()
                x = augment(x0, gen)
                if copies > 1:
                    x = x.repeat(copies, 1, 1, 1)
                x = (x + 0.5 * torch.randn(x.shape, generator=gen)).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(x)
                loss = consistency_loss(logits, y, copies, 10.0 if copies > 1 else 0.0, 0.5 if copies > 1 else 0.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
            median = statistics.median(times[2:])
            rows.append({"precision": precision, "recipe": "consistency m=2" if copies > 1 else "gaussian",
                         "step_ms": round(1000 * median, 1), "epoch_s": round(median * steps_per_epoch, 1)})
            print(f"{precision:5s} {rows[-1]['recipe']:16s} step {rows[-1]['step_ms']:8.1f} ms   "
                  f"epoch {rows[-1]['epoch_s']:8.1f} s", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "native_bf16": bf16_supported(),
              "threads": args.threads, "batch": args.batch, "torch": torch.__version__, "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
