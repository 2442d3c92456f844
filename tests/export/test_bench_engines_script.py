"""The issue-5 benchmark script end to end, on a tiny budget (slow: a ResNet-20 export and quantization)."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_benchmark



@pytest.mark.slow
def test_bench_engines_runs_and_reports_every_engine(tmp_path, capsys):
    module = load_benchmark("bench_engines")
    out = tmp_path / "engines.json"
    code = module.main(["--expert", str(tmp_path / "missing"), "--data", str(tmp_path / "no-data"), "--threads", "1",
                        "--batch", "50", "--samples", "50", "--repeats", "1", "--warmup", "0", "--peak-seconds", "0.2",
                        "--calibration", "16", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["trained"] is False and "RANDOMLY INITIALISED" in report["expert"]
    rows = report["throughput"]["50"]
    assert set(rows) == {"baseline (Cohen loop, fp32 eager)", "torch fp32", "torch bf16", "torch fp32 compiled",
                         "torch bf16 compiled", "onnxruntime fp32",
                         "onnxruntime fp32, no I/O binding", "onnxruntime fp32, no prefetch",
                         "onnxruntime fp32, numpy noise", "onnxruntime int8"}
    assert rows["baseline (Cohen loop, fp32 eager)"]["ratio_to_best_baseline"] == pytest.approx(1.0)
    assert all(r["samples_per_s"] > 0 and r["fraction_of_fp32_bound"] > 0 for r in rows.values())
    assert report["flops_per_sample"] == 81_626_368  # ResNet-20 at 32x32: 81.6 MFLOP (PLATFORM_NOTES)
    assert report["agreement"].startswith("pending")
    assert "| onnxruntime int8 |" in capsys.readouterr().out


def _load_script():
    return load_benchmark("bench_engines")


def test_bench_engines_gpu_table_needs_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU table runs (see the gpu-marked test)")
    from dualrs_route.experts.errors import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match="no CUDA GPU"):
        _load_script().main(["--device", "cuda", "--expert", str(tmp_path / "missing"), "--data", str(tmp_path)])


@pytest.mark.gpu
def test_bench_engines_gpu_table(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "engines.json"
    code = _load_script().main(["--device", "cuda", "--expert", str(tmp_path / "missing"), "--data", str(tmp_path),
                                "--batch", "256", "--samples", "512", "--repeats", "1", "--warmup", "1",
                                "--peak-seconds", "0.5", "--calibration", "16", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["throughput"]["256"]
    assert {"baseline (Cohen loop, fp32 eager)", "torch fp32", "torch bf16", "torch fp16"} <= set(rows)
    assert all(r["samples_per_s"] > 0 for r in rows.values())
    # every GPU row either ran or says why not (ORT providers, TensorRT)
    assert set(rows) | set(report["skipped"]) >= {"onnxruntime-cuda fp32", "tensorrt fp32", "tensorrt fp16"}
    assert report["peak_bf16"]["gflops"] > report["peak_runs"][0]["gflops"] * 0.5
