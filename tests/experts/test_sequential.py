"""Sequential CERTIFY (experts/sequential.py): exact-oracle soundness, the unsound naive variant, the
one-look identity with CERTIFY, the stop rules and the keyed stream.

Oracle. A 2-class linear expert (tests/rs_oracle.py) has closed-form smoothed probability
p1 = Phi(m(x) / (sigma |dw|)), smoothed class g(x) = [m(x) > 0] and exact radius |m(x)| / |dw|. The
trials bypass the network: the N0 selection counts and every round's estimation count are binomial
draws from the exact probabilities, fed to the same code (certify_sequential) that the engines feed.
A trial is a violation if it certifies the wrong class or a radius above the exact one (for the
target-radius decision: certifies radius >= R where the exact radius is below R). The guarantee says
a violation has probability <= alpha; the check allows alpha + 3 s.d. of the estimated rate, with
enough trials that a 2x violation (rate 2 alpha) would fail it. The naive variant (Clopper-Pearson at
the full alpha at every look, stopping at the first success) must fail the same check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.sequential import (
    STOP_CAP,
    DEFAULT_RADIUS_TOL,
    STOP_FUTILE,
    STOP_GRID,
    STOP_TARGET,
    STOP_TOLERANCE,
    STOP_UNREACHABLE,
    Schedule,
    StopPolicy,
    certify_sequential,
    look_schedule,
    stop_rule,
    union_bound_schedule,
)
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.experts.stats import ABSTAIN, certify_from_counts, lower_confidence_bound
from rs_oracle import BinaryLinear, linear_model

ALPHA = 0.1
N0, CAP, FIRST = 100, 1600, 100  # looks 100, 120, 144, ..., 1078, 1294, 1600 (16)
SIGMA = 0.5
TRIALS = 2000  # sd of a rate near alpha = 0.1: 0.0067; a 2x violation (0.2) is 15 sd above alpha
W = np.array([[0, 0, 0, 0], [0.6, -0.8, 0.0, 0.0]], np.float32)  # |dw| = 1
B = np.array([0, 0], np.float32)
LINEAR = BinaryLinear(W, B)


def sound(alpha=ALPHA, cap=CAP, first=FIRST) -> Schedule:
    return union_bound_schedule(cap, alpha, first)


def naive(alpha=ALPHA, cap=CAP, first=FIRST) -> Schedule:
    """The unsound variant: Clopper-Pearson at the full alpha at every look."""
    looks = look_schedule(cap, first)
    return Schedule(looks, (alpha,) * len(looks))


def point_with_p1(p1: float, sigma: float = SIGMA) -> np.ndarray:
    """A 1x1x4 input whose exact smoothed class-1 probability at ``sigma`` is ``p1``."""
    margin = sigma * LINEAR.norm * norm.ppf(p1)
    return (margin * LINEAR.unit / LINEAR.norm).reshape(1, 1, 4)


def binomial_draw(rng, p: float):
    return lambda start, stop: int(rng.binomial(stop - start, p))


def simulate_single(p1: float, schedule: Schedule, policy: StopPolicy, rng, sigma: float = SIGMA):
    """One sequential CERTIFY of a 2-class classifier with exact class-1 probability p1 (network bypassed)."""
    count1 = rng.binomial(N0, p1)
    guess = int(count1 > N0 - count1)  # numpy's argmax of [N0 - count1, count1]: ties to class 0
    return certify_sequential(guess, binomial_draw(rng, p1 if guess == 1 else 1 - p1), sigma=sigma,
                              schedule=schedule, policy=policy)


def true_class_radius(p1: float, sigma: float = SIGMA) -> tuple[int, float]:
    x = point_with_p1(p1, sigma)
    return int(LINEAR.smoothed_class(x)), float(LINEAR.radius(x))


def violation_rate(p1: float, schedule: Schedule, policy: StopPolicy, trials: int = TRIALS, seed: int = 0):
    """(rate, certs): the fraction of trials certifying a wrong class, a radius above the exact one, or
    (with a target R) radius >= R where the exact radius is below R."""
    rng = np.random.default_rng(seed)
    cls, radius = true_class_radius(p1)
    certs = [simulate_single(p1, schedule, policy, rng) for _ in range(trials)]
    bad = [(not c.abstained) and (c.prediction != cls or c.radius > radius) for c in certs]
    return float(np.mean(bad)), certs


def allowed(alpha: float, trials: int = TRIALS) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_trials_can_see_a_twofold_violation():
    assert 2 * ALPHA > allowed(ALPHA)


# --- schedule -------------------------------------------------------------


def test_look_schedule_grows_by_the_ratio_to_the_cap():
    assert look_schedule(100_000, ratio=2) == (100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 100_000)
    assert look_schedule(1600, 100, 2) == (100, 200, 400, 800, 1600)
    assert look_schedule(100, 100) == (100,) and look_schedule(50, 100) == (50,)
    assert look_schedule(1000, 300, 2) == (300, 600, 1000)
    assert look_schedule(1600, 100, 1.5) == (100, 150, 225, 338, 507, 761, 1142, 1600)  # rounded up
    assert look_schedule(1600, 100, 1.3) == (100, 130, 169, 220, 286, 372, 484, 630, 819, 1065, 1385, 1600)
    assert look_schedule(CAP, FIRST) == (100, 120, 144, 173, 208, 250, 300, 360, 432, 519, 623, 748, 898, 1078,
                                         1294, 1600)  # the default 1.2
    # no sliver before the cap: 65,880 * 1.5 = 98,820 is dropped, as is a first look within sqrt(ratio) of the cap
    assert look_schedule(100_000, ratio=1.5)[-3:] == (43_920, 65_880, 100_000)
    assert len(look_schedule(100_000)) == 39 and look_schedule(105, 100) == (105,)
    for bad in (1.0, 0.5, float("nan"), 17):
        with pytest.raises(ValueError):
            look_schedule(1000, 100, bad)


def test_union_bound_levels_sum_to_alpha():
    even = union_bound_schedule(100_000, 0.001, ratio=2, final_share=None)
    assert len(even.levels) == 11 and math.isclose(sum(even.levels), 0.001) and len(set(even.levels)) == 1
    s = union_bound_schedule(100_000, 0.001)  # default: 0.7 of alpha at the cap, the rest evenly
    assert len(s.levels) == 39 and math.isclose(sum(s.levels), 0.001) and math.isclose(s.levels[-1], 0.0007)
    assert len(set(s.levels[:-1])) == 1 and math.isclose(s.levels[0], 0.0003 / 38)
    # a share below 1 / J is raised to the even split, so the cap keeps the largest level
    assert union_bound_schedule(1600, 0.1, 100, 2, 0.1).levels == (0.02,) * 5
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError):
            union_bound_schedule(1600, 0.1, final_share=bad)


def test_max_radius_is_the_all_hits_radius_at_the_last_look():
    s = sound()
    assert s.max_radius(SIGMA) == pytest.approx(SIGMA * norm.ppf((0.7 * ALPHA) ** (1 / CAP)))
    assert union_bound_schedule(3, ALPHA).max_radius(SIGMA) == 0.0  # 0.1 ** (1/3) < 1/2: nothing certifies


def test_schedule_rejects_bad_shapes():
    with pytest.raises(ValueError):
        Schedule((100, 100), (0.1, 0.1))
    with pytest.raises(ValueError):
        Schedule((100, 200), (0.1,))
    with pytest.raises(ValueError):
        Schedule((100,), (1.5,))
    with pytest.raises(ValueError):
        StopPolicy(target_radius=-1.0)


# --- exact-oracle soundness --------------------------------------------------

# p1 = 0.52: the selection often picks the wrong class; 0.7 / 0.9 / 0.99: radius violations.
POINTS = (0.52, 0.7, 0.9, 0.99)


@pytest.mark.parametrize("p1", POINTS)
def test_sequential_single_expert_violation_rate_is_at_most_alpha(p1):
    rate, certs = violation_rate(p1, sound(), StopPolicy())
    assert rate <= allowed(ALPHA), (p1, rate)
    if p1 >= 0.9:  # and it does certify
        assert np.mean([not c.abstained for c in certs]) > 0.9


@pytest.mark.parametrize("p1", (0.7, 0.9, 0.99))
def test_grid_stopping_with_projection_keeps_the_certificate_sound(p1):
    # any stopping rule is covered by the union bound, the projection heuristic included
    rate, certs = violation_rate(p1, sound(), StopPolicy(radius_grid=0.1))
    assert rate <= allowed(ALPHA), (p1, rate)
    assert any(c.stop == STOP_GRID for c in certs)


@pytest.mark.parametrize("p1", (0.7, 0.9))
def test_naive_peeking_fails_the_same_oracle(p1):
    # The same procedure with the unsound levels: its running max over looks overshoots p too often.
    rate, _ = violation_rate(p1, naive(), StopPolicy())
    assert rate > allowed(ALPHA), (p1, rate)


@pytest.mark.parametrize("p1", (0.7, 0.9, 0.99))
def test_target_radius_decision_violation_rate_is_at_most_alpha(p1):
    # Target = the exact radius: every stop at "target" certifies radius >= R* - a violation unless equal.
    _, radius = true_class_radius(p1)
    rate, certs = violation_rate(p1, sound(), StopPolicy(target_radius=radius))
    assert rate <= allowed(ALPHA), (p1, rate)
    assert all(c.stop in (STOP_TARGET, STOP_FUTILE, STOP_UNREACHABLE, STOP_CAP) for c in certs)


@pytest.mark.parametrize("p1", (0.7, 0.9, 0.99))
def test_naive_stop_at_first_success_fails_the_target_oracle(p1):
    _, radius = true_class_radius(p1)
    rate, _ = violation_rate(p1, naive(), StopPolicy(target_radius=radius))
    assert rate > allowed(ALPHA), (p1, rate)


def test_futility_stops_are_right_with_probability_one_minus_alpha():
    # The upper bounds at the same levels: a futility stop claims p < 1/2; wrong at most alpha of the time.
    for p_true in (0.5, 0.55):
        rng = np.random.default_rng(7)
        certs = [certify_sequential(1, binomial_draw(rng, p_true), sigma=SIGMA, schedule=sound(),
                                    policy=StopPolicy()) for _ in range(TRIALS)]
        assert np.mean([c.stop == STOP_FUTILE for c in certs]) <= allowed(ALPHA)


# --- power and savings (not soundness: that the stop rules do save samples) ----------


def test_hopeless_rows_abstain_at_the_first_look():
    rng = np.random.default_rng(1)
    certs = [certify_sequential(0, binomial_draw(rng, 0.3), sigma=SIGMA, schedule=sound(), policy=StopPolicy())
             for _ in range(200)]
    assert all(c.abstained for c in certs) and all(c.stop == STOP_FUTILE for c in certs)
    # the first look runs at 0.3 alpha / 15 (0.7 alpha is kept for the cap): most stop there, all soon after
    assert np.mean([c.n == FIRST for c in certs]) > 0.85 and max(c.n for c in certs) <= 286


def test_easy_target_is_decided_at_the_first_look():
    rng = np.random.default_rng(2)
    certs = [certify_sequential(1, binomial_draw(rng, 0.99), sigma=SIGMA, schedule=sound(),
                                policy=StopPolicy(target_radius=0.25)) for _ in range(200)]
    assert all(c.radius >= 0.25 and c.stop == STOP_TARGET for c in certs)
    assert np.mean([c.n == FIRST for c in certs]) > 0.95


def test_out_of_reach_target_stops_early():
    # R = 2.0 > the schedule's largest radius at sigma 0.5 (about 1.08): decided "no" at the first look.
    assert sound().max_radius(SIGMA) < 2.0
    rng = np.random.default_rng(3)
    c = certify_sequential(1, binomial_draw(rng, 0.999), sigma=SIGMA, schedule=sound(),
                           policy=StopPolicy(target_radius=2.0))
    assert c.stop == STOP_UNREACHABLE and c.n == FIRST and not c.abstained


def test_stop_rule_each_branch():
    s = SIGMA
    base = dict(sigma=s, last=False, policy=StopPolicy(radius_tol=0.05))
    assert stop_rule(best=0.3, upper=0.45, reach=0.9, **base) == STOP_FUTILE
    assert stop_rule(best=0.3, upper=0.6, reach=0.45, **base) == STOP_UNREACHABLE
    assert stop_rule(best=0.3, upper=0.6, reach=0.9, **base) is None
    assert stop_rule(best=0.3, upper=0.6, reach=0.9, sigma=s, last=True, policy=StopPolicy()) == STOP_CAP
    assert stop_rule(best=0.8, upper=0.85, reach=0.9, sigma=s, last=True, policy=StopPolicy()) == STOP_CAP
    # tolerance: reach radius within radius_tol of the current radius
    r = s * norm.ppf(0.8)
    near = float(norm.cdf((r + 0.04) / s))
    assert stop_rule(best=0.8, upper=0.85, reach=near, **base) == STOP_TOLERANCE
    assert stop_rule(best=0.8, upper=0.85, reach=near, sigma=s, last=False,
                     policy=StopPolicy(radius_tol=0.03)) is None
    target = dict(sigma=s, last=False, policy=StopPolicy(target_radius=r))
    assert stop_rule(best=0.8, upper=0.85, reach=0.9, **target) == STOP_TARGET
    assert stop_rule(best=0.7, upper=0.79, reach=0.9, **target) == STOP_FUTILE  # upper below Phi(R / sigma)
    assert stop_rule(best=0.7, upper=0.85, reach=0.79, **target) == STOP_UNREACHABLE
    assert stop_rule(best=0.7, upper=0.85, reach=near, **target) is None  # no tolerance rule with a target


def test_enough_radius_stops_once_reached_and_otherwise_keeps_improving():
    s, r = SIGMA, SIGMA * norm.ppf(0.8)
    enough = dict(sigma=s, last=False, policy=StopPolicy(enough_radius=r))
    assert stop_rule(best=0.8, upper=0.85, reach=0.9, **enough) == STOP_TARGET
    # short of it, an out-of-reach "enough" is not a decision: the run goes on (unlike a target)
    assert stop_rule(best=0.7, upper=0.85, reach=0.79, **enough) is None
    assert stop_rule(best=0.7, upper=0.85, reach=0.79, sigma=s, last=False,
                     policy=StopPolicy(target_radius=r)) == STOP_UNREACHABLE
    # the tolerance rule compares with min(reach, enough)
    just_below = float(norm.cdf((r - 0.03) / s))
    assert stop_rule(best=just_below, upper=0.85, reach=0.99, sigma=s, last=False,
                     policy=StopPolicy(radius_tol=0.05, enough_radius=r)) == STOP_TOLERANCE


def at(radius: float) -> float:
    return float(norm.cdf(radius / SIGMA))


def test_grid_rule_stops_only_when_no_grid_point_is_left_to_reach():
    grid = dict(sigma=SIGMA, last=False, policy=StopPolicy(radius_grid=0.25))
    up = 0.9999
    assert stop_rule(best=at(0.30), upper=up, reach=at(0.49), **grid) == STOP_GRID
    assert stop_rule(best=at(0.30), upper=up, reach=at(0.51), **grid) is None
    assert stop_rule(best=at(0.24), upper=up, reach=at(0.26), **grid) is None  # 0.25 still reachable
    assert stop_rule(best=at(0.10), upper=up, reach=at(0.20), **grid) == STOP_GRID  # keeps r = 0 only
    assert stop_rule(best=0.3, upper=up, reach=at(0.20), **grid) is None  # not certified yet: r = 0 is at stake
    # the upper bound says the next grid point is out of reach
    assert stop_rule(best=at(0.30), upper=at(0.49), reach=at(0.9), **grid) == STOP_GRID
    assert stop_rule(best=at(0.30), upper=at(0.51), reach=at(0.9), **grid) is None
    capped = dict(sigma=SIGMA, last=False, policy=StopPolicy(radius_grid=0.25, enough_radius=0.4))
    assert stop_rule(best=at(0.30), upper=0.99, reach=at(0.9), **capped) == STOP_GRID
    with pytest.raises(ValueError):
        StopPolicy(radius_grid=0.0)


def coupled_grid_runs(p1: float, policy: StopPolicy, step: float = 0.25, trials: int = 600):
    """(lost rate, mean samples saved) of grid-stopped runs against runs to the cap on the same seeded draws
    (so the grid run sees a prefix of the full run's rounds)."""
    lost, saved = 0, []
    for seed in range(trials):
        full = simulate_single(p1, sound(), StopPolicy(radius_tol=0.0), np.random.default_rng(seed))
        grid = simulate_single(p1, sound(), policy, np.random.default_rng(seed))
        assert grid.radius <= full.radius and grid.n <= full.n and (grid.abstained or not full.abstained)
        lost += (grid.abstained != full.abstained) or math.floor(full.radius / step) != math.floor(grid.radius / step)
        saved.append(full.n - grid.n)
    return lost / trials, float(np.mean(saved))


# p1 = 0.69 puts the exact radius (0.248) just below the grid point 0.25, 0.9 well between points
@pytest.mark.parametrize("p1", (0.69, 0.9, 0.999))
def test_grid_rule_without_projection_loses_a_grid_certificate_with_probability_at_most_two_alpha(p1):
    lost, saved = coupled_grid_runs(p1, StopPolicy(radius_grid=0.25, projection_level=None))
    assert lost <= allowed(2 * ALPHA, 600) and saved > 0


def test_grid_projection_saves_samples_at_a_small_measured_cost():
    # p1 = 0.695: the exact radius (0.255) is just above 0.25, so the cap run often certifies 0.25 only
    # late; p1 = 0.68 (radius 0.234): 0.25 is out of reach and only the projection sees it early.
    # p1 = 0.52: r = 0 itself is hard to certify within the cap; the projection abstains early instead
    for p1 in (0.52, 0.68, 0.695):
        off_lost, off_saved = coupled_grid_runs(p1, StopPolicy(radius_grid=0.25, projection_level=None), trials=300)
        on_lost, on_saved = coupled_grid_runs(p1, StopPolicy(radius_grid=0.25), trials=300)
        assert on_saved > off_saved + 100, (p1, on_saved, off_saved)
        assert on_lost <= off_lost + 0.1, (p1, on_lost, off_lost)


def test_grid_projection_rule():
    # the projected cap bound below the next grid point's probability stops; above it, or unset, does not
    grid = dict(sigma=SIGMA, last=False, policy=StopPolicy(radius_grid=0.25))
    assert stop_rule(best=at(0.30), upper=0.9999, reach=at(0.9), projected=at(0.49), **grid) == STOP_GRID
    assert stop_rule(best=at(0.30), upper=0.9999, reach=at(0.9), projected=at(0.51), **grid) is None
    assert stop_rule(best=at(0.30), upper=0.9999, reach=at(0.9), **grid) is None
    # a row not yet certified: r = 0 is at stake, so a projected cap bound below 1/2 abstains early
    assert stop_rule(best=0.3, upper=0.9, reach=0.99, projected=0.49, **grid) == STOP_FUTILE
    assert stop_rule(best=0.3, upper=0.9, reach=0.99, projected=0.51, **grid) is None
    assert stop_rule(best=0.3, upper=0.9, reach=0.99, projected=0.49, sigma=SIGMA, last=False,
                     policy=StopPolicy()) is None  # no grid: no projection
    with pytest.raises(ValueError):
        StopPolicy(radius_grid=0.25, projection_level=0.5)


def test_policy_within_lowers_target_and_enough():
    tol = DEFAULT_RADIUS_TOL
    assert StopPolicy().within(0.4) == StopPolicy(None, tol, 0.4)
    assert StopPolicy(target_radius=0.5).within(0.4) == StopPolicy(0.4, tol, 0.4)
    assert StopPolicy(target_radius=0.3, enough_radius=0.2).within(0.4) == StopPolicy(0.3, tol, 0.2)
    assert StopPolicy(radius_grid=0.25).within(0.4).radius_grid == 0.25
    assert StopPolicy(target_radius=0.3, enough_radius=0.2).stop_radius == 0.2


def test_reported_bound_is_the_best_over_looks_and_never_above_the_last_look_alone():
    rng = np.random.default_rng(4)
    for _ in range(50):
        c = simulate_single(0.8, sound(), StopPolicy(), rng)
        assert c.p_lower >= lower_confidence_bound(c.count, c.n, sound().levels[c.looks - 1]) - 1e-15
        assert c.n == look_schedule(CAP, FIRST)[c.looks - 1] and 1 <= c.looks <= 16


# --- identity with CERTIFY and the keyed stream ----------------------------------------


@pytest.mark.parametrize("n", [1, 7, 100, 250])
def test_one_look_equals_certify_from_counts_for_every_count(n):
    schedule = union_bound_schedule(n, ALPHA, first=n)
    assert schedule.looks == (n,) and schedule.levels == (ALPHA,)
    for n_a in range(n + 1):
        seq = certify_sequential(3, lambda a, b: n_a, sigma=SIGMA, schedule=schedule)
        ref = certify_from_counts(3, n_a, n, SIGMA, ALPHA)
        assert (seq.prediction, seq.radius, seq.p_lower, seq.count, seq.n) == (
            ref.prediction, ref.radius, ref.p_lower, ref.count, ref.n)


RNG = np.random.default_rng(11)
W3 = RNG.normal(size=(3, 16)).astype(np.float32)
B3 = RNG.normal(scale=0.1, size=3).astype(np.float32)
SHAPE = (1, 4, 4)


def smoothed(batch_size=400, sigma=0.5) -> SmoothedClassifier:
    counter = TorchCounter(linear_model(W3, B3, SHAPE), num_classes=3, input_shape=SHAPE, batch_size=batch_size)
    return SmoothedClassifier(counter, sigma)


def test_one_look_schedule_equals_cohen_certify_through_the_engine():
    x = np.random.default_rng(5).uniform(size=SHAPE).astype(np.float32)
    clf = smoothed()
    for index in range(3):
        ref = clf.certify(x, n0=50, n=300, alpha=0.01, seed=2, index=index)
        seq = clf.certify_sequential(x, n0=50, schedule=union_bound_schedule(300, 0.01, first=300), seed=2,
                                     index=index)
        assert (seq.prediction, seq.radius, seq.p_lower, seq.count, seq.n) == (
            ref.prediction, ref.radius, ref.p_lower, ref.count, ref.n)


def test_counts_from_an_offset_extend_the_stream():
    clf = smoothed(batch_size=37)
    x = np.random.default_rng(6).uniform(size=SHAPE).astype(np.float32)
    key = NoiseKey(1, 9, Stage.EXPERT_ESTIMATE)
    whole = clf.counter.counts(x, 0.5, 430, key=key)
    parts = clf.counter.counts(x, 0.5, 130, key=key) + clf.counter.counts(x, 0.5, 300, key=key, start=130)
    np.testing.assert_array_equal(whole, parts)


def test_sequential_rows_do_not_depend_on_batch_size():
    x = np.random.default_rng(8).uniform(size=SHAPE).astype(np.float32)
    schedule, policy = union_bound_schedule(800, 0.05, first=100), StopPolicy(target_radius=0.3)
    results = [smoothed(batch_size=b).certify_sequential(x, n0=100, schedule=schedule, policy=policy, seed=4,
                                                         index=2) for b in (7, 64, 400)]
    assert results[0] == results[1] == results[2]
    # its count at the stopping look is the fixed-N count at that N (the same keyed stream, extended)
    fixed = smoothed().counter.counts(x, 0.5, results[0].n, key=NoiseKey(4, 2, Stage.EXPERT_ESTIMATE))
    guess = smoothed().select(x, n0=100, seed=4, index=2)
    assert results[0].count == fixed[guess]


class SpyCounter:
    """Wraps a counter and records the (start, n) of every estimation request."""

    def __init__(self, inner):
        self.inner, self.calls, self.num_classes = inner, [], inner.num_classes

    def counts(self, x, sigma, n, *, key, start=0):
        if key.stage == Stage.EXPERT_ESTIMATE:
            self.calls.append((start, n))
        return self.inner.counts(x, sigma, n, key=key, start=start)


def test_rounds_are_the_next_blocks_of_one_stream():
    x = np.random.default_rng(9).uniform(size=SHAPE).astype(np.float32)
    spy = SpyCounter(smoothed(batch_size=64).counter)
    clf = SmoothedClassifier(spy, 0.5)
    c = clf.certify_sequential(x, n0=100, schedule=union_bound_schedule(1600, 0.05, first=100),
                               policy=StopPolicy(radius_tol=0.0), seed=3, index=1)
    assert c.looks >= 2, c  # several rounds, or the test proves nothing
    starts = [s for s, _ in spy.calls]
    assert starts[0] == 0 and all(a + n == b for (a, n), b in zip(spy.calls, starts[1:]))
    assert sum(n for _, n in spy.calls) == c.n
    fixed = smoothed().counter.counts(x, 0.5, c.n, key=NoiseKey(3, 1, Stage.EXPERT_ESTIMATE))
    assert c.count == fixed[clf.select(x, n0=100, seed=3, index=1)]


def test_abstain_is_reported_with_radius_zero():
    c = certify_sequential(1, lambda a, b: 0, sigma=SIGMA, schedule=sound())
    assert c.prediction == ABSTAIN and c.radius == 0.0 and c.stop == STOP_FUTILE
