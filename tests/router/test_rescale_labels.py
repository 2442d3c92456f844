"""benchmarks/rescale_labels.py: label radii re-derived at a larger N from the same vote share, exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dualrs_route.experts.errors import DataError
from dualrs_route.experts.stats import certified_radius, lower_confidence_bound
from dualrs_route.router.labels import FORMAT, LabelSet, load_labels, save_labels
from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SIGMAS = np.array([0.25, 0.5, 1.0])
ALPHA = 0.001
# vote counts of the top class out of N = 100 (columns: experts); the last row's first expert is wrong
COUNTS = np.array([[100, 100, 100], [97, 90, 55], [40, 80, 99], [100, 60, 20]])
CORRECT = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]], dtype=bool)


def _script():
    return load_benchmark("rescale_labels")


def _radius(count: int, n: int, sigma: float) -> float:
    p = lower_confidence_bound(int(count), n, ALPHA)
    return certified_radius(sigma, p) if p >= 0.5 else 0.0


def _labels() -> LabelSet:
    p_lower = np.array([[lower_confidence_bound(int(c), 100, ALPHA) for c in row] for row in COUNTS])
    radii = np.array([[_radius(c, 100, s) for c, s in zip(row, SIGMAS)] for row in COUNTS]) * CORRECT
    predictions = np.where(p_lower >= 0.5, np.where(CORRECT, 0, 1), -1)
    meta = {"format": FORMAT, "complete": True, "done": 4, "total": 4,
            "settings": {"N": 100, "N0": 10, "alpha": ALPHA, "dataset": "digits", "split": "train"}}
    return LabelSet(indices=np.arange(4), labels=np.zeros(4, dtype=np.int64), radii=radii.astype(np.float32),
                    predictions=predictions.astype(np.int64), p_lower=p_lower, experts=["a", "b", "c"],
                    references=["a", "b", "c"], sha256=["0" * 64] * 3, sigmas=SIGMAS, meta=meta)


def test_counts_are_recovered_and_radii_follow_the_vote_share():
    module = _script()
    labels = _labels()
    np.testing.assert_array_equal(module.label_counts(labels.p_lower, 100, ALPHA), COUNTS)
    out = module.rescale(labels, 10_000)
    want = np.array([[_radius(100 * c, 10_000, s) if r > 0 else 0.0 for c, s, r in zip(row, SIGMAS, rrow)]
                     for row, rrow in zip(COUNTS, labels.radii)])
    np.testing.assert_allclose(out.radii, want, rtol=1e-6)
    # a perfect image reaches 3.2 sigma (the N = 10,000 cap) instead of 1.5 sigma
    np.testing.assert_allclose(out.radii[0] / SIGMAS, out.radii[0, 0] / 0.25, rtol=1e-6)
    assert out.radii[0, 0] / 0.25 > 3.1 and labels.radii[0, 0] / 0.25 < 1.6
    assert out.radii[3, 0] == 0 and out.radii[2, 0] == 0  # wrong, and abstained: still no signal
    # the best expert is the argmax of the exact rescaled radii
    np.testing.assert_array_equal(out.radii.argmax(1), want.argmax(1))
    np.testing.assert_allclose(module.rescale(labels, 100).radii, labels.radii, rtol=1e-6)


def test_refusals(tmp_path):
    module = _script()
    labels = _labels()
    with pytest.raises(DataError, match="multiple"):
        module.rescale(labels, 150)
    bad = labels.p_lower.copy()
    bad[1, 1] += 0.003
    with pytest.raises(DataError, match="no Clopper-Pearson bound"):
        module.label_counts(bad, 100, ALPHA)


def test_command_writes_a_labels_file_and_never_overwrites(tmp_path):
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    save_labels(src, _labels())
    run = [sys.executable, str(ROOT / "benchmarks" / "rescale_labels.py"), str(src), str(dst)]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = load_labels(dst)
    assert out.meta["rescaled"]["to_N"] == 10_000
    np.testing.assert_allclose(out.radii, _script().rescale(_labels(), 10_000).radii)
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_subset_labels_keeps_the_chosen_experts_columns(tmp_path):
    """``benchmarks/subset_labels.py`` (the level-2 router's labels): every image, the kept experts' columns in the
    order given, loadable again; a bad --keep is refused and nothing is written."""
    module = load_benchmark("subset_labels")
    labels = _labels()
    out = module.subset(labels, [2, 0])
    np.testing.assert_array_equal(out.radii, labels.radii[:, [2, 0]])
    np.testing.assert_array_equal(out.p_lower, labels.p_lower[:, [2, 0]])
    np.testing.assert_array_equal(out.predictions, labels.predictions[:, [2, 0]])
    assert out.experts == ["c", "a"] and list(out.sigmas) == [SIGMAS[2], SIGMAS[0]]
    np.testing.assert_array_equal(out.indices, labels.indices)
    save_labels(tmp_path / "in.npz", labels)
    script = ROOT / "benchmarks" / "subset_labels.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), "--keep",
                          "0", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    again = load_labels(tmp_path / "out.npz", require_complete=True)
    np.testing.assert_array_equal(again.radii, labels.radii[:, :2])
    for bad in ([], [0, 0], [3]):
        with pytest.raises(DataError, match="distinct expert indices"):
            module.subset(labels, bad)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "in.npz"), str(tmp_path / "bad.npz"), "--keep",
                          "5"], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip().startswith("error:") and not (tmp_path / "bad.npz").exists()
