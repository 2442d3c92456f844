"""Set-valued router certificates (router/sets.py) against exact smoothed probabilities.

The router is linear along one direction t = x_0 with three classes on intervals of t:
class 0 for t < -c, class 1 for -c < t < c, class 2 for t > c. Under noise N(0, sigma_e^2 I) its
class probabilities are closed-form (p_0 = Phi((-c - t) / sigma_e), p_2 = Phi((t - c) / sigma_e)), so
the smoothed router g(t) = argmax_k p_k(t) and the exact distance from t to the nearest point where g
leaves a set S are computable. The selection counts are multinomial and the estimation count inside
S binomial, so the probability that the certificate "g stays in S within R_S" is wrong is an exact
sum: it must be at most beta. The naive threshold P(in S) > 1/2 fails the same check.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom, multinomial, norm

from dualrs_route.experts.stats import ABSTAIN, Certificate, lower_confidence_bound
from dualrs_route.router.sets import certify_set, set_members, set_radius


def probabilities(t: float, c: float, sigma: float) -> np.ndarray:
    p0 = norm.cdf((-c - t) / sigma)
    p2 = norm.cdf((t - c) / sigma)
    return np.array([p0, 1.0 - p0 - p2, p2])


def smoothed_class(t: float, c: float, sigma: float) -> int:
    return int(np.argmax(probabilities(t, c, sigma)))


def exit_distance(t: float, members: np.ndarray, c: float, sigma: float, reach: float = 8.0) -> float:
    """The exact distance from t to the nearest t' with g(t') outside the members (bisection refined)."""
    if not members[smoothed_class(t, c, sigma)]:
        return 0.0
    best = math.inf
    for direction in (-1.0, 1.0):
        steps = np.arange(1, int(reach / 1e-3) + 1) * 1e-3
        outside = [d for d in steps[::10] if not members[smoothed_class(t + direction * d, c, sigma)]]
        if not outside:
            continue
        hi = outside[0]
        lo = max(0.0, hi - 1e-2)
        for _ in range(40):
            mid = (lo + hi) / 2
            if members[smoothed_class(t + direction * mid, c, sigma)]:
                lo = mid
            else:
                hi = mid
        best = min(best, lo)
    return best


def naive_radius(count_in: int, n: int, size: int, num: int, beta: float, sigma: float) -> float:
    """The unsound variant: certify 'g stays in S' once P(in S) > 1/2, with Cohen's radius."""
    if size >= num:
        return math.inf
    lower = lower_confidence_bound(count_in, n, beta)
    return -1.0 if lower < 0.5 else (math.inf if lower >= 1 else sigma * norm.ppf(lower))


def sound_radius(count_in: int, n: int, size: int, num: int, beta: float, sigma: float) -> float:
    return set_radius(count_in, n, size, num, beta, sigma)[1]


def violation_probability(t, c, sigma, *, n0, n, beta, tau, radius_of=sound_radius):
    """Exact P[the set certificate claims g in S within R_S and that is false], and E[R_S] (0 where not certified)."""
    p = probabilities(t, c, sigma)
    counts = np.arange(n + 1)
    chance: dict[tuple, float] = {}  # members -> P(selection picks them)
    for sel in itertools.product(range(n0 + 1), repeat=2):
        if sum(sel) <= n0:
            selection = np.array([sel[0], sel[1], n0 - sum(sel)])
            key = tuple(set_members(selection, tau).tolist())
            chance[key] = chance.get(key, 0.0) + float(multinomial.pmf(selection, n0, p))
    wrong, mean_radius = 0.0, 0.0
    for key, p_sel in chance.items():
        members = np.array(key)
        size = int(members.sum())
        distance = exit_distance(t, members, c, sigma)
        pmf = binom.pmf(counts, n, min(float(p[members].sum()), 1.0))
        radii = np.array([radius_of(int(k), n, size, 3, beta, sigma) for k in counts])
        certified = radii >= 0
        false = certified & ((radii > distance) | (distance == 0.0))
        wrong += p_sel * float(pmf[false].sum())
        mean_radius += p_sel * float((pmf * np.where(certified & np.isfinite(radii), radii, 0.0)).sum())
    return wrong, mean_radius


@pytest.mark.parametrize("t, c", [(1.0, 1.0), (0.9, 1.0), (0.03, 0.385), (0.2, 0.385), (-0.5, 0.6), (2.5, 1.0)])
def test_set_certificate_holds_with_probability_one_minus_beta(t, c):
    wrong, _ = violation_probability(t, c, 1.0, n0=20, n=200, beta=0.01, tau=0.2)
    assert wrong <= 0.01


def test_the_set_certificate_is_not_vacuous_where_the_router_hesitates():
    # t = 1.0 sits on the boundary of classes 1 and 2: a singleton certificate is ~0 there, the set {1, 2} is far
    _, mean_set = violation_probability(1.0, 1.0, 1.0, n0=20, n=200, beta=0.01, tau=0.2)
    _, mean_single = violation_probability(1.0, 1.0, 1.0, n0=20, n=200, beta=0.01, tau=2.0)
    assert mean_set > 0.9 and mean_single < 0.2


def test_the_naive_threshold_fails_the_same_check():
    # p = (0.34, 0.30, 0.36): g(t) = 2, but S = {0, 1} (selection top 0, class 2 under tau) has P(in S) = 0.64 > 1/2
    t, c = 0.03, 0.385
    p = probabilities(t, c, 1.0)
    assert smoothed_class(t, c, 1.0) == 2 and p[0] + p[1] > 0.6
    wrong_naive, _ = violation_probability(t, c, 1.0, n0=20, n=200, beta=0.01, tau=0.25, radius_of=naive_radius)
    wrong_sound, _ = violation_probability(t, c, 1.0, n0=20, n=200, beta=0.01, tau=0.25)
    assert wrong_naive > 0.05 and wrong_sound <= 0.01


def test_set_radius_reduces_to_cohen_for_one_expert_and_is_infinite_for_all():
    for count in (60, 90, 100):
        lower = lower_confidence_bound(count, 100, 0.01)
        p, r = set_radius(count, 100, 1, 3, 0.01, 0.5)
        assert p == lower
        assert r == (-1.0 if lower < 0.5 else pytest.approx(0.5 * norm.ppf(lower)))
    assert set_radius(0, 100, 3, 3, 0.01, 0.5) == (1.0, math.inf)
    # two members need P(in S) >= 2/3: R_S = sigma (Phi^-1(1/3) + Phi^-1(lower))
    lower = lower_confidence_bound(95, 100, 0.01)
    assert set_radius(95, 100, 2, 3, 0.01, 0.5)[1] == pytest.approx(0.5 * (norm.ppf(1 / 3) + norm.ppf(lower)))
    assert set_radius(70, 100, 2, 3, 0.01, 0.5)[1] == -1.0  # lower bound < 2/3


def test_set_members_and_certify_set():
    assert set_members(np.array([60, 30, 10]), 0.2).tolist() == [True, True, False]
    assert set_members(np.array([60, 30, 10]), 2.0).tolist() == [True, False, False]
    assert set_members(np.array([40, 40, 20]), 2.0).tolist() == [True, False, False]  # ties: lowest index
    with pytest.raises(ValueError, match="router-sets"):
        set_members(np.array([1, 2, 3]), 0.0)
    calls = []

    def expert(k, level):
        calls.append((k, level))
        return {0: Certificate(3, 0.4, 0.9, 90, 100), 1: Certificate(3, 0.8, 0.99, 99, 100),
                2: Certificate(5, 0.9, 0.99, 99, 100), 3: Certificate(ABSTAIN, 0.0, 0.3, 30, 100)}[k]

    four = np.array([True, True, False, False])
    # the router hesitates between 0 and 1 (top 1: 55 of 100 alone, 99 of 100 inside S): the set proof wins
    out = certify_set(four, 1, 55, 99, 100, beta=0.01, alpha=0.01, sigma_e=1.0, expert=expert)
    assert calls == [(1, 0.005), (0, 0.005)]  # the top expert first, alpha split over the members
    assert out.members == (1, 0) and out.proof == "set" and out.prediction == 3
    assert out.radius == pytest.approx(0.4) and out.members[out.binding] == 0 and out.count_router == 99
    assert out.radius_router == pytest.approx(set_radius(99, 100, 2, 4, 0.005, 1.0)[1])  # beta / 2 per router bound
    # a confident top expert: its own dual radius (router bound at beta / 2) is the larger one
    calls.clear()
    sure = certify_set(four, 1, 100, 100, 100, beta=0.01, alpha=0.01, sigma_e=1.0, expert=expert)
    assert sure.proof == "single" and sure.radius == pytest.approx(0.8) and sure.members[sure.binding] == 1
    assert sure.radius_router == pytest.approx(set_radius(100, 100, 1, 4, 0.005, 1.0)[1])
    # members that disagree: only the single proof is left
    mixed = certify_set(np.array([False, True, True, False]), 2, 100, 100, 100, beta=0.01, alpha=0.01, sigma_e=1.0,
                        expert=expert)
    assert mixed.proof == "single" and mixed.prediction == 5 and mixed.radius == pytest.approx(0.9)
    torn = certify_set(np.array([False, True, True, False]), 2, 50, 100, 100, beta=0.01, alpha=0.01, sigma_e=1.0,
                       expert=expert)
    assert torn.prediction == ABSTAIN and torn.radius == 0.0
    # neither router bound certifies: the router abstains and no expert runs
    calls.clear()
    unsure = certify_set(four, 1, 40, 60, 100, beta=0.01, alpha=0.01, sigma_e=1.0, expert=expert)
    assert unsure.prediction == ABSTAIN and unsure.radius_router == -1.0 and unsure.expert_certificates == ()
    assert calls == []
    # an abstaining member stops the set proof; the top expert's own proof still stands
    top_ok = certify_set(np.array([False, True, False, True]), 1, 100, 100, 100, beta=0.01, alpha=0.01, sigma_e=1.0,
                         expert=expert)
    assert top_ok.proof == "single" and top_ok.prediction == 3
    with pytest.raises(ValueError, match="top expert"):
        certify_set(four, 2, 10, 10, 100, beta=0.01, alpha=0.01, sigma_e=1.0, expert=expert)
