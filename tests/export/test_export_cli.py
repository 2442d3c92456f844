"""`dualrs-route export` and `dualrs-route bench` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dualrs_route.cli import main


@pytest.fixture
def run():
    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    return invoke


def test_export_onnx_and_int8(run, folder_copy, tmp_path):
    (folder_copy / "model.onnx").unlink()
    (folder_copy / "model.int8.onnx").unlink()
    result = run("export", folder_copy, "--to", "int8", "--calibration-samples", "64")
    assert result.exit_code == 0, result.output
    assert (folder_copy / "model.onnx").is_file() and (folder_copy / "model.int8.onnx").is_file()
    assert "validated against torch" in result.output and "calibrated at sigma=0.5" in result.output
    assert "synthetic images" in result.output  # the warning when no calibration dataset is given


def test_export_with_calibration_dataset(run, folder_copy, npz_dataset, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    data = npz_dataset(rng.random((20, 1, 8, 8), dtype=np.float32), rng.integers(0, 4, 20))
    out = tmp_path / "copy"
    result = run("export", folder_copy, "--to", "int8", "--out", out, "--calibration-dataset", f"npz:{data}",
                 "--calibration-samples", "32")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.int8.onnx", "model.onnx"]


def test_export_errors_are_one_line(run, tmp_path, folder_copy):
    result = run("export", tmp_path / "nowhere")
    assert result.exit_code == 1 and "no such folder" in result.output and "Traceback" not in result.output
    result = run("export", folder_copy, "--fp16")
    assert result.exit_code == 2 and "--fp16 applies to --to tensorrt" in result.output


def test_bench_json_and_table(run, exported_folder, tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", exported_folder, "--engine", "torch,onnxruntime,tensorrt", "--precision", "fp32,int8",
                 "--batch", "100", "--samples", "200", "--N", "200", "--N0", "20", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--peak-seconds", "0.2", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["peak"]["gflops"] > 0 and report["flops_per_sample"]["tiny-expert"] > 0
    rows = {(r["engine"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tensorrt", "fp32")}
    for key in [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]:
        row = rows[key]
        assert row["samples_per_s"] > 0 and len(row["timings_s"]) == 2 and row["certify_s"] > 0
        assert row["bound_fraction"] == pytest.approx(
            row["samples_per_s"] / report["flop_bound_samples_per_s"]["tiny-expert"])
    assert rows[("tensorrt", "fp32")]["skipped"]  # not installed here, reported rather than crashing
    assert "| tiny-expert | onnxruntime | int8 | 100 |" in result.output
    assert "[1] " in result.output and "dualrs-route[tensorrt]" in result.output  # why tensorrt was skipped


def test_bench_rejects_bad_values(run, exported_folder):
    result = run("bench", exported_folder, "--batch", "0")
    assert result.exit_code == 2 and "must be >= 1" in result.output
    result = run("bench", exported_folder, "--engine", "jax")
    assert result.exit_code == 2 and "'jax' is not one of" in result.output


def test_bench_router_reports_dual_overhead(run, tiny_router, tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", tiny_router, "--engine", "torch", "--batch", "100", "--samples", "100", "--N", "200",
                 "--N0", "20", "--repeats", "1", "--warmup", "0", "--peak-seconds", "0.1", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "router"
    assert {r["role"] for r in report["rows"]} == {"router", "expert"} and len(report["rows"]) == 3
    with_dual = [r for r in report["rows"] if r["dual_certify_s"] is not None]
    assert len(with_dual) == 1  # the routed expert's row
    row = with_dual[0]
    assert row["dual_overhead"] == pytest.approx(row["dual_certify_s"] / row["certify_s"] - 1)
    assert row["dual_certify_s"] > 0 and row["certify_s"] > 0


def test_export_router_copy_keeps_expert_references_working(run, tiny_router, tmp_path):
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.router.dual import load_router_set

    out = tmp_path / "elsewhere" / "router-onnx"
    result = run("export", tiny_router, "--out", out, "--copy-weights")
    assert result.exit_code == 0, result.output
    router, experts = load_router_set(str(out))
    assert router.has_onnx and [e.path.name for e in experts] == ["e-low", "e-high"]
    assert load_folder(str(tiny_router)).config.experts == ("../e-low", "../e-high")  # the source is untouched


def test_bench_torch_compile_rows(run, exported_folder, tmp_path, monkeypatch):
    """`--engine torch-compile` benchmarks the torch engine with compile=True (torch.compile faked: it is slow)."""
    from dualrs_route.experts import engine

    compiled = []

    def fake_compile(model, dtype, channels_last):
        compiled.append(str(dtype))
        return lambda batch: model(batch.to(dtype))

    monkeypatch.setattr(engine, "_compile_model", fake_compile)
    out = tmp_path / "bench.json"
    result = run("bench", exported_folder, "--engine", "torch,torch-compile", "--precision", "fp32,bf16,int8",
                 "--batch", "50", "--samples", "100", "--N", "100", "--N0", "20", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", "--peak-seconds", "0.2", "--json", out)
    assert result.exit_code == 0, result.output
    rows = {(r["engine"], r["precision"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(e, p) for e in ("torch", "torch-compile") for p in ("fp32", "bf16")}
    assert all(r["samples_per_s"] > 0 and not r["skipped"] for r in rows.values())
    assert sorted(compiled) == ["torch.bfloat16", "torch.float32"]  # only the torch-compile rows compile
    assert "| tiny-expert | torch-compile | bf16 | 50 |" in result.output


def test_matmul_peak_is_the_best_library_and_keeps_each_rate():
    from dualrs_route.router.bench import matmul_peak

    peak = matmul_peak(size=256, seconds=0.2, threads=1)
    assert sorted(name.split()[0] for name in peak["libraries"]) == ["numpy", "onnxruntime", "torch"]
    assert peak["gflops"] == max(peak["libraries"].values())
    assert peak["libraries"][peak["backend"]] == peak["gflops"]
    assert all("1 threads" in name for name in peak["libraries"])
    assert peak["gflops"] == pytest.approx(2 * 256 ** 3 / peak["median_s"] / 1e9)


def test_matmul_peak_numpy_child_is_limited_to_the_threads_asked(monkeypatch):
    import dualrs_route.router.bench as bench

    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env)

        class Done:
            returncode, stdout, stderr = 0, '{"median_s": 0.5, "products": 7}\n', ""
        return Done()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench._numpy_products(64, 0.1, 3) == (0.5, 7)
    assert seen["OPENBLAS_NUM_THREADS"] == "3" and seen["OMP_NUM_THREADS"] == "3"
    seen.clear()
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    bench._numpy_products(64, 0.1, None)
    assert "OPENBLAS_NUM_THREADS" not in seen


def test_matmul_peak_numpy_child_really_times():
    import dualrs_route.router.bench as bench

    median, products = bench._numpy_products(128, 0.05, 1)
    assert products >= 5 and 0 < median < 5


def test_matmul_peak_survives_a_failing_numpy_child(monkeypatch):
    import dualrs_route.router.bench as bench

    def broken(*args, **kwargs):
        raise RuntimeError("no BLAS here")

    monkeypatch.setattr(bench, "_numpy_products", broken)
    peak = bench.matmul_peak(size=128, seconds=0.1, threads=1)
    assert not any(name.startswith("numpy") for name in peak["libraries"]) and peak["libraries"]
    (numpy_error,) = [v for k, v in peak["errors"].items() if k.startswith("numpy")]
    assert "no BLAS here" in numpy_error


def test_matmul_peak_includes_onnxruntime_gemm_at_the_threads_asked(monkeypatch):
    import onnxruntime

    import dualrs_route.router.bench as bench

    seen = []
    real = onnxruntime.InferenceSession

    def spy(model, options, **kwargs):
        seen.append(options.intra_op_num_threads)
        return real(model, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    median, products = bench._ort_products(96, 0.05, 2)
    assert seen == [2] and products >= 5 and median > 0


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9755 128-Core Processor
flags\t\t: fpu sse2 fma avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni sha_ni
processor\t: 1
model name\t: AMD EPYC 9755 128-Core Processor
flags\t\t: fpu sse2 fma avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni sha_ni
"""


def test_cpu_description_reads_model_and_vector_flags():
    from dualrs_route.router.bench import cpu_description

    cpu = cpu_description(CPUINFO)
    assert cpu == {"model": "AMD EPYC 9755 128-Core Processor",
                   "vector_flags": ["fma", "avx", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]}
    assert cpu_description("") == {"model": None, "vector_flags": []}
    assert "amx_tile" in cpu_description("model name: X\nflags: avx2 amx_tile amx_bf16")["vector_flags"]


def test_format_share_notes_every_share_above_100_percent():
    from dualrs_route.router.bench import REDUCED_PRECISION, UNDER_MEASURED, format_share

    assert format_share(None, "fp32") == ("-", None)
    assert format_share(0.98, "fp32") == ("98", None)
    assert format_share(1.0, "fp32") == ("100", None)
    assert format_share(1.41, "fp32") == ("141", UNDER_MEASURED)
    assert format_share(2.5, "bf16") == ("250", REDUCED_PRECISION)
    assert "under-measured" in UNDER_MEASURED


def _bench_result(fractions):
    rows = [{"model": "m", "engine": "onnxruntime", "precision": p, "batch": 100, "skipped": None,
             "samples_per_s": 1000.0, "bound_fraction": f, "certify_s": 1.0, "dual_certify_s": None,
             "dual_overhead": None} for p, f in fractions]
    return {"reference": "m", "kind": "expert", "device": "cpu", "threads": 2, "repeats": 3, "N": 1000,
            "peak": {"gflops": 250.0, "backend": "numpy", "cpu": {"model": "AMD EPYC 9755",
                                                                   "vector_flags": ["avx2", "avx512f"]}},
            "rows": rows}


def test_bench_table_prints_cpu_and_never_a_share_above_100_without_the_note():
    from dualrs_route.router.bench import UNDER_MEASURED, format_table

    text = format_table(_bench_result([("fp32", 1.41), ("fp32", 1.2), ("fp32", 0.9)]))
    assert "CPU AMD EPYC 9755 [avx2 avx512f]" in text.splitlines()[0]
    assert "| 141 [1] |" in text and "| 120 [1] |" in text and "| 90 |" in text
    assert text.count(UNDER_MEASURED) == 1 and f"[1] {UNDER_MEASURED}" in text
    clean = format_table(_bench_result([("fp32", 0.5)]))
    assert "under-measured" not in clean and "| 50 |" in clean
