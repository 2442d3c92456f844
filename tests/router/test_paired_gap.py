"""benchmarks/paired_gap.py: the paired ACR gap between two results files, against exact answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def _script():
    return load_benchmark("paired_gap")


def _write(path, idx, radius, correct):
    rows = [f"{i}\t0\t{0 if c else 1}\t{r:.6f}\t{int(c)}\t0.1" for i, r, c in zip(idx, radius, correct)]
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return str(path)


def test_gap_and_standard_error_are_exact():
    module = _script()
    a = np.array([0.0, 1.0, 2.0, 3.0])
    b = np.array([1.0, 1.0, 3.0, 3.0])  # d = (1, 0, 1, 0): mean 0.5, std (ddof 1) sqrt(1/3)
    g = module.paired_gap(a, b, bootstrap=2000, seed=1)
    assert g["gap"] == pytest.approx(0.5) and g["se"] == pytest.approx(np.sqrt(1 / 3) / 2)
    assert 0.0 <= g["ci95"][0] <= 0.5 <= g["ci95"][1] <= 1.0
    same = module.paired_gap(a, a + 0.25)  # a constant shift: no spread
    assert same["se"] == 0.0 and same["ci95"] == pytest.approx((0.25, 0.25))


def test_script_reads_files_counts_wrong_rows_as_zero_and_refuses_other_images(tmp_path):
    a = _write(tmp_path / "a.tsv", [2, 0, 1], [0.5, 1.0, 2.0], [1, 1, 0])   # per image (by idx): 1.0, 0, 0.5
    b = _write(tmp_path / "b.tsv", [0, 1, 2], [1.5, 0.3, 0.5], [1, 1, 1])   # 1.5, 0.3, 0.5
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_gap.py"), a, b], capture_output=True,
                         text=True, check=True).stdout
    assert "ACR 0.5000 on 3 images" in out and "ACR 0.7667, gap +0.2667" in out
    c = _write(tmp_path / "c.tsv", [0, 1, 3], [1.0, 1.0, 1.0], [1, 1, 1])
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_gap.py"), a, c], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "other images" in bad.stderr
