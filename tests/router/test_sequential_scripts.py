"""The issue-15 benchmark scripts on the committed CIFAR-10 results, on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "cifar10" / "gaussian-zoo"


load = load_benchmark


def test_n0_study_is_monotone_in_n0_and_bounded_by_the_stored_run():
    study = load("n0_study")
    rows = {name: acc for name, _, acc in study.study(str(RESULTS / "router.tsv"))}
    stored = study.read_results(RESULTS / "router.tsv")
    exact = [float(np.mean((stored.correct == 1) & (stored.radius >= r))) for r in study.DEFAULT_RADII]
    for small, large in (("N0 = 10", "N0 = 25"), ("N0 = 25", "N0 = 50"), ("N0 = 50", "N0 = 100")):
        assert all(a <= b + 1e-12 for a, b in zip(rows[small], rows[large]))
    assert all(a <= e + 1e-12 for a, e in zip(rows["N0 = 100"], exact))
    # exact arithmetic of the adaptive rule against a direct enumeration at one p
    q, samples = study.adaptive(np.array([0.6]))
    from scipy.stats import binom

    direct = sum(binom.pmf(k, 10, 0.6) * (1.0 if k >= 9 else binom.sf(50 - k, 90, 0.6) if 2 <= k <= 8 else 0.0)
                 for k in range(11))
    assert abs(q[0] - direct) < 1e-12 and 10 < samples[0] < 100


def test_savings_simulation_on_stored_counts(tmp_path, capsys):
    savings = load("sequential_savings")
    out = tmp_path / "sim.json"
    savings.main(["simulate", str(RESULTS / "expert-0.5.tsv"), "--cap", "1000", "--target-radius", "0.5",
                  "--json", str(out)])
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    assert rows["fixed"]["samples_per_image"] == 1000
    assert all(r["samples_per_image"] <= 1000 for r in rows.values())
    assert rows["target 0.5"]["samples_per_image"] < rows["sequential"]["samples_per_image"]
    # fewer samples, and certified accuracy at the target close to fixed N's
    assert abs(rows["target 0.5"]["certified_accuracy"][2] - rows["fixed"]["certified_accuracy"][2]) < 0.03
    assert "| expert-0.5.tsv | target 0.5 |" in capsys.readouterr().out
