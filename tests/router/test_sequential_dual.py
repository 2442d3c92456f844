"""Min-aware sequential dual certification (router/dual.py min_aware_certify): exact oracle, the naive
variant, the min-aware stops, and the engine path.

Oracle. Router and experts are 2-class linear models on 1x1x4 inputs whose weight differences are
orthogonal unit vectors, so one point sets the router's and each expert's exact smoothed probability
independently (tests/rs_oracle.py gives p, class and radius in closed form). The trials bypass the
networks: selection and every round's estimation counts are binomial draws from the exact
probabilities, fed to the same code (min_aware_certify over certify_sequential) that the engines feed.

A trial is a violation if it certifies and the router stage is wrong (routed expert != the exact
router class, or R_sigma above the exact router radius) or the expert stage is wrong (class != the
routed expert's exact class, or R_c above its exact radius). The union bound says this has probability
<= alpha + beta; it implies the final radius min(R_sigma, R_c) is at most the exact
min(router radius, routed expert radius) with the exact routed class (Dual RS Theorem 4.2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.sequential import (
    STOP_CAP,
    STOP_TARGET,
    Schedule,
    StopPolicy,
    certify_sequential,
    look_schedule,
    union_bound_schedule,
)
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.router.dual import DualCertifier, min_aware_certify, router_smoothed
from rs_oracle import BinaryLinear, linear_model

SHAPE = (1, 1, 4)
SIGMA_E, SIGMAS = 1.0, (0.25, 0.5)
ALPHA, BETA = 0.05, 0.05
N0, CAP, FIRST = 100, 1600, 100
TRIALS = 2000  # sd of a rate near 0.1: 0.0067; a 2x violation (0.2) is 15 sd above alpha + beta
UNIT = np.eye(4, dtype=np.float32)
W_R = np.stack([np.zeros(4, np.float32), UNIT[0]])
W_E = [np.stack([np.zeros(4, np.float32), UNIT[1]]), np.stack([np.zeros(4, np.float32), UNIT[2]])]
B0 = np.zeros(2, np.float32)
ROUTER, EXPERTS = BinaryLinear(W_R, B0), [BinaryLinear(w, B0) for w in W_E]


def point(p_router1: float, p_expert1: tuple[float, float]) -> np.ndarray:
    """The input whose exact class-1 probabilities are p_router1 (router) and p_expert1[k] (expert k)."""
    x = np.zeros(4)
    x[0] = SIGMA_E * norm.ppf(p_router1)
    x[1], x[2] = (s * norm.ppf(p) for s, p in zip(SIGMAS, p_expert1))
    return x.reshape(SHAPE)


def schedules(naive: bool) -> tuple[Schedule, Schedule]:
    if naive:  # Clopper-Pearson at each stage's full level at every look
        looks = look_schedule(CAP, FIRST)
        return Schedule(looks, (ALPHA,) * len(looks)), Schedule(looks, (BETA,) * len(looks))
    return union_bound_schedule(CAP, ALPHA, FIRST), union_bound_schedule(CAP, BETA, FIRST)


def simulated_dual(x, rng, naive: bool = False, policy: StopPolicy = StopPolicy()):
    """One min-aware dual certification of ``x`` with every count drawn from the exact probabilities."""
    expert_schedule, router_schedule = schedules(naive)
    p_router = float(ROUTER.p1(x, SIGMA_E))
    p_expert = [float(e.p1(x, s)) for e, s in zip(EXPERTS, SIGMAS)]

    def select(p1: float) -> int:
        count1 = rng.binomial(N0, p1)
        return int(count1 > N0 - count1)

    def estimate(guess, p1, sigma, schedule, stop_policy):
        draw = lambda a, b: int(rng.binomial(b - a, p1 if guess == 1 else 1 - p1))  # noqa: E731
        return certify_sequential(guess, draw, sigma=sigma, schedule=schedule, policy=stop_policy)

    guess = select(p_router)
    return min_aware_certify(
        guess, lambda p: estimate(guess, p_router, SIGMA_E, router_schedule, p),
        lambda k, p: estimate(select(p_expert[k]), p_expert[k], SIGMAS[k], expert_schedule, p),
        [expert_schedule.max_radius(s) for s in SIGMAS], policy)


def violation(x, cert) -> bool:
    if cert.abstained:
        return False
    k_true, r_router = int(ROUTER.smoothed_class(x)), float(ROUTER.radius(x))
    k = cert.expert
    rc, ec = cert.router_certificate, cert.expert_certificate
    router_bad = k != k_true or rc.radius > r_router
    expert_bad = cert.prediction != int(EXPERTS[k].smoothed_class(x)) or ec.radius > float(EXPERTS[k].radius(x))
    return router_bad or expert_bad


def violation_rate(x, naive=False, policy=StopPolicy(), seed=0):
    rng = np.random.default_rng(seed)
    certs = [simulated_dual(x, rng, naive, policy) for _ in range(TRIALS)]
    return float(np.mean([violation(x, c) for c in certs])), certs


def allowed(rate: float) -> float:
    return rate + 3 * math.sqrt(rate * (1 - rate) / TRIALS)


# Points: both stages near-decisive (violations possible in both), router-limited, expert-limited,
# and a router near 1/2 (wrong routing possible).
POINTS = {"both": (0.8, (0.3, 0.8)), "router-limited": (0.7, (0.1, 0.99)),
          "expert-limited": (0.99, (0.2, 0.7)), "router-near-half": (0.53, (0.1, 0.9))}


@pytest.mark.parametrize("name", sorted(POINTS))
def test_min_aware_violation_rate_is_at_most_alpha_plus_beta(name):
    x = point(*POINTS[name])
    rate, certs = violation_rate(x)
    assert rate <= allowed(ALPHA + BETA), (name, rate)
    if name != "router-near-half":
        assert np.mean([not c.abstained for c in certs]) > 0.8


@pytest.mark.parametrize("name", ["both", "router-limited"])
def test_naive_min_aware_fails_the_same_oracle(name):
    rate, _ = violation_rate(point(*POINTS[name]), naive=True)
    assert rate > allowed(ALPHA + BETA), (name, rate)


def test_min_aware_with_a_target_radius_is_sound():
    x = point(*POINTS["both"])
    r_true = min(float(ROUTER.radius(x)), float(EXPERTS[1].radius(x)))
    rate, _ = violation_rate(x, policy=StopPolicy(target_radius=r_true))
    assert rate <= allowed(ALPHA + BETA), rate


def test_expert_stops_at_the_routers_radius_and_router_at_the_experts_reach():
    # Router-limited: p_router 0.7 gives R_sigma <= 0.52, expert 1 (p 0.99, sigma 0.5) passes it at once.
    rng = np.random.default_rng(1)
    certs = [simulated_dual(point(*POINTS["router-limited"]), rng) for _ in range(200)]
    done = [c for c in certs if not c.abstained]
    assert np.mean([c.expert_certificate.stop == STOP_TARGET and c.expert_certificate.n == FIRST
                    for c in done]) > 0.9
    assert all(c.radius == min(c.router_certificate.radius, c.expert_certificate.radius) for c in done)
    # Expert-limited with an easy router: the router stops once R_sigma reaches the expert's reach.
    reach = union_bound_schedule(CAP, ALPHA, FIRST).max_radius(SIGMAS[1])
    easy = point(0.99999, (0.2, 0.7))
    certs = [simulated_dual(easy, rng) for _ in range(50)]
    assert all(c.router_certificate.stop == STOP_TARGET and c.router_certificate.radius >= reach
               and c.router_certificate.n < CAP for c in certs)


def test_engine_path_matches_and_one_look_equals_fixed_n_dual():
    import torch

    torch.set_num_threads(1)
    router = router_smoothed(TorchCounter(linear_model(W_R, B0), num_classes=2, input_shape=SHAPE), SIGMA_E)
    experts = [SmoothedClassifier(TorchCounter(linear_model(w, B0), num_classes=2, input_shape=SHAPE), s)
               for w, s in zip(W_E, SIGMAS)]
    dual = DualCertifier(router, experts)
    x = point(0.8, (0.3, 0.8)).astype(np.float32)
    for index in range(3):
        one_expert, one_router = union_bound_schedule(300, ALPHA, 300), union_bound_schedule(200, BETA, 200)
        seq = dual.certify_sequential(x, n0=N0, schedule=one_expert, router_n0=N0, router_schedule=one_router,
                                      seed=1, index=index)
        ref = dual.certify(x, n0=N0, n=300, alpha=ALPHA, router_n0=N0, router_n=200, beta=BETA, seed=1, index=index)
        assert (seq.prediction, seq.expert) == (ref.prediction, ref.expert)
        assert seq.router_certificate.p_lower == ref.router_certificate.p_lower
        if ref.expert_certificate is not None:
            assert seq.expert_certificate.p_lower == ref.expert_certificate.p_lower
            assert seq.radius == ref.radius
        assert seq.router_certificate.stop in (STOP_TARGET, STOP_CAP, "futile")
