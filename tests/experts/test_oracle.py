"""Soundness of single-expert CERTIFY against an exact oracle (issue 2, "Must show").

A 2-class linear model on 1x1x4 inputs, run through the real torch engine and
SmoothedClassifier. Its smoothed classifier and exact radius are closed-form (see
tests/rs_oracle.py), so every certificate can be judged: it *fails* when it does not
abstain and either names the wrong class or claims a radius above |m(x)| / |dw|.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.smoothing import SmoothedClassifier
from rs_oracle import BinaryLinear, certify_outcomes, linear_model

SIGMA = 0.5
N0, N, ALPHA = 100, 100, 0.05
POINTS, REPEATS = 40, 50  # 2,000 certifications: 40 inputs x 50 independent noise streams (example index)
WEIGHT = np.array([[0.1, 0.0, -0.2, 0.0], [0.7, -0.3, 0.3, 0.2]], dtype=np.float32)
BIAS = np.array([0.0, -0.5], dtype=np.float32)  # boundary through (0.5, 0.5, 0.5, 0.5)


def _points(oracle: BinaryLinear) -> np.ndarray:
    """Inputs in [0, 1]^4 at signed distances -0.7..0.7 from the boundary (p from ~0.003 to ~0.997)."""
    center = np.full(4, 0.5)
    center = center - oracle.margin(center) / oracle.norm * oracle.unit  # on the boundary
    distances = np.linspace(-0.7, 0.7, POINTS)
    xs = center[None] + distances[:, None] * oracle.unit[None]
    assert xs.min() >= 0.0 and xs.max() <= 1.0
    return xs.astype(np.float32).reshape(POINTS, 1, 1, 4)


@pytest.fixture(scope="module")
def run():
    """Certify every point REPEATS times; return (oracle, xs, certificates[point][repeat])."""
    import torch

    torch.set_num_threads(1)
    oracle = BinaryLinear(WEIGHT, BIAS)
    xs = _points(oracle)
    smoothed = SmoothedClassifier(TorchCounter(linear_model(WEIGHT, BIAS), num_classes=2, input_shape=(1, 1, 4)),
                                  SIGMA)
    certs = [[smoothed.certify(xs[j], n0=N0, n=N, alpha=ALPHA, seed=11, index=j * REPEATS + r)
              for r in range(REPEATS)] for j in range(POINTS)]
    return oracle, xs, certs


def failures(oracle, xs, certs, radius_of=lambda c: c.radius) -> np.ndarray:
    """[points, repeats] bool: the certificate is wrong (class or radius) and did not abstain."""
    out = np.zeros((len(xs), len(certs[0])), dtype=bool)
    for j, x in enumerate(xs):
        true_cls, true_r = int(oracle.smoothed_class(x)), float(oracle.radius(x))
        for r, c in enumerate(certs[j]):
            out[j, r] = (not c.abstained) and (c.prediction != true_cls or radius_of(c) > true_r)
    return out


def exact_failure_probs(oracle, xs) -> np.ndarray:
    probs = []
    for x in xs:
        cls, rad, prob = certify_outcomes(float(oracle.p1(x, SIGMA)), n0=N0, n=N, alpha=ALPHA, sigma=SIGMA)
        bad = (cls != int(oracle.smoothed_class(x))) | (rad > float(oracle.radius(x)))
        probs.append(float(prob[bad].sum()))
    return np.array(probs)


def test_engine_radius_matches_closed_form_radius(run):
    oracle, xs, _ = run
    # sanity of the oracle itself: sigma * Phi^-1(p) equals the distance to the boundary
    for x in xs[::7]:
        p = float(oracle.p1(x, SIGMA))
        assert SIGMA * norm.ppf(max(p, 1 - p)) == pytest.approx(float(oracle.radius(x)), rel=1e-9, abs=1e-12)


def test_false_certificates_at_most_alpha(run):
    oracle, xs, certs = run
    fails = failures(oracle, xs, certs)
    m, observed = fails.size, int(fails.sum())
    assert m >= 2000
    # Slack: one-sided binomial test at level 1e-3. If each certificate fails with probability
    # <= alpha independently, P[Bin(M, alpha) > limit] <= 1e-3. M = 2000, alpha = 0.05: limit = 131
    # (= 6.6% of M); the exact expected count for these points is ~ 50-70 (see the next test).
    limit = int(binom.ppf(1 - 1e-3, m, ALPHA))
    assert observed <= limit, f"{observed} of {m} certificates are false (limit {limit} at alpha={ALPHA})"


def test_false_certificate_count_matches_exact_expectation(run):
    oracle, xs, certs = run
    fails = failures(oracle, xs, certs)
    per_point = exact_failure_probs(oracle, xs)
    assert per_point.max() <= ALPHA + 1e-12  # the exact guarantee, point by point
    expected = REPEATS * per_point.sum()
    sd = math.sqrt(REPEATS * np.sum(per_point * (1 - per_point)))
    # Slack: 4 SD of the exact Poisson-binomial count (normal approx., two-sided ~6e-5).
    assert abs(fails.sum() - expected) <= 4 * sd + 1, (int(fails.sum()), expected, sd)


def test_check_can_fail_on_a_broken_bound(run):
    # The same judge applied to a deliberately broken certificate: radius from the point estimate
    # n_a / N instead of the Clopper-Pearson lower bound. About half of those overshoot, so the
    # alpha test above must reject it; this shows the test has teeth.
    oracle, xs, certs = run

    def point_estimate_radius(c):
        p_hat = min(c.count / c.n, 1 - 1e-9)
        return SIGMA * norm.ppf(p_hat) if p_hat > 0.5 else 0.0

    broken = failures(oracle, xs, certs, point_estimate_radius)
    limit = int(binom.ppf(1 - 1e-3, broken.size, ALPHA))
    assert broken.sum() > 3 * limit


def test_mean_radius_matches_exact_expectation(run):
    oracle, xs, certs = run
    means, variances = [], []
    for x in xs:
        _, rad, prob = certify_outcomes(float(oracle.p1(x, SIGMA)), n0=N0, n=N, alpha=ALPHA, sigma=SIGMA)
        mean = float(np.sum(prob * rad))
        means.append(mean)
        variances.append(float(np.sum(prob * rad ** 2)) - mean ** 2)
    observed = np.array([[c.radius for c in row] for row in certs])
    expected = float(np.mean(means))
    sd = math.sqrt(np.sum(variances) * REPEATS) / observed.size
    # Slack: 4 SD of the exact sampling distribution of the mean (two-sided ~6e-5).
    assert observed.mean() == pytest.approx(expected, abs=4 * sd), (observed.mean(), expected, sd)
    # and per point, coarser (10 SD of a 50-sample mean, catches a systematic per-point bias)
    for j in range(len(xs)):
        assert abs(observed[j].mean() - means[j]) <= 10 * math.sqrt(variances[j] / REPEATS) + 1e-9


def test_abstain_rate_matches_exact_expectation(run):
    oracle, xs, certs = run
    expected = []
    for x in xs:
        _, _, prob = certify_outcomes(float(oracle.p1(x, SIGMA)), n0=N0, n=N, alpha=ALPHA, sigma=SIGMA)
        expected.append(1.0 - prob.sum())
    expected = np.array(expected)
    observed = sum(c.abstained for row in certs for c in row)
    sd = math.sqrt(REPEATS * np.sum(expected * (1 - expected)))
    # Slack: 4 SD (two-sided ~6e-5).
    assert abs(observed - REPEATS * expected.sum()) <= 4 * sd + 1
