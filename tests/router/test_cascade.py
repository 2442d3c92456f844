"""Multiscale cascade (router/cascade.py): exact-oracle soundness, decision rules, streams, CLI.

Oracle. Experts are 2-class linear models on 1x1x4 inputs (tests/rs_oracle.py). At stage k, with
p_k(x, c) the smoothed probability of class c, sigma_k Phi^-1(p_k(x, c)) is exactly the signed
distance from x to the hyperplane m_k = 0, positive on c's side. So the radius that the cascade's
proof can give for class c decided at stage k has a closed form:

    R*(x; k, c) = min( sigma_k (Phi^-1(p_k(x, c)) - Phi^-1(p0)),
                       min_{j < k} sigma_j (Phi^-1(p0) - Phi^-1(p_j(x, 1 - c))) )

Each term is the exact distance to the hyperplane where that stage's condition flips. The set
{x': G(x') != c} lies inside the union of the flipped half-spaces: stage k drops c to p0 or
below, or an earlier stage lifts another class above p0. So R* is at most the distance from x
to that set.

A certificate (c, R) decided at stage k is a violation if c != G(x) or R > R*(x; k, c). The
module's guarantee says a violation has probability at most alpha.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import beta as beta_dist
from scipy.special import ndtr, ndtri
from scipy.stats import norm

from dualrs_route.cli import main
from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.errors import IncompatibleModelsError
from dualrs_route.experts.noise import Stage
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.experts.stats import ABSTAIN
from dualrs_route.router.cascade import (
    ABSTAIN_HERE,
    CERTIFIED,
    DECIDE,
    EXHAUSTED,
    NEXT,
    SKIPPED_BOUND,
    UNDECIDED,
    CascadeCertifier,
    StageLevels,
    cascade_from_counts,
    check_p0,
    stage_levels,
    upper_confidence_bound,
)
from dualrs_route.router.results import COHEN_COLUMNS, SINGLE_COLUMNS
from dualrs_route.router.run import CASCADE_COLUMNS
from rs_oracle import BinaryLinear, linear_model, write_linear_folder

SHAPE = (1, 1, 4)
# Given out of order on purpose: the cascade must run sigma 1.0, then 0.5, then 0.25.
SIGMAS = (0.25, 1.0, 0.5)
W = [np.array([[0, 0, 0, 0], [0.0, 0.6, -0.8, 0.0]], np.float32),
     np.array([[0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]], np.float32),
     np.array([[0, 0, 0, 0], [0.3, 0.0, 0.4, -0.5]], np.float32)]
B = [np.array([0, 0.1], np.float32), np.array([0, -0.65], np.float32), np.array([0, -0.1], np.float32)]
ORDER = [1, 2, 0]  # expert indices by decreasing sigma
N0, N, ALPHA = 100, 100, 0.05


def cp_lower(k, n, a):
    return 0.0 if k == 0 else (a ** (1 / n) if k == n else float(beta_dist.ppf(a, k, n - k + 1)))


def cp_upper(k, n, a):
    return 1.0 if k == n else float(beta_dist.ppf(1 - a, k + 1, n - k))


class Truth:
    """Exact cascade quantities of 2-class linear experts at threshold p0 (vectorised over points)."""

    def __init__(self, p0, weights=W, biases=B, sigmas=SIGMAS):
        self.p0 = p0
        self.oracles = [BinaryLinear(w, b) for w, b in zip(weights, biases)]
        order = sorted(range(len(sigmas)), key=lambda k: (-sigmas[k], k))
        self.sigmas = np.array([sigmas[k] for k in order])
        self.dw = np.stack([self.oracles[k].dw for k in order])
        self.db = np.array([self.oracles[k].db for k in order])
        self.norms = np.array([self.oracles[k].norm for k in order])

    def p1(self, xs) -> np.ndarray:
        """[M, 3]: the class-1 probability of each point at each stage, in cascade order."""
        flat = np.asarray(xs, dtype=np.float64).reshape(-1, 4)
        return ndtr((flat @ self.dw.T + self.db) / (self.sigmas * self.norms))

    def G(self, xs) -> np.ndarray:
        """[M]: the cascaded smoothed classifier's class (ABSTAIN where no stage exceeds p0)."""
        p = self.p1(xs)
        out = np.full(len(p), ABSTAIN)
        for j in reversed(range(p.shape[1])):  # the first firing stage wins: assign it last
            out = np.where(p[:, j] > self.p0, 1, np.where(1 - p[:, j] > self.p0, 0, out))
        return out

    def radius(self, p1, stage: int, c: int) -> float:
        """R*(x; stage, c) from one point's probabilities ``p1`` [3]."""
        prob = p1 if c == 1 else 1 - p1
        r = self.sigmas[stage] * (ndtri(prob[stage]) - ndtri(self.p0))
        for j in range(stage):
            r = min(r, self.sigmas[j] * (ndtri(self.p0) - ndtri(1 - prob[j])))
        return float(r)

    def violations(self, xs, certs) -> np.ndarray:
        """[points, repeats] bool: certified, with the wrong class or a radius above R*."""
        p, g = self.p1(xs), self.G(xs)
        return np.array([[(not c.abstained) and (c.prediction != g[j] or
                                                 c.radius > self.radius(p[j], c.stage, c.prediction))
                          for c in row] for j, row in enumerate(certs)])


def pick_points(truth: Truth, per_group: int, seed: int = 2026) -> np.ndarray:
    """Points in four groups, chosen by exact probabilities so that every branch and every cap is
    exercised: the top stage decides; it passes to stage 2; stages 1 and 2 pass to stage 3; and
    plain uniform points."""
    rng = np.random.default_rng(seed)
    pool = rng.uniform(0.0, 1.0, size=(20_000, *SHAPE)).astype(np.float32)
    p = truth.p1(pool)
    top = np.maximum(p, 1 - p)
    low = truth.p0 * 0.83  # top class well below p0: the stage usually moves on
    groups = [top[:, 0] > 0.8,
              (top[:, 0] < low) & (top[:, 1] > 0.8),
              (top[:, 0] < low) & (top[:, 1] < low) & (top[:, 2] > 0.8),
              np.ones(len(pool), bool)]
    chosen = []
    for g in groups:
        idx = np.flatnonzero(g)
        assert len(idx) >= per_group
        chosen.append(pool[rng.choice(idx, per_group, replace=False)])
    return np.concatenate(chosen)


def make_cascade(weights=W, biases=B, sigmas=SIGMAS):
    experts = [SmoothedClassifier(TorchCounter(linear_model(w, b), num_classes=2, input_shape=SHAPE), s)
               for w, b, s in zip(weights, biases, sigmas)]
    return CascadeCertifier(experts)


P0_MAIN, PER_GROUP, REPEATS = 0.7, 10, 50  # 40 points x 50 repeats = 2,000 cascade certifications


def certify_all(truth, xs, repeats, seed, cascade=None):
    cascade = cascade or make_cascade()
    return [[cascade.certify(x, n0=N0, n=N, alpha=ALPHA, p0=truth.p0, seed=seed, index=j * repeats + r)
             for r in range(repeats)] for j, x in enumerate(xs)]


@pytest.fixture(scope="module")
def oracle_run():
    import torch

    torch.set_num_threads(1)
    truth = Truth(P0_MAIN)
    xs = pick_points(truth, PER_GROUP)
    return truth, xs, certify_all(truth, xs, REPEATS, seed=11)


def violation_limit(count: int, alpha: float) -> float:
    """alpha + 3 standard deviations of a Binomial(count, alpha) rate."""
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / count)


def test_cascade_runs_in_decreasing_sigma_and_reaches_every_branch(oracle_run):
    truth, xs, certs = oracle_run
    assert make_cascade().sigmas == [1.0, 0.5, 0.25]
    flat = [c for row in certs for c in row]
    assert {CERTIFIED, UNDECIDED, EXHAUSTED, SKIPPED_BOUND} <= {c.reason for c in flat}
    assert {c.stage for c in flat if c.reason == CERTIFIED} == {0, 1, 2}
    # the skipped-stage cap is the binding term in a good share of certificates
    capped = [c for c in flat if c.reason == CERTIFIED and c.skipped_radius is not None
              and c.skipped_radius < c.decided_radius]
    assert len(capped) > 100
    for c in flat:
        assert c.samples == (c.stage + 1) * (N0 + N)
        assert [s.sigma for s in c.stages] == [1.0, 0.5, 0.25][:c.stage + 1]
        assert c.expert == ORDER[c.stage]


def test_violation_rate_is_at_most_alpha(oracle_run):
    truth, xs, certs = oracle_run
    fails = truth.violations(xs, certs)
    rate, limit = fails.mean(), violation_limit(fails.size, ALPHA)
    print(f"cascade p0={P0_MAIN}: {int(fails.sum())} violations in {fails.size} certifications "
          f"(rate {rate:.4f}, limit {limit:.4f})")
    assert rate <= limit, (int(fails.sum()), fails.size, limit)


def test_oracle_check_has_teeth(oracle_run):
    # Teeth: claiming the deciding stage's point-estimate radius is caught by the same check far
    # more often than the real certificate.
    truth, xs, certs = oracle_run
    p, g = truth.p1(xs), truth.G(xs)
    real, point = int(truth.violations(xs, certs).sum()), 0
    for j, row in enumerate(certs):
        for c in row:
            if not c.abstained:
                s = c.stages[c.stage]
                p_hat = min(s.count / s.n, 1 - 1e-9)
                point += c.prediction != g[j] or (s.sigma * (ndtri(p_hat) - ndtri(truth.p0)) >
                                                  truth.radius(p[j], c.stage, c.prediction))
    assert point > 10 * max(real, 1) and point / (len(xs) * REPEATS) > 3 * ALPHA, (point, real)


def test_dropping_the_skipped_stage_cap_is_caught():
    # The first stage (sigma 0.5) sits on its boundary (p = 1/2 < p0 = 0.7: it moves on). The second
    # (sigma 0.4) is sure of class 1 (p = Phi(2.5)). The true radius is the first stage's cap
    # 0.5 * Phi^-1(0.7) = 0.262, but the second stage alone would claim about 0.41. The cascade's
    # certificate must stay under 0.262 (but for its alpha); the second stage's radius alone must
    # be caught nearly every time.
    weights = [np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.float32), np.array([[0, 0, 0, 0], [0, 1, 0, 0]], np.float32)]
    biases = [np.array([0, -0.5], np.float32), np.zeros(2, np.float32)]
    sigmas = (0.5, 0.4)
    truth = Truth(0.7, weights, biases, sigmas)
    x = np.array([0.5, 1.0, 0.5, 0.5], np.float32).reshape(SHAPE)
    assert truth.radius(truth.p1(x)[0], 1, 1) == pytest.approx(0.5 * norm.ppf(0.7))
    certs = certify_all(truth, [x], 100, seed=6, cascade=make_cascade(weights, biases, sigmas))
    fails = truth.violations([x], certs)
    assert fails.mean() <= violation_limit(fails.size, ALPHA)
    decided = [c for c in certs[0] if c.reason == CERTIFIED]
    assert len(decided) > 80 and all(c.stage == 1 and c.radius == c.skipped_radius for c in decided)
    no_cap = sum(c.decided_radius > truth.radius(truth.p1(x)[0], 1, 1) for c in decided)
    assert no_cap > 0.9 * len(decided)


def test_perturbation_below_certified_radius_keeps_the_exact_cascade_class(oracle_run):
    # An independent check of the closed-form radius: move to 0.999 R along each hyperplane normal
    # (both signs) and random directions, and recompute G exactly there.
    truth, xs, certs = oracle_run
    rng = np.random.default_rng(3)
    directions = np.stack([o.unit for o in truth.oracles])
    directions = np.concatenate([directions, -directions, rng.normal(size=(6, 4))])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    flagged = truth.violations(xs, certs)
    moved, expected = [], []
    for j, (x, row) in enumerate(zip(xs, certs)):
        for r, c in enumerate(row):
            if c.abstained or c.radius == 0 or flagged[j, r]:
                continue
            moved.append(x.reshape(-1).astype(np.float64) + 0.999 * c.radius * directions)
            expected.append(np.full(len(directions), c.prediction))
    assert len(moved) * len(directions) > 3000
    assert np.array_equal(truth.G(np.concatenate(moved)), np.concatenate(expected))


def test_violation_rate_at_p0_one_half():
    # At p0 = 1/2 with two classes, a stage moves on only when its guess is the minority class.
    truth = Truth(0.5)
    xs = np.random.default_rng(7).uniform(0, 1, size=(24, *SHAPE)).astype(np.float32)
    certs = certify_all(truth, xs, 40, seed=2)
    fails = truth.violations(xs, certs)
    assert sum(not c.abstained for row in certs for c in row) > 200
    assert fails.mean() <= violation_limit(fails.size, ALPHA), (int(fails.sum()), fails.size)


@pytest.mark.slow
def test_violation_rate_is_at_most_alpha_many_points():
    truth = Truth(P0_MAIN)
    xs = pick_points(truth, 50, seed=99)  # 200 points x 100 repeats
    fails = truth.violations(xs, certify_all(truth, xs, 100, seed=4))
    print(f"{int(fails.sum())} violations in {fails.size}")
    assert fails.mean() <= violation_limit(fails.size, ALPHA), (int(fails.sum()), fails.size)


# --- decision rules on hand-computed counts (K = 3, alpha = 0.03: shares 0.01, levels 0.005 / 0.0025) ---

K3 = dict(sigmas=[1.0, 0.5, 0.25], n0=10, alpha=0.03)


def test_stage_levels_split_alpha_evenly_and_give_the_last_stage_its_whole_share():
    assert stage_levels(0.03, 3) == (StageLevels(0.005, 0.0025), StageLevels(0.005, 0.0025), StageLevels(0.01, 0.01))
    assert stage_levels(0.001, 1) == (StageLevels(0.001, 0.001),)
    # every statement the proof uses: lower + two uppers per skippable stage, the lower of the last
    for k in (1, 2, 3, 5):
        levels = stage_levels(0.01, k)
        used = sum(lv.lower + 2 * lv.upper for lv in levels[:-1]) + levels[-1].lower
        assert used == pytest.approx(0.01, rel=1e-12)


def test_upper_confidence_bound_is_the_clopper_pearson_upper_bound():
    for k, n, a in [(0, 100, 0.01), (30, 100, 0.0025), (99, 100, 0.05), (100, 100, 0.01), (7, 13, 0.2)]:
        assert upper_confidence_bound(k, n, a) == pytest.approx(cp_upper(k, n, a), abs=1e-12)
    assert upper_confidence_bound(0, 100, 0.01) == pytest.approx(1 - 0.01 ** (1 / 100))
    with pytest.raises(ValueError):
        upper_confidence_bound(5, 4, 0.01)


def test_decide_at_the_first_stage_draws_nothing_more():
    cert = cascade_from_counts([(1, [8, 92])], **K3)
    assert (cert.prediction, cert.reason, cert.stage) == (1, CERTIFIED, 0)
    assert cert.stages[0].p_lower == pytest.approx(0.8238856452, abs=1e-9)  # beta.ppf(0.005, 92, 9)
    assert cert.radius == pytest.approx(0.9302750170, abs=1e-9)  # 1.0 * Phi^-1(0.82389) - Phi^-1(0.5)
    assert cert.skipped_radius is None and cert.samples == 110 and len(cert.stages) == 1


def test_abstain_when_the_bounds_straddle_p0():
    cert = cascade_from_counts([(1, [45, 55])], **K3)  # L = 0.417 < 0.5 <= U = 0.688
    assert (cert.prediction, cert.radius, cert.reason, cert.stage) == (ABSTAIN, 0.0, UNDECIDED, 0)
    assert cert.stages[0].outcome == ABSTAIN_HERE
    assert cert.stages[0].p_lower == pytest.approx(0.4170382173, abs=1e-9)
    assert cert.stages[0].p_upper == pytest.approx(0.6884988684, abs=1e-9)


def test_move_on_then_decide_and_min_with_the_skipped_stage_cap():
    # stage 0: the guess (class 1) got 30/100, U = 0.44226 < 0.5 -> next; stage 1 decides class 0 (97/100).
    cert = cascade_from_counts([(1, [70, 30]), (0, [97, 3])], **K3)
    assert (cert.prediction, cert.reason, cert.stage) == (0, CERTIFIED, 1)
    first, second = cert.stages
    assert (first.outcome, second.outcome) == (NEXT, DECIDE)
    # cap of stage 0 for class 0: its other class (1) has count 30 -> V = U(30/100 at 0.0025)
    assert first.other_upper == pytest.approx(0.4422564108, abs=1e-9)
    assert first.radius == pytest.approx(1.0 * (0 - norm.ppf(0.4422564108)), abs=1e-8)  # 0.14525
    assert second.radius == pytest.approx(0.5 * norm.ppf(0.8945187463), abs=1e-8)  # 0.62546
    assert cert.radius == pytest.approx(0.1452508468, abs=1e-8)
    assert cert.skipped_radius == first.radius and cert.decided_radius == second.radius
    assert cert.samples == 2 * 110
    low, up = cp_lower(30, 100, 0.005), cp_upper(30, 100, 0.0025)
    assert cert.stages_text() == (f"1:next:1:30/100:{low:.6f}:{up:.6f}:{up:.6f};"
                                  f"0.5:decide:0:97/100:{second.p_lower:.6f}:{second.p_upper:.6f}")


def test_the_cap_uses_the_largest_class_other_than_the_decided_one():
    stage0 = (0, [20, 35, 45])  # guess 0 got 20/100: U = 0.332 < 0.5 -> next
    # deciding class 1 leaves class 2 (45/100, V = 0.594 > 0.5) able to fire at stage 0: abstain
    blocked = cascade_from_counts([stage0, (1, [0, 100, 0])], **K3)
    assert (blocked.prediction, blocked.reason, blocked.radius) == (ABSTAIN, SKIPPED_BOUND, 0.0)
    assert blocked.stages[0].other_upper == pytest.approx(cp_upper(45, 100, 0.0025), abs=1e-12)
    assert blocked.skipped_radius < 0
    # deciding class 2 leaves classes 0 and 1: V = U(35/100) = 0.4944, a small positive cap
    ok = cascade_from_counts([stage0, (2, [0, 0, 100])], **K3)
    v = cp_upper(35, 100, 0.0025)
    assert v == pytest.approx(0.4944012814, abs=1e-9)
    assert (ok.prediction, ok.reason) == (2, CERTIFIED)
    assert ok.radius == pytest.approx(1.0 * (norm.ppf(0.5) - norm.ppf(v)), abs=1e-9)


def test_every_stage_moves_on_then_abstain():
    draws = [(1, [70, 30]), (0, [35, 65]), (1, [75, 25])]
    cert = cascade_from_counts(draws, **K3)
    assert (cert.prediction, cert.reason, cert.stage, cert.expert) == (ABSTAIN, EXHAUSTED, 2, 2)
    assert [s.outcome for s in cert.stages] == [NEXT, NEXT, NEXT]
    assert cert.samples == 3 * 110 and cert.skipped_radius is None and cert.decided_radius is None


def test_the_last_stage_spends_its_whole_share_on_the_lower_bound():
    # 63/100: L = 0.50927 at 0.01 (the last stage's level for K = 2, alpha = 0.02) but 0.49676 at 0.005
    two = dict(sigmas=[1.0, 0.5], n0=10, alpha=0.02)
    first = cascade_from_counts([(1, [37, 63])], **two)
    assert (first.reason, first.stages[0].p_lower) == (UNDECIDED, pytest.approx(cp_lower(63, 100, 0.005)))
    last = cascade_from_counts([(0, [35, 65]), (1, [37, 63])], **two)  # stage 0: U(35) = 0.494 -> next
    assert (last.prediction, last.reason, last.stage) == (1, CERTIFIED, 1)
    assert last.stages[1].p_lower == pytest.approx(0.5092699491, abs=1e-9)


def test_p0_above_one_half_shifts_both_radii_by_phi_inverse_of_p0():
    p0 = 0.7
    cert = cascade_from_counts([(1, [40, 60]), (1, [2, 98])], sigmas=[1.0, 0.5], n0=10, alpha=0.02, p0=p0)
    # stage 0: 60/100 with U(60, 0.0025) = 0.71... >= 0.7 -> abstain; make it move on with 55/100 instead
    assert cert.reason == UNDECIDED and cp_upper(60, 100, 0.0025) >= p0
    cert = cascade_from_counts([(1, [45, 55]), (1, [2, 98])], sigmas=[1.0, 0.5], n0=10, alpha=0.02, p0=p0)
    assert (cert.prediction, cert.reason) == (1, CERTIFIED)
    lower = cp_lower(98, 100, 0.01)
    v = cp_upper(45, 100, 0.0025)
    assert cert.stages[1].radius == pytest.approx(0.5 * (norm.ppf(lower) - norm.ppf(p0)), abs=1e-9)
    assert cert.stages[0].radius == pytest.approx(1.0 * (norm.ppf(p0) - norm.ppf(v)), abs=1e-9)
    assert cert.radius == pytest.approx(min(cert.stages[0].radius, cert.stages[1].radius), abs=1e-12)


def test_bad_p0_sets_and_counts_are_refused():
    assert check_p0(0.5) == 0.5
    for bad in (0.49, 1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="cascade-p0"):
            check_p0(bad)
    with pytest.raises(ValueError, match="only 1 stages"):
        cascade_from_counts([(1, [70, 30])], **K3)
    with pytest.raises(IncompatibleModelsError):
        CascadeCertifier([])
    two = SmoothedClassifier(TorchCounter(linear_model(W[0], B[0]), num_classes=2, input_shape=SHAPE), 0.5)
    three = SmoothedClassifier(TorchCounter(linear_model(np.zeros((3, 4)), np.zeros(3)), num_classes=3,
                                            input_shape=SHAPE), 0.25)
    with pytest.raises(IncompatibleModelsError, match="num_classes"):
        CascadeCertifier([two, three])


# --- noise streams and the single-expert case ---


def test_one_expert_cascade_is_cohen_certify_bit_for_bit():
    rng = np.random.default_rng(1)
    shape = (1, 4, 4)
    w, b = rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    expert = SmoothedClassifier(TorchCounter(linear_model(w, b, shape), num_classes=4, input_shape=shape), 0.5)
    cascade = CascadeCertifier([expert])
    decided = 0
    for index in range(20):
        x = rng.uniform(size=shape).astype(np.float32)
        alone = expert.certify(x, n0=50, n=300, alpha=0.001, seed=8, index=index)
        cert = cascade.certify(x, n0=50, n=300, alpha=0.001, seed=8, index=index)
        assert (cert.prediction, cert.radius) == (alone.prediction, alone.radius)
        assert (cert.stages[0].p_lower, cert.stages[0].count) == (alone.p_lower, alone.count)
        decided += not alone.abstained
    assert decided > 5


def test_stages_draw_each_experts_own_streams_and_stop_early():
    calls = []

    class Recording:
        def __init__(self, inner):
            self.inner, self.num_classes, self.input_shape = inner, inner.num_classes, inner.input_shape

        def counts(self, x, sigma, n, *, key):
            calls.append((key.stage, n, sigma, key.seed, key.index))
            return self.inner.counts(x, sigma, n, key=key)

    x = np.array([0.25, 0.5, 0.5, 0.5], np.float32).reshape(SHAPE)
    # sigma 1.0: margin 0.25 -> p1 = Phi(0.25) = 0.60, far below p0 = 0.9: moves on
    wide = TorchCounter(linear_model([[0, 0, 0, 0], [1, 0, 0, 0]], [0.0, 0.0]), num_classes=2, input_shape=SHAPE)
    # sigma 0.5: always class 1; sigma 0.25 is never reached
    sure = TorchCounter(linear_model(np.zeros((2, 4)), [0.0, 9.0]), num_classes=2, input_shape=SHAPE)
    never = TorchCounter(linear_model(np.zeros((2, 4)), [9.0, 0.0]), num_classes=2, input_shape=SHAPE)
    experts = [SmoothedClassifier(Recording(c), s) for c, s in ((never, 0.25), (wide, 1.0), (sure, 0.5))]
    cert = CascadeCertifier(experts).certify(x, n0=20, n=200, alpha=0.01, p0=0.9, seed=4, index=6)
    assert (cert.prediction, cert.reason, cert.stage, cert.expert) == (1, CERTIFIED, 1, 2)
    assert calls == [(Stage.EXPERT_SELECT, 20, 1.0, 4, 6), (Stage.EXPERT_ESTIMATE, 200, 1.0, 4, 6),
                     (Stage.EXPERT_SELECT, 20, 0.5, 4, 6), (Stage.EXPERT_ESTIMATE, 200, 0.5, 4, 6)]
    # the same draws as each expert's own CERTIFY: replayable from single-expert counts
    for stage, k in zip(cert.stages, (1, 2)):
        alone = experts[k].certify(x, n0=20, n=200, alpha=0.01, seed=4, index=6)
        assert stage.count == alone.count and stage.n == alone.n
        assert alone.abstained or stage.guess == alone.prediction
    replay = cascade_from_counts([(s.guess, s.counts) for s in cert.stages], sigmas=[1.0, 0.5, 0.25], n0=20,
                                 alpha=0.01, p0=0.9, experts=[1, 2, 0])
    assert replay == cert


# --- CLI ---


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows_of(path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


DIGITS = ["--expert", "builtin:digits-sigma0.25", "--expert", "builtin:digits-sigma0.5",
          "--expert", "builtin:digits-sigma1.0"]


def test_cli_select_cascade_on_the_digits_demo(tmp_path):
    out = tmp_path / "cascade.tsv"
    common = ["--N0", 20, "--N", 200, "--alpha", 0.01, "--max", 12, "--seed", 1, "--quiet"]
    result = invoke("certify", *DIGITS, "--select", "cascade", *common, "--out", out)
    assert result.exit_code == 0, result.output
    header = out.read_text().splitlines()[0].split("\t")
    assert tuple(header[:6]) == COHEN_COLUMNS and tuple(header) == CASCADE_COLUMNS
    rows = rows_of(out)
    assert [int(r["idx"]) for r in rows] == list(range(12))
    sigma_of_stage = {0: 1.0, 1: 0.5, 2: 0.25}
    certified = 0
    for r in rows:
        predict, radius, stage = int(r["predict"]), float(r["radius"]), int(r["stage"])
        assert int(r["correct"]) == int(predict == int(r["label"]))
        assert float(r["sigma"]) == sigma_of_stage[stage]
        assert int(r["samples"]) == (stage + 1) * 220 and len(r["stages"].split(";")) == stage + 1
        assert r["radius_router"] == r["p_router_lower"] == r["n_router"] == "-"
        if predict == -1:
            assert radius == 0.0
            continue
        certified += 1
        caps = [float(r["radius_expert"])] + ([float(r["radius_skipped"])] if r["radius_skipped"] != "-" else [])
        assert radius == pytest.approx(min(caps), abs=2e-6)
    assert certified >= 3
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["settings"]["mode"] == "cascade" and meta["settings"]["cascade_p0"] == 0.5
    assert meta["certificate"] is True and "probability >= 0.99" in meta["guarantee"]
    assert "cascade" in meta["guarantee"].lower() and len(meta["models"]) == 3
    # stage 0 draws the same streams as the sigma = 1.0 expert alone: same counts, row by row
    alone = tmp_path / "alone.tsv"
    assert invoke("certify", "--expert", "builtin:digits-sigma1.0", *common, "--out", alone).exit_code == 0
    for r, a in zip(rows, rows_of(alone)):
        assert r["stages"].split(";")[0].split(":")[3] == f"{a['n_expert']}/200"


def test_cli_cascade_refusals_and_resume_check(tmp_path, cli_expert):
    folder, data, weight, bias = cli_expert
    other = write_linear_folder(tmp_path / "wide", weight=weight, bias=bias, sigma=0.5, input_shape=(1, 4, 4))
    out = tmp_path / "c.tsv"
    base = ["certify", "--dataset", f"npz:{data}", "--N0", 10, "--N", 100, "--quiet", "--out", out]
    cases = [(["--expert", folder, "--expert", other, "--cascade-p0", 0.6], "only with --select cascade"),
             (["--expert", folder, "--expert", other, "--select", "cascade", "--cascade-p0", 0.4], "[0.5, 1)"),
             (["--expert", folder, "--select", "cascade"], "at least two"),
             (["--router", "builtin:digits-router", "--select", "cascade"], "--expert")]
    for extra, mentions in cases:
        result = invoke(*base, *extra)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert mentions in result.output, result.output
        assert not out.exists()
    ok = invoke(*base, "--expert", folder, "--expert", other, "--select", "cascade", "--cascade-p0", 0.6)
    assert ok.exit_code == 0, ok.output
    again = invoke(*base, "--expert", folder, "--expert", other, "--select", "cascade", "--cascade-p0", 0.7)
    assert again.exit_code != 0 and "cascade_p0" in again.output, again.output


# --- compose-cascade: the cascade replayed from single-expert results ---


def certify_alone(tmp_path, name, common):
    out = tmp_path / f"{name}.tsv"
    result = invoke("certify", "--expert", f"builtin:{name}", *common, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("p0, alpha", [(0.5, 0.01), (0.7, 0.001)])
def test_compose_cascade_gives_the_cascade_runs_rows(tmp_path, p0, alpha):
    # The single-expert files are certified at alpha 0.01; the cascade is composed at its own alpha
    # (0.001 in the second case): the counts do not depend on alpha, so any level replays exactly.
    common = ["--N0", 20, "--N", 200, "--max", 30, "--seed", 3, "--quiet"]
    names = ["digits-sigma0.25", "digits-sigma0.5", "digits-sigma1.0"]
    files = [certify_alone(tmp_path, name, [*common, "--alpha", 0.01]) for name in names]
    header = files[0].read_text().splitlines()[0].split("\t")
    assert tuple(header) == SINGLE_COLUMNS
    run = tmp_path / "run.tsv"
    result = invoke("certify", *DIGITS, "--select", "cascade", "--cascade-p0", p0, *common, "--alpha", alpha,
                    "--out", run)
    assert result.exit_code == 0, result.output
    composed = tmp_path / "composed.tsv"
    args = ["compose-cascade", *[a for f in files for a in ("--expert-results", f)], "--alpha", alpha,
            "--cascade-p0", p0, "--out", composed]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "30 images" in result.output
    ran, replayed = rows_of(run), rows_of(composed)
    assert len(ran) == 30 and [r["idx"] for r in ran] == [r["idx"] for r in replayed]
    assert {int(r["stage"]) for r in ran} >= {0, 1}, "the check needs rows that move past the first stage"
    assert any(r["predict"] != "-1" for r in ran) and any(r["predict"] == "-1" for r in ran)
    for a, b in zip(ran, replayed):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
    # time: the sum of the single-expert rows' times over the stages that ran (sigma 1.0 first)
    alone = {name: {r["idx"]: float(r["time"]) for r in rows_of(f)} for name, f in zip(names, files)}
    order = ["digits-sigma1.0", "digits-sigma0.5", "digits-sigma0.25"]
    for b in replayed:
        expected = sum(alone[order[k]][b["idx"]] for k in range(int(b["stage"]) + 1))
        assert float(b["time"]) == pytest.approx(expected, abs=1e-5)
    meta = json.loads(Path(str(composed) + ".json").read_text())
    assert meta["settings"]["mode"] == "cascade" and meta["settings"]["command"] == "compose-cascade"
    assert meta["settings"]["cascade_p0"] == p0 and meta["settings"]["alpha_expert"] == alpha
    assert f"probability >= {1 - alpha:g}" in meta["guarantee"] and meta["complete"] is True
    # and analyze reads it like a certify --select cascade file
    assert invoke("analyze", composed, run).exit_code == 0
    # an existing --out is kept without --force
    again = invoke(*args)
    assert again.exit_code != 0 and "--force" in again.output and "Traceback" not in again.output
    assert invoke(*args, "--force").exit_code == 0


def test_a_wrong_counts_replay_is_caught(tmp_path):
    """The equality above has teeth: replaying with another seed's counts for one expert changes rows."""
    common = ["--N0", 20, "--N", 200, "--max", 30, "--quiet", "--alpha", 0.01]
    names = ["digits-sigma0.25", "digits-sigma0.5", "digits-sigma1.0"]
    files = [certify_alone(tmp_path, name, [*common, "--seed", 3]) for name in names]
    (tmp_path / "s5").mkdir()
    files[2] = certify_alone(tmp_path / "s5", names[2], [*common, "--seed", 5])
    # a doctored copy: seed 5's rows under seed 3's settings, as a naive replay that ignored the
    # seed would read them
    doctored = tmp_path / "doctored.tsv"
    doctored.write_text(files[2].read_text())
    meta = json.loads(Path(str(files[2]) + ".json").read_text())
    meta["settings"]["seed"] = 3
    Path(str(doctored) + ".json").write_text(json.dumps(meta))
    run = tmp_path / "run.tsv"
    assert invoke("certify", *DIGITS, "--select", "cascade", *common, "--seed", 3, "--out", run).exit_code == 0
    out = tmp_path / "composed.tsv"
    assert invoke("compose-cascade", "--expert-results", files[0], "--expert-results", files[1],
                  "--expert-results", doctored, "--alpha", 0.01, "--out", out).exit_code == 0
    differ = [a["idx"] for a, b in zip(rows_of(run), rows_of(out)) if a["stages"] != b["stages"]]
    assert differ, "other noise must give other stage counts"


def test_compose_cascade_refusals(tmp_path):
    common = ["--N0", 20, "--N", 200, "--max", 8, "--quiet", "--alpha", 0.01]
    a = certify_alone(tmp_path, "digits-sigma0.25", [*common, "--seed", 1])
    b = certify_alone(tmp_path, "digits-sigma1.0", [*common, "--seed", 1])
    (tmp_path / "s2").mkdir()
    other_seed = certify_alone(tmp_path / "s2", "digits-sigma1.0", [*common, "--seed", 2])
    (tmp_path / "n").mkdir()
    other_n = certify_alone(tmp_path / "n", "digits-sigma1.0", ["--N0", 20, "--N", 100, "--max", 8, "--quiet",
                                                                "--seed", 1])
    (tmp_path / "m").mkdir()
    fewer = certify_alone(tmp_path / "m", "digits-sigma1.0", ["--N0", 20, "--N", 200, "--max", 6, "--quiet",
                                                              "--alpha", 0.01, "--seed", 1])
    old = tmp_path / "old.tsv"  # a file of an older release: no guess/counts columns
    lines = [line.split("\t")[:-2] for line in b.read_text().splitlines()]
    old.write_text("".join("\t".join(cells) + "\n" for cells in lines))
    Path(str(old) + ".json").write_text(Path(str(b) + ".json").read_text())
    partial = tmp_path / "partial.tsv"
    partial.write_text(b.read_text())
    meta = json.loads(Path(str(b) + ".json").read_text())
    Path(str(partial) + ".json").write_text(json.dumps(dict(meta, complete=False)))
    routed = tmp_path / "routed.tsv"
    assert invoke("certify", "--router", "builtin:digits-router", *common, "--seed", 1, "--out", routed).exit_code == 0
    bad_counts = tmp_path / "bad.tsv"
    text = b.read_text().splitlines()
    cells = text[1].split("\t")
    cells[-1] = "1,2,3"
    bad_counts.write_text("\n".join([text[0], "\t".join(cells)] + text[2:]) + "\n")
    Path(str(bad_counts) + ".json").write_text(Path(str(b) + ".json").read_text())
    garbage = tmp_path / "garbage.tsv"
    garbage.write_text(bad_counts.read_text().replace("\t1,2,3\n", "\t1,x,3\n"))
    Path(str(garbage) + ".json").write_text(Path(str(b) + ".json").read_text())
    out = tmp_path / "out.tsv"
    cases = [([a], "at least two"), ([a, garbage], "is not valid"), ([a, other_seed], "seed"), ([a, other_n], "N"), ([a, fewer], "different images"),
             ([a, old], "guess/counts"), ([a, partial], "not complete"), ([a, routed], "fixed-N"),
             ([a, bad_counts], "counts sum to")]
    for paths, mentions in cases:
        result = invoke("compose-cascade", *[x for p in paths for x in ("--expert-results", p)], "--out", out)
        assert result.exit_code != 0 and "Traceback" not in result.output, (paths, result.output)
        assert mentions in result.output, (mentions, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()
