"""Latency and throughput of the noisy-counting engines: the library behind ``dualrs-route bench``.

Units: throughput in noisy samples per second (one sample = one forward pass of one
noisy image); latency in seconds. Every figure is the median over ``repeats`` timed
runs after ``warmup`` untimed ones. The engines are measured round-robin (repeat 1 of
every engine, then repeat 2, ...), so a change in background load hits all of them
alike and the ratios stay meaningful on a shared machine.

The FLOP-bound limit of a network is ``peak / flops``: ``peak`` is this machine's
measured fp32 matmul rate (a 2048 x 2048 matmul, median, the best of torch's, numpy's and
ONNX Runtime's own GEMM (MLAS, which its convolutions use), each at the benchmark's
threads; :func:`matmul_peak`) and ``flops`` the network's
counted floating-point operations per sample (:func:`experts.architectures.count_flops`,
2 per multiply-add). An engine's *fraction of the bound* is its throughput divided by
that limit. A measured matmul rate is only a lower bound on the machine's peak, so a
fraction above 100% means the bound is under-measured (or, for reduced precisions, that
they beat the fp32 bound); :func:`format_share` never prints one without that note.
The table's header names the CPU model and its vector flags (:func:`cpu_description`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from dualrs_route.router.run import versions

from dualrs_route.experts.errors import DualRSError
from dualrs_route.experts.noise import NoiseKey, Stage

VALID_PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "torch-compile": ("fp32", "bf16", "fp16"),
                    "onnxruntime": ("fp32", "int8", "fp16"), "tensorrt": ("fp32", "fp16")}


def median_seconds(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> tuple[float, list[float]]:
    """(median, all timings) in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def round_robin(tasks: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5) -> dict[str, list[float]]:
    """Time every task ``repeats`` times, interleaved (all tasks' repeat 1, then repeat 2, ...); seconds per run."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for fn in tasks.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


_NUMPY_PEAK = """
import json, sys
import numpy as np
from dualrs_route.router.bench import _time_products
size, seconds = int(sys.argv[1]), float(sys.argv[2])
rng = np.random.default_rng(0)
a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
out = np.empty((size, size), dtype=np.float32)
median, products = _time_products(lambda: np.matmul(a, b, out=out), seconds)
print(json.dumps({"median_s": median, "products": products}))
"""


def _time_products(product: Callable[[], object], seconds: float) -> tuple[float, int]:
    """(median seconds, count) of ``product()`` run for about ``seconds`` (at least 5 times, after one warm-up)."""
    product()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def _numpy_products(size: int, seconds: float, threads: int | None) -> tuple[float, int]:
    """numpy's (its BLAS's) fp32 matmul timing, (median seconds, count), in a child process: numpy cannot
    change its BLAS thread count once loaded, so the child's is set to ``threads`` (when given) before."""
    env = dict(os.environ)
    if threads:
        env.update({k: str(int(threads)) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                   "BLIS_NUM_THREADS")})
    done = subprocess.run([sys.executable, "-c", _NUMPY_PEAK, str(size), str(seconds)], env=env,
                          capture_output=True, text=True, timeout=120 + 10 * seconds)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "numpy peak failed")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return float(got["median_s"]), int(got["products"])


def _ort_products(size: int, seconds: float, threads: int | None) -> tuple[float, int]:
    """ONNX Runtime's fp32 GEMM timing, (median seconds, count): a graph of one MatMul (constant B),
    run on the CPU provider with ``threads`` intra-op threads (ORT's default when None)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [size, size])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _time_products(lambda: session.run(None, {"A": a}), seconds)


def matmul_peak(*, size: int | None = None, seconds: float = 3.0, threads: int | None = None,
                device: str = "cpu", precision: str = "fp32") -> dict:
    """This machine's matmul rate on ``device``: median GFLOP/s of ``size`` x ``size`` products (2 size^3 FLOP each).

    CPU, fp32: the best of the matmul libraries installed, torch's (MKL in the PyPI wheel),
    numpy's (OpenBLAS) and ONNX Runtime's (MLAS, the GEMM behind its convolutions), each
    limited to ``threads`` and timed for about ``seconds`` / 3; every rate is kept under
    ``libraries`` (a library that fails is recorded under ``errors``). One library alone can
    understate the machine: MKL on an AMD CPU ran 10% below OpenBLAS, and on AMD Zen 5 ORT's
    convolutions ran at 141% of the better of torch's and numpy's GEMM. CPU bf16/fp16: torch. CUDA: torch on the GPU with
    TF32 off for fp32 (true fp32, as the engines run it), each product timed between
    synchronisations. Default size 2048 on the CPU, 8192 on a GPU. At least 5 products each.
    """
    cuda = str(device).startswith("cuda")
    size = int(size or (8192 if cuda else 2048))
    both_blas = not cuda and precision == "fp32"  # the CPU fp32 peak: torch's, numpy's and ORT's GEMM
    share = seconds / 3 if both_blas else seconds
    timings: dict[str, tuple[float, int]] = {}
    errors: dict[str, str] = {}
    try:
        import torch
    except ImportError:
        if cuda or precision != "fp32":
            raise
        torch = None
    if torch is not None:
        if threads:
            torch.set_num_threads(int(threads))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if cuda:
            from dualrs_route.experts.engine import resolve_device

            dev = resolve_device(device)
            torch.backends.cuda.matmul.allow_tf32 = False
            a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
            out = torch.empty(size, size, device=dev, dtype=dtype)

            def product():
                torch.mm(a, b, out=out)
                torch.cuda.synchronize(dev)

            name = f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}, {precision}"
        else:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            out = torch.empty(size, size, dtype=dtype)

            def product():
                torch.mm(a, b, out=out)

            name = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}"
        timings[name] = _time_products(product, share)
    if both_blas:
        for name, measure in ((f"numpy {np.__version__}, {threads or 'default'} threads, fp32", _numpy_products),
                              (f"onnxruntime {_version('onnxruntime')}, {threads or 'default'} threads, fp32",
                               _ort_products)):
            try:
                timings[name] = measure(size, share, threads)
            except (ImportError, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as err:
                errors[name] = str(err)
        if not timings:
            raise DualRSError(f"no matmul library could be timed: {errors}")
    rates = {name: 2.0 * size ** 3 / median / 1e9 for name, (median, _) in timings.items()}
    best = max(rates, key=rates.get)
    median, products = timings[best]
    result = {"gflops": rates[best], "median_s": median, "products": products, "size": size, "backend": best,
              "libraries": rates, "device": str(device), "precision": precision}
    if errors:
        result["errors"] = errors
    return result


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "missing"


VECTOR_FLAGS = ("fma", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "sve2")
"""The /proc/cpuinfo flags that decide a CPU's GEMM peak (x86 FMA/AVX/AVX-512/AMX, Arm NEON/SVE)."""


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU model and its vector flags (those in :data:`VECTOR_FLAGS`, in that order) from
    /proc/cpuinfo text (read from the system when None; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model": model, "vector_flags": [f for f in VECTOR_FLAGS if f in flags]}


UNDER_MEASURED = ("above 100%: the measured matmul peak is under-measured (a library's GEMM ran slower than "
                  "this engine's kernels), so the share is against a bound that is too low")
REDUCED_PRECISION = ("above 100% at reduced precision: the share is against the fp32 bound, which reduced "
                     "precisions can exceed (or the bound is under-measured)")


def format_share(fraction: float | None, precision: str) -> tuple[str, str | None]:
    """(cell text, note or None) of a fraction of the fp32 FLOP bound: a percentage, and above 100%
    a note saying that the bound is under-measured (reduced precisions: or beaten by them)."""
    if fraction is None:
        return "-", None
    text = format(fraction * 100, ".0f")
    if fraction <= 1.0:
        return text, None
    return text, UNDER_MEASURED if precision == "fp32" else REDUCED_PRECISION


def naive_cohen_counts(model, x, sigma: float, n: int, batch_size: int, num_classes: int) -> np.ndarray:
    """The baseline: Cohen et al.'s ``Smooth._sample_noise`` loop, fp32 eager torch.

    ``x`` float32 torch [C, H, W]; repeats it ``batch_size`` times, adds
    ``randn_like * sigma``, runs the model under ``no_grad`` and counts argmaxes in
    a Python loop. Returns int64 [num_classes]. For timing only (noise is unkeyed).
    """
    import torch

    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = n
    with torch.no_grad():
        while remaining > 0:
            this = min(batch_size, remaining)
            remaining -= this
            batch = x.repeat((this, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            for p in predictions.cpu().numpy():
                counts[p] += 1
    return counts


@dataclass
class BenchRow:
    """One measured configuration. Throughput in samples/s; times in seconds; None where not measured."""

    model: str
    role: str
    engine: str
    precision: str
    batch: int
    samples_per_s: float | None = None
    bound_fraction: float | None = None
    certify_s: float | None = None
    dual_certify_s: float | None = None
    dual_overhead: float | None = None
    timings_s: list = field(default_factory=list)
    skipped: str | None = None


def _combinations(engines: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for engine in engines:
        if engine not in VALID_PRECISIONS:
            raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(VALID_PRECISIONS)}")
        for precision in precisions:
            if precision in VALID_PRECISIONS[engine]:
                out.append((engine, precision))
    if not out:
        raise ValueError(f"no valid engine/precision pair among engines {list(engines)} and precisions "
                         f"{list(precisions)}; valid: {VALID_PRECISIONS}")
    return out


def run_bench(reference: str, *, engines: Sequence[str] = ("torch", "onnxruntime"),
              precisions: Sequence[str] = ("fp32",), batch_sizes: Sequence[int] = (400,), samples: int = 2000,
              n0: int = 100, n: int = 10_000, alpha: float = 0.001, repeats: int = 3, warmup: int = 1,
              threads: int | None = None, device: str = "cpu", peak_seconds: float = 3.0, seed: int = 0,
              image: np.ndarray | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Benchmark an expert or router folder per engine, precision and batch size.

    For every model (a router and each of its experts, or one expert): noisy samples/s
    on ``samples`` samples of one image, and its fraction of the fp32 FLOP bound. For
    the expert(s): seconds per certified image (CERTIFY with ``n0`` + ``n`` samples).
    For a router: seconds per dual certification and its overhead over certifying with
    the routed expert alone (``dual / single - 1``). Configurations that cannot run
    here (missing model file, engine not installed) are reported as skipped with the reason.

    ``image``: float32 [C, H, W] in [0, 1]; default a seeded uniform random image.
    Returns a JSON-serialisable dict.
    """
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.export.engines import make_counter
    from dualrs_route.experts.smoothing import SmoothedClassifier

    say = log or (lambda message: None)
    folder = load_folder(reference)
    is_router = folder.config.kind == "router"
    if is_router:
        from dualrs_route.router.dual import DualCertifier, load_router_set, router_smoothed

        router_folder, expert_folders = load_router_set(reference)
        models = [("router", router_folder)] + [("expert", f) for f in expert_folders]
    else:
        models = [("expert", folder)]
    shape = folder.config.input_shape
    x = (np.random.default_rng(seed).random(shape, dtype=np.float32) if image is None
         else np.asarray(image, dtype=np.float32))
    if threads:
        try:
            import torch

            torch.set_num_threads(int(threads))
        except ImportError:
            pass
    say("measuring the fp32 matmul peak ...")
    peak = matmul_peak(seconds=peak_seconds, threads=threads, device=device)
    if not str(device).startswith("cuda"):
        peak["cpu"] = cpu_description()
    flops = {}
    for role, f in models:
        flops[f.name] = _count_flops(f)
    combos = _combinations(engines, precisions)
    rows: list[BenchRow] = []
    counters = {}
    for engine, precision in combos:
        for batch in batch_sizes:
            for role, f in models:
                row = BenchRow(model=f.name, role=role, engine=engine, precision=precision, batch=int(batch))
                options = {"threads": threads} if engine == "onnxruntime" and threads else {}
                runs_on = engine
                if engine == "torch-compile":  # the torch engine through torch.compile (`--compile`)
                    runs_on, options = "torch", {"compile": True}
                try:
                    counters[(f.name, engine, precision, batch)] = make_counter(
                        f, engine=runs_on, device=device, batch_size=int(batch), precision=precision, **options)
                except (DualRSError, ValueError) as exc:
                    row.skipped = " ".join(str(exc).split())
                rows.append(row)
    tasks = {}
    key = NoiseKey(seed, 0, Stage.EXPERT_ESTIMATE)
    for row in rows:
        if row.skipped is None:
            counter = counters[(row.model, row.engine, row.precision, row.batch)]
            sigma = next(f.config.sigma for _, f in models if f.name == row.model)
            tasks[id(row)] = (lambda c=counter, s=sigma: c.counts(x, s, samples, key=key))
    say(f"throughput: {len(tasks)} configurations x {repeats} repeats of {samples} samples ...")
    times = round_robin(tasks, warmup=warmup, repeats=repeats)
    for row in rows:
        if id(row) in times:
            row.timings_s = [round(t, 6) for t in times[id(row)]]
            row.samples_per_s = samples / statistics.median(times[id(row)])
            if flops.get(row.model):
                row.bound_fraction = row.samples_per_s / (peak["gflops"] * 1e9 / flops[row.model])
    say(f"certification at N0={n0}, N={n} ...")
    cert_tasks = {}
    for engine, precision in combos:
        for batch in batch_sizes:
            group = [r for r in rows if r.engine == engine and r.precision == precision and r.batch == batch]
            if any(r.skipped for r in group):
                continue
            expert_counters = [counters[(f.name, engine, precision, batch)] for role, f in models if role == "expert"]
            experts = [SmoothedClassifier(c, f.config.sigma)
                       for c, (_, f) in zip(expert_counters, [m for m in models if m[0] == "expert"])]
            if is_router:
                router = router_smoothed(counters[(models[0][1].name, engine, precision, batch)],
                                         models[0][1].config.sigma)
                dual = DualCertifier(router, experts)
                routed = dual.certify(x, n0=n0, n=n0, alpha=alpha / 2, router_n0=n0, router_n=n, beta=alpha / 2,
                                      seed=seed).expert
                chosen = routed if routed >= 0 else 0
                target = next(r for r in group if r.role == "expert" and r.model == models[1 + chosen][1].name)
                cert_tasks[(id(target), "single")] = (lambda e=experts[chosen]: e.certify(
                    x, n0=n0, n=n, alpha=alpha / 2, seed=seed))
                cert_tasks[(id(target), "dual")] = (lambda d=dual: d.certify(
                    x, n0=n0, n=n, alpha=alpha / 2, router_n0=n0, router_n=n, beta=alpha / 2, seed=seed))
            else:
                target = group[0]
                cert_tasks[(id(target), "single")] = (lambda e=experts[0]: e.certify(x, n0=n0, n=n, alpha=alpha,
                                                                                     seed=seed))
    cert_times = round_robin(cert_tasks, warmup=0, repeats=repeats) if cert_tasks else {}
    for row in rows:
        if (id(row), "single") in cert_times:
            row.certify_s = statistics.median(cert_times[(id(row), "single")])
        if (id(row), "dual") in cert_times:
            row.dual_certify_s = statistics.median(cert_times[(id(row), "dual")])
            row.dual_overhead = row.dual_certify_s / row.certify_s - 1.0
    return {
        "reference": reference, "kind": folder.config.kind, "device": device, "threads": threads,
        "samples": samples, "N0": n0, "N": n, "repeats": repeats, "warmup": warmup, "seed": seed,
        "peak": peak, "flops_per_sample": flops,
        "flop_bound_samples_per_s": {k: (peak["gflops"] * 1e9 / v if v else None) for k, v in flops.items()},
        "rows": [asdict(r) for r in rows], "versions": versions(),
    }


def _count_flops(folder) -> int | None:
    """Counted FLOPs per sample of the folder's torch network, or None without torch weights or torch."""
    if not folder.has_torch_weights:
        return None
    try:
        from dualrs_route.experts.architectures import count_flops
    except ImportError:
        return None
    return count_flops(folder.load_torch_model(), folder.config.input_shape)


def format_table(result: dict) -> str:
    """A Markdown table of :func:`run_bench`'s result."""
    peak = result["peak"]
    cpu = peak.get("cpu")
    machine = (f"; CPU {cpu['model'] or 'unknown'} [{' '.join(cpu['vector_flags']) or 'no vector flags found'}]"
               if cpu else "")
    lines = [f"{result['reference']} ({result['kind']}) on {result['device']}, threads={result['threads']}; "
             f"fp32 matmul peak {peak['gflops']:.1f} GFLOP/s ({peak['backend']}){machine}; "
             f"medians of {result['repeats']}",
             "",
             "| model | engine | precision | batch | samples/s | % of fp32 FLOP bound | s / certified image "
             f"(N={result['N']}) | dual s / image | dual overhead |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec, scale=1.0):
        return "-" if value is None else format(value * scale, spec)

    notes = []
    for r in result["rows"]:
        if r["skipped"]:
            notes.append(r["skipped"])
            lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} | {r['batch']} | skipped [{len(notes)}] "
                         "| | | | |")
            continue
        share, note = format_share(r["bound_fraction"], r["precision"])
        if note is not None:
            if note not in notes:
                notes.append(note)
            share += f" [{notes.index(note) + 1}]"
        lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} | {r['batch']} | "
                     f"{fmt(r['samples_per_s'], ',.0f')} | {share} | "
                     f"{fmt(r['certify_s'], '.3f')} | {fmt(r['dual_certify_s'], '.3f')} | "
                     f"{fmt(r['dual_overhead'], '+.0%')} |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)
