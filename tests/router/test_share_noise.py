"""Shared noise between the router and an expert of the same sigma (router/dual.py, ``certify --share-noise``):
the cache never changes a value, the expert reads exactly the router's streams, the exact oracle holds
(with correlated router and expert directions, so shared noise does correlate the stages), and the naive
reuse (the expert's class selected on the samples its bound is computed from) fails the same oracle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import norm

from dualrs_route.cli import main
from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.noise import BLOCK, NoiseKey, Stage, fill_torch_noise, numpy_block, sharing
from dualrs_route.experts.sequential import StopPolicy, union_bound_schedule
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.router.dual import DualCertifier, router_smoothed
from rs_oracle import BinaryLinear, linear_model, write_linear_folder

SHAPE = (1, 1, 4)
SIGMA = 0.5  # sigma_e = the shared expert's sigma
ALPHA = BETA = 0.05
N0, N = 50, 400
TRIALS = 2000  # sd of a rate near 0.05: 0.0049; the naive variant's ~0.1 is 7 sd above alpha + 3 sd
UNIT = np.eye(4, dtype=np.float32)
ZERO = np.zeros(4, np.float32)
W_R = np.stack([ZERO, UNIT[0]])
V = ((UNIT[0] + UNIT[1]) / math.sqrt(2)).astype(np.float32)  # expert 1 leans on the router's direction
W_E = [np.stack([ZERO, UNIT[2]]), np.stack([ZERO, V])]
B0 = np.zeros(2, np.float32)
ROUTER, EXPERTS = BinaryLinear(W_R, B0), [BinaryLinear(w, B0) for w in W_E]
SIGMAS = (0.25, SIGMA)


def counter(weight):
    return TorchCounter(linear_model(weight, B0), num_classes=2, input_shape=SHAPE, batch_size=128)


def dual(share: bool, naive: bool = False) -> DualCertifier:
    router = router_smoothed(counter(W_R), SIGMA)
    experts = [SmoothedClassifier(counter(w), s) for w, s in zip(W_E, SIGMAS)]
    d = DualCertifier(router, experts, share_noise=share)
    if naive:  # select the expert's class on the very samples its bound uses (the router's estimation stream)
        e = experts[1]
        d._stage_experts[1] = SmoothedClassifier(e.counter, e.sigma, select_stage=Stage.ROUTER_ESTIMATE,
                                                 estimate_stage=Stage.ROUTER_ESTIMATE)
    return d


def point(p_router1: float, p_expert1: float) -> np.ndarray:
    """Router class-1 probability p_router1 (routes to expert 1) and expert 1's class-1 probability p_expert1."""
    x = np.zeros(4, np.float32)
    x[0] = SIGMA * norm.ppf(p_router1)
    x[1] = math.sqrt(2) * SIGMA * norm.ppf(p_expert1) - x[0]
    return x.reshape(SHAPE)


# --- the cache changes no value ----------------------------------------------------------------------


def test_cached_blocks_equal_fresh_blocks_and_are_read_back():
    key, g = NoiseKey(3, 7, Stage.ROUTER_ESTIMATE), torch.Generator()
    fresh = torch.empty(150, *SHAPE)
    fill_torch_noise(fresh, g, key, 20, 170)  # blocks 0 (partial), 1, 2 (full), 3 (partial)
    with sharing() as cache:
        first, again = torch.empty(150, *SHAPE), torch.empty(150, *SHAPE)
        fill_torch_noise(first, g, key, 20, 170)
        misses = cache.misses
        fill_torch_noise(again, g, key, 20, 170)
        assert cache.hits == misses == 4 and cache.bytes == 4 * BLOCK * 4 * 4
        block = numpy_block(key, 2, SHAPE)
        assert numpy_block(key, 2, SHAPE) is block  # the numpy source is cached too
    assert torch.equal(first, fresh) and torch.equal(again, fresh)
    assert np.array_equal(numpy_block(key, 2, SHAPE), block)
    with sharing(max_bytes=0) as cache:  # nothing fits: drawn again, same values
        fill_torch_noise(first, g, key, 20, 170)
        fill_torch_noise(again, g, key, 20, 170)
        assert cache.hits == 0 and torch.equal(again, fresh)
    with sharing(), pytest.raises(RuntimeError):
        with sharing():
            pass


def test_the_shared_expert_reads_the_router_streams_and_reuses_their_blocks():
    x = point(0.99, 0.8)
    shared = dual(share=True)
    c = shared.certify(x, n0=N0, n=N, alpha=ALPHA, router_n0=N0, router_n=N, beta=BETA, seed=1, index=4)
    assert c.expert == 1 and shared.last_share.hits > 0
    # the same numbers as expert 1 certified on the router's streams without any cache
    e = shared.experts[1]
    on_router_streams = SmoothedClassifier(e.counter, e.sigma, select_stage=Stage.ROUTER_SELECT,
                                           estimate_stage=Stage.ROUTER_ESTIMATE)
    assert on_router_streams.certify(x, n0=N0, n=N, alpha=ALPHA, seed=1, index=4) == c.expert_certificate
    plain = dual(share=False)
    p = plain.certify(x, n0=N0, n=N, alpha=ALPHA, router_n0=N0, router_n=N, beta=BETA, seed=1, index=4)
    assert p.router_certificate == c.router_certificate and plain.last_share is None
    # the other expert (sigma 0.25 != sigma_e) keeps its own streams
    assert shared._stage_experts[0] is shared.experts[0] and shared.shares and not plain.shares
    seq = shared.certify_sequential(x, n0=N0, schedule=union_bound_schedule(N, ALPHA, 50), router_n0=N0,
                                    router_schedule=union_bound_schedule(N, BETA, 50), seed=1, index=4)
    assert seq.expert == 1 and shared.last_share.hits > 0


# --- exact oracle -----------------------------------------------------------------------------------


def violations(d: DualCertifier, x, *, sequential: bool = False, trials: int = TRIALS):
    """(any-stage rate, expert-stage rate): certificates wrong against the closed forms (router: class or
    R_sigma above the exact radius; expert: class or R_c above the routed expert's exact radius)."""
    r_cls, r_rad = int(ROUTER.smoothed_class(x)), float(ROUTER.radius(x))
    any_bad = expert_bad = 0
    for t in range(trials):
        if sequential:
            c = d.certify_sequential(x, n0=N0, schedule=union_bound_schedule(N, ALPHA, 50), router_n0=N0,
                                     router_schedule=union_bound_schedule(N, BETA, 50), policy=StopPolicy(),
                                     seed=0, index=t)
        else:
            c = d.certify(x, n0=N0, n=N, alpha=ALPHA, router_n0=N0, router_n=N, beta=BETA, seed=0, index=t)
        rc, ec = c.router_certificate, c.expert_certificate
        router_wrong = not rc.abstained and (rc.prediction != r_cls or rc.radius > r_rad)
        expert_wrong = False
        if ec is not None and not ec.abstained:
            k = c.expert
            exact = EXPERTS[k]
            cls, rad = int(exact.smoothed_class(x)), float(exact.radius(x))
            expert_wrong = ec.prediction != cls or ec.radius > rad
        any_bad += router_wrong or expert_wrong
        expert_bad += expert_wrong
    return any_bad / trials, expert_bad / trials


def allowed(rate: float, trials: int = TRIALS) -> float:
    return rate + 3 * math.sqrt(rate * (1 - rate) / trials)


@pytest.mark.parametrize("p_expert, sequential", [(0.5, False), (0.8, False), (0.8, True)])
def test_shared_noise_keeps_the_dual_guarantee(p_expert, sequential):
    # p_expert = 0.5: expert 1's exact radius is 0, so any expert certificate is a violation
    either, expert = violations(dual(share=True), point(0.97, p_expert), sequential=sequential)
    assert either <= allowed(ALPHA + BETA) and expert <= allowed(ALPHA), (either, expert)


def test_naive_reuse_selecting_on_the_estimation_samples_fails_the_oracle():
    d = dual(share=True, naive=True)
    _, expert = violations(d, point(0.97, 0.5))
    assert expert > allowed(ALPHA), expert


# --- the CLI ----------------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_share_noise_rows_settings_and_refusals(tmp_path, cli_expert):
    _, data, weight, bias = cli_expert
    write_linear_folder(tmp_path / "lin3b", weight=weight[::-1].copy(), bias=bias, sigma=0.5, input_shape=(1, 4, 4))
    router = write_linear_folder(tmp_path / "router", weight=np.random.default_rng(5).normal(size=(2, 16)) * 0.2,
                                 bias=np.array([0.0, 1.0]), sigma=0.5, kind="router", experts=["../lin3", "../lin3b"],
                                 input_shape=(1, 4, 4))  # routes most rows to lin3b, whose sigma is sigma_e
    common = ["certify", "--router", router, "--dataset", f"npz:{data}", "--N0", 20, "--N", 300, "--alpha", 0.02,
              "--seed", 3, "--quiet"]
    shared, plain = tmp_path / "shared.tsv", tmp_path / "plain.tsv"
    assert invoke(*common, "--out", plain).exit_code == 0
    result = invoke(*common, "--share-noise", "--out", shared)
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(Path(str(shared) + ".json").read_text())["settings"]["share_noise"] is True
    rows = [line.split("\t") for line in shared.read_text().splitlines()[1:]]
    others = [line.split("\t") for line in plain.read_text().splitlines()[1:]]
    routed_to_b = [i for i, r in enumerate(rows) if r[6].startswith("1:")]
    assert routed_to_b  # some rows use the shared expert, and their expert columns differ from the plain run's
    assert any(rows[i][9:] != others[i][9:] for i in routed_to_b)
    # the router columns are the same: the router stage is untouched
    assert [r[8] for r in rows] == [r[8] for r in others]
    before = shared.read_text()
    again = invoke(*common, "--out", shared)  # resuming without the flag is another run
    assert again.exit_code != 0 and "Traceback" not in again.output and shared.read_text() == before
    bad = invoke("certify", "--expert", tmp_path / "lin3", "--dataset", f"npz:{data}", "--share-noise", "--quiet",
                 "--out", tmp_path / "bad.tsv")
    assert bad.exit_code != 0 and "--share-noise applies only with --router" in bad.output
    assert not (tmp_path / "bad.tsv").exists()
