"""``benchmarks/selector_levers.py``: the threshold selector's radius against a linear router's exact geometry (a naive
radius fails the same check), its replay at t = 1/2 against dual CERTIFY's, and the two-level replay against a
direct computation of its plain rows."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import norm

from dualrs_route.cli import main
from dualrs_route.experts.folders import load_folder
from dualrs_route.router import calibrate
from dualrs_route.router.dual import split_alpha
from bench_scripts import load_benchmark
from cli_checks import certify_experts
from rs_oracle import write_linear_folder

SHAPE = (1, 8, 8)
SIGMAS = (0.25, 0.5, 1.0)


def test_threshold_radius_is_the_distance_to_a_linear_selectors_boundary():
    """Base router 1[w.z + b > 0] at sigma_e: p_D(x) = Phi((w.x + b) / (sigma_e |w|)), so the selector
    'D iff p_D > t' switches on the hyperplane w.x + b = sigma_e |w| Phi^-1(t). With the exact p the radius must be
    the exact distance to it on both sides; Cohen's radius of the same p (the naive one) overshoots for t != 1/2."""
    sl = load_benchmark("selector_levers")
    rng = np.random.default_rng(3)
    w, b, sigma_e = rng.normal(size=16), 0.2, 0.7
    x = rng.normal(scale=1.5, size=(400, 16))
    margin = (x @ w + b) / np.linalg.norm(w)
    margin = margin[np.abs(margin) < 5 * sigma_e]  # where p is representable away from 0 and 1
    p, q = norm.cdf(margin / sigma_e), norm.cdf(-margin / sigma_e)  # q = 1 - p without rounding
    for t in (0.5, 0.3, 0.05):
        on = p > t
        distance = np.abs(margin - sigma_e * norm.ppf(t))
        got = sl.threshold_radius(np.where(on, p, q), np.where(on, t, 1 - t), sigma_e)
        np.testing.assert_allclose(got, distance, rtol=1e-9, atol=1e-9)
        naive = sigma_e * np.abs(norm.ppf(p))
        if t == 0.5:
            np.testing.assert_allclose(naive, distance, atol=1e-9)
        else:
            assert (naive > distance + 1e-6).any()  # the naive radius claims points across the boundary
    assert (sl.threshold_radius([0.4], [0.5], 1.0) == -1).all()


@pytest.fixture
def scored(tmp_path):
    """Three linear experts, a linear router over them (sigma_e 1.0: sigma 1.0 where the first half of the image is
    bright, else sigma 0.5) and one over the first two (sigma_e 0.5: sigma 0.25 where the second half is bright),
    their scores and the experts' certify files on 30 images."""
    rng = np.random.default_rng(8)
    first, last = np.r_[np.ones(32), np.zeros(32)] / 32, np.r_[np.zeros(32), np.ones(32)] / 32
    halves = np.stack([first, last])
    mix = [rng.normal(size=(3, 2)) * 20 for _ in SIGMAS]  # each expert reads the two half means its own way
    experts = [str(write_linear_folder(tmp_path / f"e{k}", weight=a @ halves, bias=-a.sum(1) / 2, sigma=s,
                                       input_shape=SHAPE, name=f"e{k}")) for k, (a, s) in enumerate(zip(mix, SIGMAS))]
    r1 = write_linear_folder(tmp_path / "r1", weight=np.stack([0 * first, 0 * first, 10 * first]),
                             bias=np.array([0.0, 0.1, -5.0]), sigma=1.0, kind="router", experts=["../e0", "../e1", "../e2"],
                             input_shape=SHAPE)
    r2 = write_linear_folder(tmp_path / "r2", weight=np.stack([10 * last, 0 * last]), bias=np.array([-5.0, 0.0]),
                             sigma=0.5, kind="router", experts=["../e0", "../e1"], input_shape=SHAPE)
    bright = rng.choice([0.1, 0.9], size=(30, 2))
    x = (rng.uniform(-0.05, 0.05, size=(30, 64)) + np.repeat(bright, 32, axis=1)).reshape(30, *SHAPE).astype(np.float32)
    with torch.no_grad():
        clean = [load_folder(e).load_torch_model()(torch.from_numpy(x)).argmax(1).numpy() for e in experts]
    y = np.where(np.arange(30) % 2 == 0, clean[2], clean[0]).astype(np.int64)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    n0, n, alpha, seed = 20, 200, 0.01, 4
    tsvs = [str(p) for p in certify_experts(tmp_path, experts, data, n0=n0, n=n, alpha=alpha, seed=seed)]
    scores = []
    for name, folder in (("s1", r1), ("s2", r2)):
        out = tmp_path / f"{name}.npz"
        r = CliRunner().invoke(main, [str(a) for a in ("router-scores", "--router", folder, "--dataset", f"npz:{data}",
                                                       "--router-N0", n0, "--router-N", n, "--seed", seed,
                                                       "--engine", "torch", "--quiet", "--out", out)])
        assert r.exit_code == 0, r.output
        scores.append(str(out))
    return scores, tsvs, alpha


def test_threshold_replay_at_one_half_is_dual_certify(scored):
    sl = load_benchmark("selector_levers")
    (s1, _), tsvs, alpha = scored
    rp = sl.Replay(s1, tsvs, 1)
    a, beta = split_alpha(alpha)
    merged = tuple(calibrate.merged_votes(v, {0: 1}) for v in (rp.select, rp.estimate))
    stand_in, stages, counts = calibrate.scaled(rp.scores, rp.experts[1:], merged, 1)
    want = calibrate.simulate(stand_in, stages, np.zeros(2), alpha=a, beta=beta, counts=counts)
    got = sl.threshold_replay(rp, 0.5, alpha=alpha)["per"]
    np.testing.assert_allclose(got, want["radius"] * want["correct"], atol=1e-12)
    assert got.sum() > 0
    assert not np.allclose(sl.threshold_replay(rp, 0.01, alpha=alpha)["per"], got)  # t matters: the check can fail


def test_two_level_plain_rows_are_the_min_of_both_levels_and_the_expert(scored):
    sl = load_benchmark("selector_levers")
    (s1, s2), tsvs, alpha = scored
    rp, rp2 = sl.Replay(s1, tsvs, 1), sl.Replay(s2, tsvs[:2], 1)
    two = sl.TwoLevel(rp, rp2, alpha=alpha)
    a, beta = split_alpha(alpha)
    p = calibrate.bound_tables(rp.n, beta / 2, 1.0)[0]
    sel_d, est_d = rp.binary()
    to_d = sel_d * 2 > rp.n0
    count1 = np.where(to_d, est_d, rp.n - est_d)
    r1 = np.where(p[count1] > 0.5, 1.0 * norm.ppf(p[count1]), -1.0)
    top2 = rp2.select.argmax(1)
    c2 = rp2.estimate[np.arange(len(top2)), top2]
    r2 = np.where(p[c2] > 0.5, 0.5 * norm.ppf(p[c2]), -1.0)
    rows = np.arange(len(rp.label))
    expert = np.where(to_d, rp.expert_radius(2, a, rows),
                      np.where(top2 == 0, rp.expert_radius(0, a, rows), rp.expert_radius(1, a, rows)))
    want = np.where(r1 < 0, 0.0, np.where(to_d, np.minimum(r1, expert),
                                          np.where(r2 < 0, 0.0, np.minimum(np.minimum(r1, r2), expert))))
    got = two.run(tau1=None, tau2=None)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert (~to_d & (got > 0)).any() and (to_d & (got > 0)).any()  # both levels certify somewhere
    with_sets = two.run(tau1=0.2, tau2=0.2)
    assert with_sets.shape == got.shape and (with_sets >= 0).all()
    with pytest.raises(SystemExit, match="first two experts"):
        sl.TwoLevel(rp, sl.Replay(s2, [tsvs[1], tsvs[2]], 1), alpha=alpha)


def test_the_cli_prints_each_family(scored, capsys):
    sl = load_benchmark("selector_levers")
    (s1, s2), tsvs, alpha = scored
    args = argparse.Namespace(router_scores=s1, expert_results=tsvs, scale=2, alpha=alpha)
    assert set(sl.cmd_threshold(args)) == {str(z) for z in sl.Z_GRID}
    assert len(sl.cmd_guard(args)) == len(sl.Z_GRID)
    bounds = sl.cmd_level2_bounds(args)
    assert bounds["oracle"]["acr"] >= bounds["as_is"]["acr"] - 1e-12
    out = sl.cmd_two_level(argparse.Namespace(router_scores=s1, level2_scores=s2, expert_results=tsvs, scale=2,
                                              alpha=alpha, tau=0.2))
    assert len(out) == 4
    assert "| plain | plain |" in capsys.readouterr().out
