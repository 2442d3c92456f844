"""benchmarks/margin_labels.py (router targets from the sigma 1.0 expert's mean softmax margin) and router_ranking.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dualrs_route.router.labels import FORMAT, LabelSet, load_labels, save_labels
from dualrs_route.router.training import soft_labels
from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_benchmark("margin_labels")


def test_mean_features_are_the_mean_p1_and_margin_over_every_copy():
    m = _script()
    select = np.array([[[0.5, 0.3, 0.2]]], dtype=np.float32)  # one image, one selection copy
    estimate = np.array([[[0.9, 0.05, 0.05], [0.4, 0.4, 0.2]]], dtype=np.float32)
    # p1: (0.5 + 0.9 + 0.4) / 3 = 0.6; margin: (0.2 + 0.85 + 0.0) / 3 = 0.35
    assert m.mean_features(select, estimate) == pytest.approx(np.array([[0.6, 0.35]]))


def test_pseudo_radii_give_the_target_probability_as_soft_labels():
    m = _script()
    y = np.array([0.01, 0.3, 0.5, 0.8, 0.999])
    for t in (0.1, 1.0):
        targets = soft_labels(m.pseudo_radii(y, t), t).numpy()
        assert targets[:, 2] == pytest.approx(y, abs=1e-5)
        assert targets[:, 1] == pytest.approx(1 - y, abs=1e-5)
        assert np.all(targets[:, 0] < 1e-12)


def test_weighted_logistic_matches_the_exact_weighted_rule():
    """Two groups of one feature value each: the weighted maximum-likelihood probability of each group is its
    weighted share of positives, in closed form; the fit must reach it (ridge 0)."""
    m = _script()
    x = np.array([[0.0], [0.0], [0.0], [1.0], [1.0]])
    y = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    w = np.array([3.0, 1.0, 1.0, 1.0, 4.0])  # group 0: 3 / 5 positive; group 1: 1 / 5
    coef = m.fit_weighted_logistic(x, y, w, l2=0.0)
    assert m.probability(coef, np.array([[0.0], [1.0]])) == pytest.approx([0.6, 0.2], abs=1e-4)
    # without the weights the shares are 1/3 and 1/2: the weights must matter
    plain = m.fit_weighted_logistic(x, y, np.ones(5), l2=0.0)
    assert m.probability(plain, np.array([[0.0], [1.0]])) == pytest.approx([1 / 3, 1 / 2], abs=1e-4)


def _labels(radii) -> LabelSet:
    n = len(radii)
    return LabelSet(indices=np.arange(n), labels=np.zeros(n, dtype=np.int64), radii=np.asarray(radii, np.float32),
                    predictions=np.zeros((n, 3), dtype=np.int64), p_lower=np.full((n, 3), 0.9),
                    experts=["a", "b", "c"], references=["ra", "rb", "rc"], sha256=["0" * 64] * 3,
                    sigmas=np.array([0.25, 0.5, 1.0]), meta={"format": FORMAT, "complete": True, "settings": {"N": 100}})


def test_the_script_writes_a_labels_file_whose_targets_follow_the_margin(tmp_path):
    """Confident images (high margin) have sigma 1.0 far ahead; unsure ones sigma 0.5: the written labels'
    soft targets must route by the margin, and everything but the radii must be kept."""
    rng = np.random.default_rng(0)
    n = 200
    confident = np.arange(n) % 2 == 0
    radii = np.where(confident[:, None], [0.0, 0.8, 2.0], [0.3, 0.6, 0.0])
    p1 = np.where(confident, 0.8, 0.35)[:, None] + rng.normal(0, 0.03, (n, 8))
    probs = np.stack([p1, (1 - p1) * 0.6, (1 - p1) * 0.4], axis=-1).astype(np.float32)
    labels_path, probe_path, out = tmp_path / "l.npz", tmp_path / "p.npz", tmp_path / "o.npz"
    save_labels(labels_path, _labels(radii))
    np.savez(probe_path, idx=np.arange(n), label=np.zeros(n, dtype=np.int64), select=probs[:, :1],
             estimate=probs[:, 1:], meta=np.array('{"format": "dualrs-route router scores v1", "sigma": 1.0}'))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "margin_labels.py"), "--labels", str(labels_path),
                           "--probe", str(probe_path), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = load_labels(out)
    targets = soft_labels(written.radii, 0.1).numpy()
    assert np.all(targets[confident, 2] > 0.9) and np.all(targets[~confident, 1] > 0.9)
    assert np.array_equal(written.indices, np.arange(n)) and written.experts == ["a", "b", "c"]
    assert "pseudo_radii" in written.meta
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "margin_labels.py"), "--labels", str(labels_path),
                            "--probe", str(probe_path), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr  # never overwrites


def _ranking():
    return load_benchmark("router_ranking")


def test_weighted_auc_against_hand_computed_values():
    auc = _ranking().weighted_auc
    # better images score 3 (w 1) and 1 (w 2); others 2 (w 1) and 1 (w 1); a weight-0 row must not count.
    # pairs: (3,2) win 1*1, (3,1) win 1*1, (1,2) loss 2*1, (1,1) tie 2*1*0.5 -> (1 + 1 + 0 + 1) / (3 * 2) = 0.5
    score = np.array([3.0, 1.0, 2.0, 1.0, 99.0])
    better = np.array([1, 1, 0, 0, 0])
    weight = np.array([1.0, 2.0, 1.0, 1.0, 0.0])
    assert auc(score, better, weight) == pytest.approx(0.5)
    assert auc(-score[:4] + 10, better[:4], weight[:4]) == pytest.approx(0.5)  # symmetric here
    assert auc(np.array([2.0, 2.0, 1.0]), np.array([1, 1, 0]), np.ones(3)) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([1, 0]), np.ones(2)) == 0.0
    with pytest.raises(ValueError):
        auc(np.array([1.0, 2.0]), np.array([1, 1]), np.ones(2))
