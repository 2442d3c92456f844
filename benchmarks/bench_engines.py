"""Issue 5 benchmark: every engine side by side on one CIFAR-10 ResNet-20 expert, in one run.

Usage (from the repository root; writes nothing into the repository except --json):

    python benchmarks/bench_engines.py --threads 2 --json benchmarks/engines.json

Rows (noisy samples/s, medians over --repeats, engines timed round-robin so that load
changes hit all of them alike):

* baseline: Cohen et al.'s loop (fp32 eager torch, ``x.repeat`` + ``randn_like``, Python counting);
* torch engine fp32 and bf16 (:class:`experts.engine.TorchCounter`, keyed noise, channels_last),
  eager and through ``torch.compile`` (``--compile``; compiled during the warm-up run);
* ONNX Runtime fp32 (host torch noise drawn in a prefetch thread, I/O binding), and the same
  without I/O binding, without prefetch and with numpy noise (the torch-free path), to
  document those decisions;
* ONNX Runtime int8 (static QDQ, calibrated at the expert's sigma).

Each row gets its ratio to the baseline and its fraction of the fp32 FLOP-bound limit
(measured 2048^2 matmul peak, the best of torch's and numpy's BLAS, / counted FLOPs per sample). With a trained expert and the
CIFAR-10 test set (``--data``), it also certifies ``--agreement-images`` test images with
every engine and reports how often certified predictions (abstentions included) and
radii agree with the torch fp32 engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_EXPERT = ROOT / "experts" / "zoo" / "cifar10-resnet20-sigma0.25"
BASELINE = "baseline (Cohen loop, fp32 eager)"


def load_split(dataset: str, split: str, data: Path | None):
    """The dataset split, or None when its files are absent (CIFAR-10 without ../shared/data)."""
    from dualrs_route.experts.data import load_dataset
    from dualrs_route.experts.errors import DataError

    try:
        return load_dataset(dataset, split=split, data=str(data) if data else None)
    except DataError:
        return None


def prepare_expert(expert: Path, work: Path, dataset: str, data: Path | None,
                   calibration: int) -> tuple[Path, bool, str]:
    """Copy (or create) the expert in ``work`` with model.onnx and model.int8.onnx. Returns (folder, trained, note)."""
    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
    from dualrs_route.experts.folders import ModelConfig, save_folder
    from dualrs_route.export.onnx_export import export_onnx
    from dualrs_route.export.quantize import quantize_int8

    folder = work / "expert"
    if (expert / "config.json").is_file() and (expert / "model.safetensors").is_file():
        export_onnx(str(expert), folder, copy_weights=True)
        trained, note = True, f"trained expert {expert.relative_to(ROOT) if expert.is_relative_to(ROOT) else expert}"
    else:
        import torch

        torch.manual_seed(0)
        model = build_model("cifar_resnet20", num_classes=10, input_shape=(3, 32, 32), mean=CIFAR10_MEAN,
                            std=CIFAR10_STD)
        config = ModelConfig(kind="expert", sigma=0.25, num_classes=10, input_shape=(3, 32, 32), mean=CIFAR10_MEAN,
                             std=CIFAR10_STD, architecture="cifar_resnet20", class_names=CIFAR10_CLASSES,
                             name="random-resnet20")
        save_folder(folder, config, model.eval())
        export_onnx(str(folder))
        trained, note = False, f"RANDOMLY INITIALISED cifar_resnet20 ({expert} not found): timing only"
    images = None
    train = load_split(dataset, "train", data)
    if train is not None:
        picked = np.random.default_rng(0).choice(len(train), size=min(1000, len(train)), replace=False)
        images = train.batch(np.sort(picked))
    quantize_int8(str(folder), images=images, samples=calibration)
    note += (f"; int8 calibrated on {len(images)} {dataset} training images + noise at sigma" if images is not None
             else "; int8 calibrated on synthetic images + noise at sigma")
    return folder, trained, note


CPU_ENGINES = {
    "torch fp32": dict(engine="torch", precision="fp32"),
    "torch bf16": dict(engine="torch", precision="bf16"),
    "torch fp32 compiled": dict(engine="torch", precision="fp32", compile=True),
    "torch bf16 compiled": dict(engine="torch", precision="bf16", compile=True),
    "onnxruntime fp32": dict(engine="onnxruntime"),
    "onnxruntime fp32, no I/O binding": dict(engine="onnxruntime", io_binding=False),
    "onnxruntime fp32, no prefetch": dict(engine="onnxruntime", prefetch=False),
    "onnxruntime fp32, numpy noise": dict(engine="onnxruntime", noise="numpy"),
    "onnxruntime int8": dict(engine="onnxruntime", precision="int8"),
}
GPU_ENGINES = {
    "torch fp32": dict(engine="torch", precision="fp32"),
    "torch fp32, channels_last": dict(engine="torch", precision="fp32", channels_last=True),
    "torch bf16": dict(engine="torch", precision="bf16"),
    "torch bf16, NCHW": dict(engine="torch", precision="bf16", channels_last=False),
    "torch fp16": dict(engine="torch", precision="fp16"),
    "torch fp32 compiled": dict(engine="torch", precision="fp32", compile=True),
    "torch bf16 compiled": dict(engine="torch", precision="bf16", compile=True),
    "torch fp16 compiled": dict(engine="torch", precision="fp16", compile=True),
    "onnxruntime-cuda fp32": dict(engine="onnxruntime", provider="cuda"),
    "onnxruntime-tensorrt fp32": dict(engine="onnxruntime", provider="tensorrt"),
    "onnxruntime-tensorrt fp16": dict(engine="onnxruntime", provider="tensorrt", precision="fp16"),
    "tensorrt fp32": dict(engine="tensorrt", precision="fp32"),
    "tensorrt fp16": dict(engine="tensorrt", precision="fp16"),
}
AGREEMENT = {"cpu": ("torch fp32", "torch bf16", "torch fp32 compiled", "torch bf16 compiled", "onnxruntime fp32",
                     "onnxruntime int8"),
             "cuda": tuple(n for n in GPU_ENGINES if "channels_last" not in n and "NCHW" not in n)}


def engine_specs(device: str) -> dict:
    return GPU_ENGINES if device.startswith("cuda") else CPU_ENGINES


def make_engine(f, name: str, batch: int, threads: int, device: str):
    """The counter for engine row ``name`` on ``device``; raises DualRSError/ValueError/ImportError if it cannot run."""
    from dualrs_route.export.engines import make_counter

    options = dict(engine_specs(device)[name])
    if options["engine"] == "onnxruntime" and threads:
        options["threads"] = threads
    return make_counter(f, device=device, batch_size=batch, **options)


def build_engines(folder: Path, batch: int, threads: int, device: str = "cpu"):
    """(name -> callable counting n samples of x at sigma with a fixed key, name -> why a row cannot run here)."""
    import torch

    from dualrs_route.experts.errors import DualRSError
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.experts.noise import NoiseKey, Stage
    from dualrs_route.router.bench import naive_cohen_counts

    f = load_folder(str(folder))
    cfg = f.config
    key = NoiseKey(0, 0, Stage.EXPERT_ESTIMATE)
    engines, skipped = {}, {}
    for name in engine_specs(device):
        try:
            counter = make_engine(f, name, batch, threads, device)
        except (DualRSError, ValueError, ImportError) as exc:
            skipped[name] = " ".join(str(exc).split())
            continue
        engines[name] = (lambda x, sigma, n, c=counter: c.counts(x, sigma, n, key=key))
    # the baseline last, so that an fp32 counter has already switched TF32 off on a GPU: all fp32 rows are fp32
    baseline_model = f.load_torch_model().eval().to(device)

    def baseline(x, sigma, n):
        return naive_cohen_counts(baseline_model, torch.from_numpy(x).to(device), sigma, n, batch, cfg.num_classes)

    return {BASELINE: baseline, **engines}, skipped


def noise_rates(shape, samples: int, repeats: int) -> dict:
    """Noise generation alone (x + sigma * eps into a host buffer), samples/s, torch vs numpy keyed blocks."""
    from dualrs_route.experts.noise import NoiseKey, Stage
    from dualrs_route.router.bench import median_seconds
    from dualrs_route.export.runtime import NumpyHostNoise, TorchHostNoise

    x = np.full(shape, 0.5, dtype=np.float32)
    out = np.empty((samples, *shape), dtype=np.float32)
    key = NoiseKey(0, 0, Stage.EXPERT_ESTIMATE)
    rates = {}
    for source in (TorchHostNoise(shape), NumpyHostNoise(shape)):
        median, _ = median_seconds(lambda s=source: s.add_noise(out, x, 0.25, key, 0, samples), repeats=repeats)
        rates[source.name] = samples / median
    return rates


def agreement(folder: Path, test, images: int, n0: int, n: int, batch: int, threads: int, log,
              device: str = "cpu") -> dict:
    """Certify ``images`` test images (evenly spaced) with each engine; compare with torch fp32."""
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.export.engines import make_counter
    from dualrs_route.experts.smoothing import SmoothedClassifier

    f = load_folder(str(folder))
    images = min(images, len(test))
    indices = np.linspace(0, len(test) - 1, images).astype(int)
    xs, labels = test.batch(indices), test.labels[indices]
    from dualrs_route.experts.errors import DualRSError

    certs, skipped = {}, {}
    for name in AGREEMENT["cuda" if device.startswith("cuda") else "cpu"]:
        start = time.perf_counter()
        try:
            counter = make_engine(f, name, batch, threads, device)
        except (DualRSError, ValueError, ImportError) as exc:
            skipped[name] = " ".join(str(exc).split())
            continue
        smoothed = SmoothedClassifier(counter, f.config.sigma)
        certs[name] = [smoothed.certify(x, n0=n0, n=n, alpha=0.001, seed=0, index=int(i))
                       for x, i in zip(xs, indices)]
        log(f"  certified {images} images with {name} in {time.perf_counter() - start:.0f} s")
    reference = certs["torch fp32"]
    out = {"images": int(images), "N0": n0, "N": n, "alpha": 0.001, "dataset": test.name, "skipped": skipped,
           "indices": f"np.linspace(0, {len(test) - 1}, {images}).astype(int)"}
    for name, results in certs.items():
        same = [a.prediction == b.prediction for a, b in zip(reference, results)]
        radius_diff = [abs(a.radius - b.radius) for a, b in zip(reference, results)]
        correct = [r.prediction == y for r, y in zip(results, labels)]
        out[name] = {"prediction_agreement": float(np.mean(same)), "mean_abs_radius_diff": float(np.mean(radius_diff)),
                     "radius_within_0.05": float(np.mean(np.array(radius_diff) <= 0.05)),
                     "certified_accuracy_r0": float(np.mean(correct)),
                     "abstain_rate": float(np.mean([r.prediction == -1 for r in results]))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expert", type=Path, default=DEFAULT_EXPERT)
    parser.add_argument("--dataset", default="cifar10", help="cifar10 (files in --data) or digits")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--no-timing", action="store_true", help="only the agreement part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", default="100,400", help="comma-separated batch sizes")
    parser.add_argument("--samples", type=int, default=2000, help="noisy samples per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-seconds", type=float, default=20.0)
    parser.add_argument("--calibration", type=int, default=512, help="noisy int8 calibration inputs")
    parser.add_argument("--agreement-images", type=int, default=100)
    parser.add_argument("--agreement-n", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the GPU table (torch fp32/bf16/fp16, "
                        "eager and compiled, ONNX Runtime's CUDA and TensorRT providers, native TensorRT)")
    args = parser.parse_args(argv)

    import torch

    from dualrs_route.experts.architectures import count_flops
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.router.bench import matmul_peak, round_robin
    from dualrs_route.router.run import versions as _versions

    def log(message):
        print(message, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    if gpu:
        from dualrs_route.experts.engine import resolve_device

        resolve_device(args.device)  # a clear error now rather than after the int8 calibration
        result_device = torch.cuda.get_device_name(torch.device(args.device))
    else:
        result_device = "cpu"
    batches = [int(b) for b in args.batch.split(",")]
    result = {"command": " ".join(["python", "benchmarks/bench_engines.py", *(argv or sys.argv[1:])]),
              "device": args.device, "threads": args.threads, "samples": args.samples, "repeats": args.repeats, "versions": _versions(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device_name": result_device}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        folder, trained, note = prepare_expert(args.expert, Path(tmp), args.dataset, args.data, args.calibration)
        log(note)
        f = load_folder(str(folder))
        sigma = f.config.sigma
        flops = count_flops(f.load_torch_model(), f.config.input_shape)
        result.update(expert=note, trained=trained, sigma=sigma, flops_per_sample=flops)
        test = load_split(args.dataset, "test", args.data)
        x = test.image(0) if test is not None else np.random.default_rng(0).random(f.config.input_shape, dtype=np.float32)
        if not args.no_timing:
            log(f"measuring the fp32 matmul peak for {args.peak_seconds:.0f} s ...")
            peak_before = matmul_peak(seconds=args.peak_seconds / 2, threads=args.threads, device=args.device)
            if gpu:
                result["peak_bf16"] = matmul_peak(seconds=args.peak_seconds / 2, device=args.device, precision="bf16")
            else:
                result["noise_samples_per_s"] = noise_rates(f.config.input_shape, 1000, args.repeats)
            tables, result["skipped"] = {}, {}
            for batch in batches:
                engines, skipped = build_engines(folder, batch, args.threads, args.device)
                for name, why in skipped.items():
                    log(f"  skipped {name}: {why}")
                    result["skipped"][name] = why
                tasks = {name: (lambda fn=fn: fn(x, sigma, args.samples)) for name, fn in engines.items()}
                log(f"batch {batch}: {len(tasks)} engines x {args.repeats} repeats of {args.samples} samples ...")
                times = round_robin(tasks, warmup=args.warmup, repeats=args.repeats)
                tables[batch] = {name: {"samples_per_s": args.samples / statistics.median(t), "timings_s": t}
                                 for name, t in times.items()}
            peak_after = matmul_peak(seconds=args.peak_seconds / 2, threads=args.threads, device=args.device)
            peak = max(peak_before["gflops"], peak_after["gflops"])
            bound = peak * 1e9 / flops
            result.update(peak_gflops=peak, peak_runs=[peak_before, peak_after], flop_bound_samples_per_s=bound)
            baseline_name = BASELINE
            base_best = max(tables[b][baseline_name]["samples_per_s"] for b in batches)
            for batch, rows in tables.items():
                for name, row in rows.items():
                    row["ratio_to_baseline_same_batch"] = row["samples_per_s"] / rows[baseline_name]["samples_per_s"]
                    row["ratio_to_best_baseline"] = row["samples_per_s"] / base_best
                    row["fraction_of_fp32_bound"] = row["samples_per_s"] / bound
            result["throughput"] = {str(b): rows for b, rows in tables.items()}
        if trained and args.agreement_images > 0 and test is not None:
            log(f"agreement: certifying {args.agreement_images} test images per engine at N={args.agreement_n} ...")
            result["agreement"] = agreement(folder, test, args.agreement_images, 100, args.agreement_n,
                                            max(batches), args.threads, log, args.device)
        elif args.agreement_images <= 0:
            result["agreement"] = "not measured (--agreement-images 0)"
        else:
            result["agreement"] = f"pending: needs a trained expert and the {args.dataset} test split"
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


def _peak_library(result: dict) -> str:
    """The library behind the peak that set the bound, and every library's rate."""
    runs = [r for r in result.get("peak_runs", []) if r.get("gflops") == result["peak_gflops"]]
    if not runs:
        return "?"
    rates = ", ".join(f"{name.split(',')[0]} {rate:.0f}" for name, rate in runs[0].get("libraries", {}).items())
    return f"{runs[0]['backend'].split(',')[0]}; {rates}" if rates else runs[0]["backend"]


def render(result: dict) -> str:
    """Markdown tables of a result dict."""
    if "throughput" in result:
        lines = [f"Expert: {result['expert']}. sigma={result['sigma']}, {result['flops_per_sample'] / 1e6:.1f} "
                 f"MFLOP/sample (counted), device {result.get('device_name', 'cpu')}, threads={result['threads']}, "
                 f"fp32 matmul peak {result['peak_gflops']:.0f} GFLOP/s "
                 f"({_peak_library(result)}) -> FLOP bound {result['flop_bound_samples_per_s']:,.0f} samples/s. Medians of "
                 f"{result['repeats']} runs of {result['samples']} samples.", ""]
    else:
        lines = [f"Expert: {result['expert']}. sigma={result['sigma']} (timing skipped)."]
    batches = list(result.get("throughput", {}))
    header = "| engine | " + " | ".join(f"B={b} samples/s | x baseline | % bound" for b in batches) + " |"
    if batches:
        lines += [header, "|---|" + "---|---|---|" * len(batches)]
    names = list(result["throughput"][batches[0]]) if batches else []
    for name in names:
        cells = []
        for b in batches:
            row = result["throughput"][b][name]
            cells.append(f"{row['samples_per_s']:,.0f} | {row['ratio_to_best_baseline']:.2f} | "
                         f"{100 * row['fraction_of_fp32_bound']:.0f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if batches:
        lines += ["", "x baseline = ratio to the best baseline batch size."]
        if "noise_samples_per_s" in result:
            lines[-1] += " Noise generation alone (samples/s): " + ", ".join(
                f"{k} {v:,.0f}" for k, v in result["noise_samples_per_s"].items())
        if "peak_bf16" in result:
            lines[-1] += f" bf16 matmul peak {result['peak_bf16']['gflops']:,.0f} GFLOP/s."
        for name, why in result.get("skipped", {}).items():
            lines.append(f"- not run: {name}: {why}")
    agreement = result["agreement"]
    if isinstance(agreement, dict):
        for name, why in agreement.get("skipped", {}).items():
            lines.append(f"- agreement not run: {name}: {why}")
        lines += ["", f"Agreement with torch fp32 on {agreement['images']} {agreement['dataset']} test images "
                      f"(N0={agreement['N0']}, N={agreement['N']}, alpha={agreement['alpha']}):", "",
                  "| engine | certified prediction agreement | mean abs radius diff | radius within 0.05 | "
                  "certified acc. r=0 | abstain |", "|---|---|---|---|---|---|"]
        for name, row in agreement.items():
            if isinstance(row, dict) and name != "skipped":
                lines.append(f"| {name} | {100 * row['prediction_agreement']:.1f}% | {row['mean_abs_radius_diff']:.4f} "
                             f"| {100 * row['radius_within_0.05']:.1f}% | {100 * row['certified_accuracy_r0']:.1f}% | "
                             f"{100 * row['abstain_rate']:.1f}% |")
    else:
        lines += ["", f"Agreement: {agreement}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
