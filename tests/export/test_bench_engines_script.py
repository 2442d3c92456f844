"""The issue-5 benchmark script end to end, on a tiny budget (slow: a ResNet-20 export and quantization)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_engines.py"


@pytest.mark.slow
def test_bench_engines_runs_and_reports_every_engine(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_engines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
