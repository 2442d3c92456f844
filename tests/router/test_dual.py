"""Dual RS against an exact oracle (issue 3, "Must show"), single-expert equivalence, set checks.

Router and experts are 2-class linear models on 1x1x4 inputs. The smoothed router picks
expert 1 iff m_r(x) > 0 and stays constant within |m_r(x)| / |dw_r|; expert k's smoothed
classifier is sign(m_k(x)) with exact radius |m_k(x)| / |dw_k| (tests/rs_oracle.py). The
routed smoothed classifier G(x) = g_{k(x)}(x) is then constant on min(router radius, radius
of the routed expert) (the paper's Theorem 4.2), which is the "true radius" checked here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import binom

from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.errors import IncompatibleModelsError, ModelFormatError
from dualrs_route.experts.folders import load_folder
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.router.dual import DualCertifier, check_expert_set, load_router_set, router_smoothed, split_alpha
from rs_oracle import BinaryLinear, certify_outcomes, linear_model

SHAPE = (1, 1, 4)
SIGMA_E, SIGMAS = 0.5, (0.25, 0.5)
N0, N, ALPHA, BETA = 100, 100, 0.05, 0.05
POINTS, REPEATS = 40, 50  # 2,000 dual certifications
W_R = np.array([[0.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0]], np.float32)
B_R = np.array([0.0, -0.7], np.float32)
W_E = [np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.6, -0.8, 0.0]], np.float32),
       np.array([[0.0, 0.0, 0.0, 0.0], [0.3, 0.0, 0.4, -0.5]], np.float32)]
B_E = [np.array([0.0, 0.1], np.float32), np.array([0.0, -0.1], np.float32)]


@pytest.fixture(scope="module")
def setup():
    import torch

    torch.set_num_threads(1)
    router = router_smoothed(TorchCounter(linear_model(W_R, B_R), num_classes=2, input_shape=SHAPE), SIGMA_E)
    experts = [SmoothedClassifier(TorchCounter(linear_model(w, b), num_classes=2, input_shape=SHAPE), s)
               for w, b, s in zip(W_E, B_E, SIGMAS)]
    oracles = BinaryLinear(W_R, B_R), [BinaryLinear(w, b) for w, b in zip(W_E, B_E)]
    rng = np.random.default_rng(2026)
    xs = rng.uniform(0.0, 1.0, size=(POINTS, *SHAPE)).astype(np.float32)
    dual = DualCertifier(router, experts)
    certs = [[dual.certify(x, n0=N0, n=N, alpha=ALPHA, router_n0=N0, router_n=N, beta=BETA, seed=5,
                           index=j * REPEATS + r) for r in range(REPEATS)] for j, x in enumerate(xs)]
    return oracles, xs, certs


def truth(oracles, x):
    """(routed expert k*, class c*, router radius, expert radius of k*) of the exact routed classifier."""
    r_or, e_or = oracles
    k = int(r_or.smoothed_class(x))
    return k, int(e_or[k].smoothed_class(x)), float(r_or.radius(x)), float(e_or[k].radius(x))


def G(oracles, x) -> int:
    r_or, e_or = oracles
    return int(e_or[int(r_or.smoothed_class(x))].smoothed_class(x))


def router_fails(oracles, xs, certs):
    out = np.zeros((len(xs), REPEATS), bool)
    for j, x in enumerate(xs):
        k, _, r_router, _ = truth(oracles, x)
        for r, c in enumerate(certs[j]):
            rc = c.router_certificate
            out[j, r] = (not rc.abstained) and (rc.prediction != k or rc.radius > r_router)
    return out


def final_fails(oracles, xs, certs):
    out = np.zeros((len(xs), REPEATS), bool)
    for j, x in enumerate(xs):
        _, cls, r_router, r_expert = truth(oracles, x)
        for r, c in enumerate(certs[j]):
            out[j, r] = (not c.abstained) and (c.prediction != cls or c.radius > min(r_router, r_expert))
    return out


def test_points_cover_both_experts_and_certify_often(setup):
    oracles, xs, certs = setup
    ks = {truth(oracles, x)[0] for x in xs}
    assert ks == {0, 1}
    assert np.mean([not c.abstained for row in certs for c in row]) > 0.3


def test_router_radius_exceeds_constancy_radius_at_rate_at_most_beta(setup):
    oracles, xs, certs = setup
    fails = router_fails(oracles, xs, certs)
    # Slack: one-sided binomial test at 1e-3: P[Bin(2000, 0.05) > 131] < 1e-3.
    limit = int(binom.ppf(1 - 1e-3, fails.size, BETA))
    assert fails.sum() <= limit, (int(fails.sum()), limit)
    # exact expectation of the router-failure count (4 SD, Poisson-binomial)
    r_or = oracles[0]
    probs = []
    for x in xs:
        cls, rad, prob = certify_outcomes(float(r_or.p1(x, SIGMA_E)), n0=N0, n=N, alpha=BETA, sigma=SIGMA_E)
        probs.append(prob[(cls != int(r_or.smoothed_class(x))) | (rad > float(r_or.radius(x)))].sum())
    probs = np.array(probs)
    assert probs.max() <= BETA
    sd = math.sqrt(REPEATS * np.sum(probs * (1 - probs)))
    assert abs(fails.sum() - REPEATS * probs.sum()) <= 4 * sd + 1


def exact_dual(oracles, x):
    """Exact P[final certificate false] and E[final radius] (router and expert noise independent)."""
    r_or, e_or = oracles
    k_true, c_true, r_router, r_expert = truth(oracles, x)
    true_r = min(r_router, r_expert)
    rk, rrad, rprob = certify_outcomes(float(r_or.p1(x, SIGMA_E)), n0=N0, n=N, alpha=BETA, sigma=SIGMA_E)
    fail, mean = 0.0, 0.0
    for k in (0, 1):
        ec, erad, eprob = certify_outcomes(float(e_or[k].p1(x, SIGMAS[k])), n0=N0, n=N, alpha=ALPHA,
                                           sigma=SIGMAS[k])
        sel = rk == k
        joint = rprob[sel][:, None] * eprob[None, :]
        final = np.minimum(rrad[sel][:, None], erad[None, :])
        bad = (ec[None, :] != c_true) | (final > true_r)
        fail += float(joint[bad].sum())
        mean += float((joint * final).sum())
    return fail, mean


def test_final_radius_exceeds_true_radius_at_rate_at_most_alpha_plus_beta(setup):
    oracles, xs, certs = setup
    fails = final_fails(oracles, xs, certs)
    # Slack: one-sided binomial test at 1e-3: P[Bin(2000, 0.10) > 247] < 1e-3.
    limit = int(binom.ppf(1 - 1e-3, fails.size, ALPHA + BETA))
    assert fails.sum() <= limit, (int(fails.sum()), limit)
    exact = np.array([exact_dual(oracles, x)[0] for x in xs])
    assert exact.max() <= ALPHA + BETA + 1e-12  # union bound, point by point
    sd = math.sqrt(REPEATS * np.sum(exact * (1 - exact)))
    # Slack: 4 SD around the exact expected count.
    assert abs(fails.sum() - REPEATS * exact.sum()) <= 4 * sd + 1, (int(fails.sum()), REPEATS * exact.sum(), sd)


def test_final_check_can_fail(setup):
    # Teeth: claiming the expert's radius alone (ignoring R_sigma, i.e. no min) must be caught when
    # the router is the bottleneck, and claiming the point-estimate radius is caught by far.
    oracles, xs, certs = setup
    from scipy.stats import norm

    def naive_radius(c):
        ec = c.expert_certificate
        p_hat = min(ec.count / ec.n, 1 - 1e-9)
        return SIGMAS[c.expert] * norm.ppf(p_hat)

    bad = 0
    for j, x in enumerate(xs):
        _, cls, r_router, r_expert = truth(oracles, x)
        bad += sum((not c.abstained) and (c.prediction != cls or naive_radius(c) > min(r_router, r_expert))
                   for c in certs[j])
    assert bad > int(binom.ppf(1 - 1e-3, POINTS * REPEATS, ALPHA + BETA))


def test_mean_final_radius_matches_exact_expectation(setup):
    oracles, xs, certs = setup
    means = np.array([exact_dual(oracles, x)[1] for x in xs])
    observed = np.array([[c.radius for c in row] for row in certs])
    # Slack: 5 SD using the observed per-point spread (the exact variance needs the joint second
    # moment; the per-point sample variance over 50 repeats is a close stand-in).
    sd = math.sqrt(np.sum(observed.var(axis=1, ddof=1)) / REPEATS) / POINTS
    assert observed.mean() == pytest.approx(means.mean(), abs=5 * sd + 1e-9), (observed.mean(), means.mean(), sd)


def test_perturbation_below_certified_radius_keeps_exact_prediction(setup):
    oracles, xs, certs = setup
    r_or, e_or = oracles
    rng = np.random.default_rng(0)
    directions = [u.unit for u in [r_or, *e_or]]
    directions += [-d for d in directions] + list(rng.normal(size=(8, 4)))
    directions = [d / np.linalg.norm(d) for d in directions]
    flagged = final_fails(oracles, xs, certs)
    changed = np.zeros_like(flagged)
    checked = 0
    for j, x in enumerate(xs):
        flat = x.reshape(-1).astype(np.float64)
        assert G(oracles, flat) == truth(oracles, x)[1]
        for r, c in enumerate(certs[j]):
            if c.abstained or c.radius == 0:
                continue
            for d in directions:
                checked += 1
                if G(oracles, flat + 0.999 * c.radius * d) != c.prediction:
                    changed[j, r] = True
    assert checked > 5000
    # Every change is explained by a certificate the oracle already counts as false (rate <= alpha+beta,
    # tested above); no certificate that the oracle accepts is ever broken by a perturbation.
    assert not np.any(changed & ~flagged)
    assert changed.sum() <= flagged.sum()


def test_router_and_expert_stages_draw_independent_streams():
    calls = []

    class Rec:
        def __init__(self, inner):
            self.inner, self.num_classes, self.input_shape = inner, inner.num_classes, inner.input_shape
            self.engine, self.precision = "torch", "fp32"

        def counts(self, x, sigma, n, *, key):
            calls.append((key.stage, n, sigma))
            return self.inner.counts(x, sigma, n, key=key)

    router = router_smoothed(Rec(TorchCounter(linear_model(np.zeros((1, 4)), [0.0]), num_classes=1,
                                              input_shape=SHAPE)), 1.0)
    expert = SmoothedClassifier(Rec(TorchCounter(linear_model(W_E[0], B_E[0]), num_classes=2,
                                                 input_shape=SHAPE)), 0.25)
    DualCertifier(router, [expert]).certify(np.full(SHAPE, 0.5, np.float32), n0=10, n=60, alpha=0.01,
                                            router_n0=20, router_n=70, beta=0.02, seed=1, index=3)
    assert calls == [(Stage.ROUTER_SELECT, 20, 1.0), (Stage.ROUTER_ESTIMATE, 70, 1.0),
                     (Stage.EXPERT_SELECT, 10, 0.25), (Stage.EXPERT_ESTIMATE, 60, 0.25)]
    assert len({NoiseKey(1, 3, s).block_seed(0) for s, _, _ in calls}) == 4


def test_dual_predict_routes_then_predicts():
    router = router_smoothed(TorchCounter(linear_model(W_R, np.array([0.0, 50.0], np.float32)), num_classes=2,
                                          input_shape=SHAPE), SIGMA_E)  # always expert 1
    experts = [SmoothedClassifier(TorchCounter(linear_model(w, b), num_classes=2, input_shape=SHAPE), s)
               for w, b, s in zip(W_E, B_E, SIGMAS)]
    x = np.array([0.9, 0.1, 0.1, 0.1], np.float32).reshape(SHAPE)  # expert 1 margin 0.31+0.04-0.05-0.1 > 0
    prediction, expert = DualCertifier(router, experts).predict(x, n=500, alpha=0.001, router_n=500, beta=0.001)
    assert expert == 1 and prediction == int(BinaryLinear(W_E[1], B_E[1]).smoothed_class(x))


# --- single-expert equivalence ---


def test_single_expert_router_reproduces_cohen_certify_bit_for_bit():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 16)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    shape = (1, 4, 4)
    expert = SmoothedClassifier(TorchCounter(linear_model(w, b, shape), num_classes=4, input_shape=shape), 0.5)
    always = router_smoothed(TorchCounter(linear_model(np.zeros((1, 16)), [3.0], shape), num_classes=1,
                                          input_shape=shape), 1.0)
    dual = DualCertifier(always, [expert])
    for index in range(25):
        x = rng.uniform(size=shape).astype(np.float32)
        routed = dual.certify(x, n0=50, n=500, alpha=0.0005, router_n0=50, router_n=500, beta=0.0005, seed=8,
                              index=index)
        alone = expert.certify(x, n0=50, n=500, alpha=0.0005, seed=8, index=index)
        assert routed.expert == 0
        assert routed.expert_certificate == alone  # identical dataclass: class, radius, p_lower, count, n
        if not alone.abstained:
            assert routed.prediction == alone.prediction
            assert routed.radius == min(alone.radius, routed.router_certificate.radius)


def test_split_alpha():
    assert split_alpha(0.001) == (0.0005, 0.0005)
    assert split_alpha(0.01, 0.002) == (0.008, 0.002)
    for args in [(0.0,), (1.0,), (0.01, 0.01), (0.01, 0.02), (0.01, 0.0)]:
        with pytest.raises(ValueError):
            split_alpha(*args)


# --- inconsistent sets ---


def _expert(linear_folder, name, k=2, shape=SHAPE, sigma=0.25):
    d = int(np.prod(shape))
    return linear_folder(name, weight=np.zeros((k, d)), bias=np.zeros(k), sigma=sigma, input_shape=shape)


def test_check_expert_set_refuses_mixed_class_counts_and_shapes(linear_folder):
    a = load_folder(str(_expert(linear_folder, "a")))
    b3 = load_folder(str(_expert(linear_folder, "b3", k=3)))
    shaped = load_folder(str(_expert(linear_folder, "shaped", shape=(1, 2, 2))))  # also 4 pixels
    with pytest.raises(IncompatibleModelsError, match="num_classes"):
        check_expert_set([a, b3])
    with pytest.raises(IncompatibleModelsError, match="input_shape"):
        check_expert_set([a, shaped])
    with pytest.raises(IncompatibleModelsError):
        check_expert_set([])
    assert check_expert_set([a, load_folder(str(_expert(linear_folder, "a2")))]) == []


def test_router_set_loading_and_refusals(linear_folder, tmp_path):
    _expert(linear_folder, "e0", sigma=0.25)
    _expert(linear_folder, "e1", sigma=0.5)
    _expert(linear_folder, "e3", k=3)
    _expert(linear_folder, "eshape", shape=(1, 2, 2))

    def router(name, experts, k=None, sigma=0.5, shape=SHAPE):
        k = len(experts) if k is None else k
        return str(linear_folder(name, weight=np.zeros((k, 4)), bias=np.zeros(k), sigma=sigma, kind="router",
                                 experts=experts, input_shape=shape))

    ok = router("ok", ["../e0", "../e1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r, experts = load_router_set(ok)
    assert [e.path.name for e in experts] == ["e0", "e1"] and r.config.kind == "router"
    with pytest.warns(UserWarning, match="sigma_e"):
        load_router_set(router("low", ["../e0", "../e1"], sigma=0.25))
    with pytest.raises(IncompatibleModelsError, match="num_classes"):
        load_router_set(router("mixk", ["../e0", "../e3"]))
    with pytest.raises(IncompatibleModelsError, match="input_shape"):
        load_router_set(router("mixs", ["../e0", "../eshape"]))
    with pytest.raises(IncompatibleModelsError, match="input_shape"):
        load_router_set(router("rshape", ["../e0", "../e1"], shape=(1, 2, 2)))
    # router with the wrong K: config.json claims 3 outputs for 2 experts -> refused when loading
    wrong = router("wrongk", ["../e0", "../e1"], k=3)
    with pytest.raises(ModelFormatError, match="num_classes=3"):
        load_router_set(wrong)
    # config claims K = 2 but the weights have 3 outputs -> refused when the network is built
    import json
    from pathlib import Path

    cfg = json.loads((Path(wrong) / "config.json").read_text())
    cfg["num_classes"] = 2
    (Path(wrong) / "config.json").write_text(json.dumps(cfg))
    r, _ = load_router_set(wrong)
    from dualrs_route.export.engines import make_counter

    with pytest.raises(ModelFormatError, match="does not match the weights"):
        make_counter(r)
    with pytest.raises(IncompatibleModelsError):
        DualCertifier(router_smoothed(TorchCounter(linear_model(np.zeros((3, 4)), np.zeros(3)), num_classes=3,
                                                   input_shape=SHAPE), 0.5),
                      [SmoothedClassifier(TorchCounter(linear_model(W_E[0], B_E[0]), num_classes=2,
                                                       input_shape=SHAPE), 0.25)] * 2)
