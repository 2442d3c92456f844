"""Router calibration: logit offsets on every engine, the dual-CERTIFY replay, the offset search.

The replay (``router.calibrate.simulate`` / ``dualrs-route compose``) must give exactly the
rows that ``certify --router`` writes; the offsets must act like a shifted bias (closed form
for a linear router); the search must find a known optimum and leave a flat objective at 0.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import norm

from dualrs_route.experts.errors import DataError, ModelFormatError
from dualrs_route.experts.folders import ModelConfig, load_folder
from dualrs_route.export.engines import make_counter
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.stats import lower_confidence_bound
from dualrs_route.router.calibrate import (ExpertStage, RouterScores, bound_tables, fit_offsets, load_scores, routed_counts,
                              simulate, write_calibrated_router)
from dualrs_route.cli import main
from dualrs_route.router.results import read_results, summarize
from cli_checks import certify_experts
from rs_oracle import write_linear_folder
from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]

SHAPE = (1, 4, 4)


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture
def routed_set(tmp_path):
    """Three linear experts (sigma 0.25 / 0.5 / 1.0), a 3-output linear router (sigma_e 1.0), 24 images."""
    rng = np.random.default_rng(11)
    experts = []
    for k, sigma in enumerate((0.25, 0.5, 1.0)):
        w = rng.normal(size=(3, 16)).astype(np.float32) * (1.0 + k)
        experts.append(write_linear_folder(tmp_path / f"e{k}", weight=w, bias=np.zeros(3), sigma=sigma,
                                           input_shape=SHAPE, name=f"e{k}"))
    # router logits nearly tied between outputs 0 and 1, so offsets change its routing
    wr = rng.normal(scale=0.3, size=(3, 16)).astype(np.float32)
    router = write_linear_folder(tmp_path / "router", weight=wr, bias=np.array([0.3, 0.0, -0.2]), sigma=1.0,
                                 kind="router", experts=[f"../e{k}" for k in range(3)], input_shape=SHAPE)
    x = rng.uniform(size=(24, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 3, size=24)
    # labels: the sigma 0.5 expert's clean class on most images, so experts are right on some, wrong on others
    e1 = load_folder(str(experts[1])).load_torch_model()
    import torch

    with torch.no_grad():
        clean = e1(torch.from_numpy(x)).argmax(1).numpy()
    y = np.where(np.arange(24) % 4 == 0, y, clean).astype(np.int64)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    return tmp_path, experts, router, data


def _rows(path):
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    t = header.index("time")
    return [line.split("\t")[:t] + line.split("\t")[t + 1:] for line in lines]


def test_compose_gives_exactly_the_rows_of_certify_router(routed_set):
    tmp_path, experts, router, data = routed_set
    n0, n = 20, 300
    expert_tsvs = certify_experts(tmp_path, experts, data, n0=n0, n=n, alpha=0.002)
    scores = tmp_path / "scores.npz"
    r = invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--router-N0", n0, "--router-N", n,
               "--seed", 3, "--engine", "torch", "--chunk", 5, "--quiet", "--out", scores)
    assert r.exit_code == 0, r.output
    assert not Path(str(scores) + ".parts").exists()
    again = invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--out", scores)
    assert again.exit_code != 0 and "exists" in again.output
    loaded = load_scores(scores)
    assert loaded.select.shape == (24, n0, 3) and loaded.estimate.shape == (24, n, 3)
    # a calibrated copy with offsets that move the decision boundaries
    offsets = (0.0, 0.35, 0.1)
    calibrated = write_calibrated_router(load_folder(str(router)), [load_folder(str(e)) for e in experts],
                                         tmp_path / "calibrated", offsets, {"test": True})
    assert load_folder(str(calibrated)).config.logit_offsets == offsets
    for ref in (router, calibrated):
        composed = tmp_path / f"composed-{Path(ref).name}.tsv"
        r = invoke("compose", "--router", ref, "--scores", scores, *sum((["--expert-results", p] for p in expert_tsvs),
                   []), "--alpha", 0.002, "--out", composed)
        assert r.exit_code == 0, r.output
        real = tmp_path / f"real-{Path(ref).name}.tsv"
        r = invoke("certify", "--router", ref, "--dataset", f"npz:{data}", "--N0", n0, "--N", n, "--alpha", 0.002,
                   "--seed", 3, "--engine", "torch", "--quiet", "--out", real)
        assert r.exit_code == 0, r.output
        assert _rows(composed) == _rows(real)
    # the offsets changed the routing (otherwise this test would prove little)
    plain = [row[6] for row in _rows(tmp_path / "real-router.tsv")[1:]]
    shifted = [row[6] for row in _rows(tmp_path / "real-calibrated.tsv")[1:]]
    assert plain != shifted
    assert len(set(shifted)) >= 2


def test_offsets_act_as_a_shifted_bias_closed_form(tmp_path):
    """2-output linear router: with offsets b, P[class 1] = Phi((w.x + B1 + b1 - B0 - b0) / (sigma |w1 - w0|))."""
    w = np.array([[0.0] * 16, [0.5] * 8 + [-0.25] * 8], dtype=np.float32)
    bias = np.array([0.0, 0.1], dtype=np.float32)
    path = write_linear_folder(tmp_path / "r", weight=w, bias=bias, sigma=1.0, input_shape=SHAPE)
    cfg = json.loads((path / "config.json").read_text())
    cfg["logit_offsets"] = [0.2, -0.4]
    (path / "config.json").write_text(json.dumps(cfg))
    folder = load_folder(str(path))
    x = np.full(SHAPE, 0.5, dtype=np.float32)
    n = 40_000
    margin = float((w[1] - w[0]) @ x.reshape(-1) + bias[1] - bias[0] + (-0.4 - 0.2))
    p1 = norm.cdf(margin / (1.0 * np.linalg.norm(w[1] - w[0])))
    for engine in ("torch", "onnxruntime"):
        if engine == "onnxruntime":
            assert invoke("export", path, "--to", "onnx").exit_code == 0
            folder = load_folder(str(path))
        counter = make_counter(folder, engine=engine)
        counts = counter.counts(x, 1.0, n, key=NoiseKey(0, 0, Stage.EXPERT_ESTIMATE))
        assert abs(counts[1] / n - p1) < 5 * math.sqrt(p1 * (1 - p1) / n), (engine, counts, p1)
        # and exactly the argmax of the raw logits plus the offsets, sample by sample
        raw = make_counter(folder, engine=engine, raw_logits=True)
        logits = raw.logits_many(x[None], 1.0, 2000, keys=[NoiseKey(0, 0, Stage.EXPERT_ESTIMATE)])
        again = counter.counts(x, 1.0, 2000, key=NoiseKey(0, 0, Stage.EXPERT_ESTIMATE))
        assert np.array_equal(routed_counts(logits, np.array([0.2, -0.4], np.float32))[0], again)
        assert counter.describe()["logit_offsets"] == pytest.approx([0.2, -0.4])
        assert "logit_offsets" not in raw.describe()


def test_logits_many_matches_counts_many_on_both_engines(cli_expert):
    folder, data, _, _ = cli_expert
    assert invoke("export", folder, "--to", "onnx").exit_code == 0
    xs = np.load(data)["x"][:3]
    keys = [NoiseKey(1, i, Stage.EXPERT_SELECT) for i in range(3)]
    for engine in ("torch", "onnxruntime"):
        counter = make_counter(load_folder(str(folder)), engine=engine, batch_size=7)
        logits = counter.logits_many(xs, 0.25, 50, keys=keys)
        assert logits.shape == (3, 50, 3) and logits.dtype == np.float32
        assert np.array_equal(routed_counts(logits, np.zeros(3, np.float32)), counter.counts_many(xs, 0.25, 50, keys=keys))


def test_config_rejects_bad_offsets():
    base = {"kind": "router", "sigma": 1.0, "input_shape": [1, 4, 4], "experts": ["a", "b"]}
    assert ModelConfig.from_dict({**base, "logit_offsets": [0, 1.5]}, "x").logit_offsets == (0.0, 1.5)
    for bad in ([0.0], [0.0, float("nan")], [0, True], "0,1"):
        with pytest.raises(ModelFormatError, match="logit_offsets"):
            ModelConfig.from_dict({**base, "logit_offsets": bad}, "x")
    assert ModelConfig.from_dict({**base, "logit_offsets": [0, 2]}, "x").to_dict()["logit_offsets"] == [0.0, 2.0]


# --- the replay on hand-made inputs ---------------------------------------------------------

def _scores(select_votes, estimate_votes, label, k=2):
    """Scores whose per-sample argmax is the given vote (logit 1 for the voted class, 0 otherwise)."""
    def logits(votes):
        votes = np.asarray(votes)
        out = np.zeros((*votes.shape, k), dtype=np.float32)
        np.put_along_axis(out, votes[..., None], 1.0, axis=-1)
        return out

    return RouterScores(np.arange(len(label)), np.asarray(label), logits(select_votes), logits(estimate_votes),
                        {"sigma": 1.0, "seed": 0})


def _stage(guess, count, *, sigma, n, alpha=0.01):
    return ExpertStage("e", "e", sigma, n, alpha, np.asarray(guess), np.asarray(count), {})


def test_simulate_hand_checked():
    # image 0: router votes 10/10 for expert 1 -> routed; expert 1 certifies class 2 with 95 of 100
    # image 1: router split 5/5 on the estimate -> the router abstains
    # image 2: router picks expert 0, whose file abstained
    sel = [[1] * 10, [0] * 10, [0] * 10]
    est = [[1] * 10, [0] * 5 + [1] * 5, [0] * 10]
    scores = _scores(sel, est, label=[2, 1, 0])
    experts = [_stage([0, 1, -1], [80, 90, 40], sigma=0.25, n=100), _stage([2, 1, 0], [95, 90, 99], sigma=0.5, n=100)]
    out = simulate(scores, experts, [0.0, 0.0], alpha=0.005, beta=0.005)
    p_r = 0.005 ** (1 / 10)  # 10 of 10: Clopper-Pearson gives alpha ** (1 / n)
    p_e = lower_confidence_bound(95, 100, 0.005)
    assert out["expert"].tolist() == [1, -1, 0]
    assert out["predict"].tolist() == [2, -1, -1]
    assert out["radius"][0] == pytest.approx(min(norm.ppf(p_r), 0.5 * norm.ppf(p_e)))
    assert out["radius_router"][0] == pytest.approx(norm.ppf(p_r)) and out["correct"].tolist() == [1, 0, 0]
    assert out["n_router"].tolist() == [10, 5, 10] and out["radius"][1:].tolist() == [0.0, 0.0]
    # an offset of -2 on expert 1 sends image 0 to expert 0 (class 0: wrong) and image 1 as well, unanimously
    moved = simulate(scores, experts, [0.0, -2.0], alpha=0.005, beta=0.005)
    assert moved["expert"].tolist() == [0, 0, 0] and moved["predict"][0] == 0 and moved["correct"][0] == 0
    # the expert stage cannot run at a larger alpha than its file's
    with pytest.raises(DataError, match="larger alpha"):
        simulate(scores, experts, [0.0, 0.0], alpha=0.02, beta=0.005)


def test_bound_tables_match_the_scalar_functions():
    p, r = bound_tables(50, 0.001, 0.5)
    assert p[50] == pytest.approx(0.001 ** (1 / 50)) and p[0] == 0.0
    assert r[50] == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 50)))
    assert all(r[c] == -1.0 for c in range(51) if p[c] < 0.5)


def test_fit_offsets_finds_the_known_optimum_and_keeps_zero_when_flat():
    # every image: the router leans to expert 0 (logit 0.3 above expert 1), but expert 1 certifies a
    # much larger radius; an offset > 0.3 on expert 1 routes everything there
    m, n = 6, 50
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=0.05, size=(m, n, 2)).astype(np.float32)
    base = np.array([0.3, 0.0], dtype=np.float32)
    scores = RouterScores(np.arange(m), np.zeros(m, np.int64), (base + noise[:, :10]).astype(np.float32),
                          (base + noise).astype(np.float32), {"sigma": 1.0, "seed": 0})
    experts = [_stage([0] * m, [30] * m, sigma=0.25, n=50), _stage([0] * m, [50] * m, sigma=1.0, n=50)]
    offsets, ranked = fit_offsets(scores, experts, alpha=0.005, beta=0.005, grid=(-1.0, 1.0, 0.25))
    assert offsets[0] == 0.0 and 0.3 < offsets[1] <= 1.0
    assert ranked[0][1] == pytest.approx(simulate(scores, experts, offsets, alpha=0.005, beta=0.005)["radius"].mean())
    # both experts identical: nothing to gain, the offsets stay 0
    same = [experts[1], experts[1]]
    flat, _ = fit_offsets(scores, same, alpha=0.005, beta=0.005, grid=(-1.0, 1.0, 0.25))
    assert flat.tolist() == [0.0, 0.0]


def test_compose_refuses_mismatched_inputs(routed_set):
    tmp_path, experts, router, data = routed_set
    tsvs = certify_experts(tmp_path, experts, data, n0=10, n=50, alpha=0.002)
    scores = tmp_path / "s.npz"
    assert invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--router-N0", 10, "--router-N",
                  50, "--seed", 3, "--quiet", "--out", scores).exit_code == 0
    args = ["compose", "--router", router, "--scores", scores]
    # experts in the wrong order
    r = invoke(*args, "--expert-results", tsvs[1], "--expert-results", tsvs[0], "--expert-results", tsvs[2],
               "--out", tmp_path / "o.tsv")
    assert r.exit_code != 0 and "router's expert 0" in r.output
    # too few files
    r = invoke(*args, "--expert-results", tsvs[0], "--out", tmp_path / "o.tsv")
    assert r.exit_code != 0 and "one --expert-results" in r.output
    # alpha larger than the experts were certified at (expert share 0.005 > 0.002)
    r = invoke(*args, *sum((["--expert-results", p] for p in tsvs), []), "--alpha", 0.01, "--out", tmp_path / "o.tsv")
    assert r.exit_code != 0 and "larger alpha" in r.output
    # a sequential expert file: its counts come from a data-dependent N, not the rows of certify --router
    seq = tmp_path / "seq.tsv"
    r = invoke("certify", "--expert", experts[0], "--dataset", f"npz:{data}", "--N0", 10, "--N", 50, "--alpha", 0.002,
               "--seed", 3, "--engine", "torch", "--sequential", "--first-look", 10, "--quiet", "--out", seq)
    assert r.exit_code == 0, r.output
    r = invoke(*args, "--expert-results", seq, "--expert-results", tsvs[1], "--expert-results", tsvs[2],
               "--out", tmp_path / "o.tsv")
    assert r.exit_code != 0 and "fixed-N" in r.output and "(sequential)" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    # scores of another network
    other = write_linear_folder(tmp_path / "other", weight=np.ones((3, 16)), bias=np.zeros(3), sigma=1.0,
                                kind="router", experts=[f"../e{k}" for k in range(3)], input_shape=SHAPE)
    r = invoke("compose", "--router", other, "--scores", scores, *sum((["--expert-results", p] for p in tsvs), []),
               "--out", tmp_path / "o.tsv")
    assert r.exit_code != 0 and "another network" in r.output
    assert not (tmp_path / "o.tsv").exists()
    # an existing results file is replaced only with --force
    good = ["compose", "--router", router, "--scores", scores, *sum((["--expert-results", p] for p in tsvs), []),
            "--out", tmp_path / "o.tsv"]
    assert invoke(*good).exit_code == 0
    before = (tmp_path / "o.tsv").read_text()
    r = invoke(*good)
    assert r.exit_code != 0 and "--force" in r.output and (tmp_path / "o.tsv").read_text() == before
    assert invoke(*good, "--force").exit_code == 0
    # calibrate-router writes a folder with offsets and refuses to calibrate twice
    r = invoke("calibrate-router", "--router", router, "--scores", scores,
               *sum((["--expert-results", p] for p in tsvs), []), "--grid", "-0.5:0.5:0.5", "--quiet",
               "--out", tmp_path / "cal")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "cal" / "config.json").read_text())
    assert len(cfg["logit_offsets"]) == 3 and cfg["calibration"]["heldout_acr"]["calibrated"] >= \
        cfg["calibration"]["heldout_acr"]["zero_offsets"]
    assert load_folder(str(tmp_path / "cal")).config.experts[0] == "../e0"
    r = invoke("calibrate-router", "--router", tmp_path / "cal", "--scores", scores,
               *sum((["--expert-results", p] for p in tsvs), []), "--out", tmp_path / "cal2")
    assert r.exit_code != 0 and "already has logit_offsets" in r.output


def test_router_scores_resume_refuses_other_settings(routed_set):
    tmp_path, _, router, data = routed_set
    out = tmp_path / "s.npz"
    parts = Path(str(out) + ".parts")
    parts.mkdir()
    (parts / "meta.json").write_text(json.dumps({"format": "x"}))
    r = invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--router-N0", 10, "--router-N", 20,
               "--quiet", "--out", out)
    assert r.exit_code != 0 and "other settings" in r.output and not out.exists()


def test_router_sets_compose_equals_certify_and_sets_are_used(routed_set, monkeypatch):
    """certify --router --router-sets TAU and compose --router-sets TAU write the same rows; TAU > 1 is plain dual;
    benchmarks/router_sets.py (the held-out TAU sweep) replays the same ACRs."""
    tmp_path, experts, router, data = routed_set
    n0, n = 20, 300
    expert_tsvs = certify_experts(tmp_path, experts, data, n0=n0, n=n, alpha=0.002)
    scores = tmp_path / "scores.npz"
    assert invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--router-N0", n0, "--router-N", n,
                  "--seed", 3, "--engine", "torch", "--quiet", "--out", scores).exit_code == 0
    results = sum((["--expert-results", p] for p in expert_tsvs), [])
    common = ["--dataset", f"npz:{data}", "--N0", n0, "--N", n, "--alpha", 0.002, "--seed", 3, "--engine", "torch",
              "--quiet"]
    rows = {}
    for tau in (0.2, 2.0):
        composed, real = tmp_path / f"composed-sets-{tau}.tsv", tmp_path / f"real-sets-{tau}.tsv"
        r = invoke("compose", "--router", router, "--scores", scores, *results, "--alpha", 0.002, "--router-sets", tau,
                   "--out", composed)
        assert r.exit_code == 0, r.output
        r = invoke("certify", "--router", router, *common, "--router-sets", tau, "--out", real)
        assert r.exit_code == 0, r.output
        assert _rows(composed) == _rows(real)
        rows[tau] = _rows(real)
        meta = json.loads(Path(str(real) + ".json").read_text())
        assert meta["settings"]["router_sets"] == tau and "router sets" in meta["guarantee"]
    header = rows[0.2][0]
    members = [row[header.index("members")] for row in rows[0.2][1:]]
    assert any("+" in m for m in members)  # sets were used ...
    assert not any("+" in row[header.index("members")] for row in rows[2.0][1:])  # ... and never above 1
    plain = tmp_path / "plain.tsv"
    assert invoke("certify", "--router", router, *common, "--out", plain).exit_code == 0
    drop = header.index("members")  # members and proof are the last two columns
    assert [row[:drop] for row in rows[2.0]] == _rows(plain)  # tau > 1: dual CERTIFY's rows
    assert {row[drop + 1] for row in rows[2.0][1:]} == {"dual"}
    assert {row[drop + 1] for row in rows[0.2][1:] if "+" in row[drop]} == {"single", "set"}  # both proofs win rows
    cut = [[row[:drop] for row in rows[tau][1:]] for tau in (0.2, 2.0)]
    changed = [a != b for a, b in zip(*cut)]
    assert any(changed) and all(not c or "+" in m for c, m in zip(changed, members))  # only set rows differ
    # refusals: one line, nothing written
    for extra, says in ((["--router-sets", 0], "router-sets"), (["--router-sets", 0.2, "--share-noise"], "share-noise"),
                        (["--router-sets", 0.2, "--sequential"], "sequential")):
        out = tmp_path / "refused.tsv"
        r = invoke("certify", "--router", router, *common, *extra, "--out", out)
        assert r.exit_code != 0 and says in r.output and "Traceback" not in r.output, r.output
        assert not out.exists()
    r = invoke("certify", "--expert", experts[0], *common, "--router-sets", 0.2, "--out", tmp_path / "refused.tsv")
    assert r.exit_code != 0 and "only with --router" in r.output
    script = load_benchmark("router_sets")
    sweep = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["router_sets.py", "--router", str(router), "--scores", str(scores), *map(str, results),
                                      "--alpha", "0.002", "--tau", "0.2", "2", "--json", str(sweep)])
    script.main()
    got = json.loads(sweep.read_text())

    def acr_of(path):
        return summarize(read_results(path))["acr"]

    assert got["dual (min with R_sigma)"]["acr"] == pytest.approx(acr_of(plain), abs=1e-6)
    for tau in (0.2, 2.0):
        (key,) = [k for k in got if k.startswith(f"set, tau {tau:g} ")]
        assert got[key]["acr"] == pytest.approx(acr_of(tmp_path / f"real-sets-{tau}.tsv"), abs=1e-6)


def test_scaled_replay_is_the_certificate_of_the_scaled_counts():
    """``scaled`` at s = 1 is the plain replay; at s = 10 each row is Cohen's radius of the counts times 10 at
    N times 10, router and expert (exact: Clopper-Pearson from the scaled counts, min of both stages)."""
    from dualrs_route.experts.stats import certified_radius
    from dualrs_route.router.calibrate import scaled

    rng = np.random.default_rng(3)
    m, n0, n, k = 12, 20, 100, 3
    select = rng.normal(size=(m, n0, k)).astype(np.float32) + np.array([2.0, 0.0, 0.0], dtype=np.float32)
    estimate = rng.normal(size=(m, n, k)).astype(np.float32) + np.array([2.0, 0.0, 0.0], dtype=np.float32)
    label = rng.integers(0, 2, size=m)
    scores = RouterScores(np.arange(m), label, select, estimate, {"sigma": 1.0, "seed": 0})
    experts = [ExpertStage(path=f"e{j}", name=f"e{j}", sigma=s, n=n, alpha=0.001, guess=label.copy(),
                           count=rng.integers(60, n + 1, size=m), metadata={}) for j, s in enumerate((0.25, 0.5, 1.0))]
    zero = np.zeros(k)
    votes = routed_counts(select, zero), routed_counts(estimate, zero)
    plain = simulate(scores, experts, zero, alpha=0.0005, beta=0.0005)
    stand_in, stages, counts = scaled(scores, experts, votes, 1)
    same = simulate(stand_in, stages, zero, alpha=0.0005, beta=0.0005, counts=counts)
    assert np.array_equal(plain["radius"], same["radius"]) and np.array_equal(plain["predict"], same["predict"])
    stand_in, stages, counts = scaled(scores, experts, votes, 10)
    ten = simulate(stand_in, stages, zero, alpha=0.0005, beta=0.0005, counts=counts)
    for i in range(m):
        g = int(np.argmax(votes[0][i]))
        p_r = lower_confidence_bound(int(votes[1][i][g]) * 10, n * 10, 0.0005)
        p_e = lower_confidence_bound(int(experts[g].count[i]) * 10, n * 10, 0.0005)
        if p_r < 0.5 or p_e < 0.5:
            assert ten["radius"][i] == 0.0
        else:
            want = min(certified_radius(1.0, p_r), certified_radius(experts[g].sigma, p_e))
            assert ten["radius"][i] == pytest.approx(want, abs=1e-12)
    assert (ten["radius"] > plain["radius"]).sum() >= m // 2  # more samples, larger radii
    with pytest.raises(ValueError, match="positive integer"):
        scaled(scores, experts, votes, 0)


def test_grouped_router_certifies_what_the_merged_votes_replay(routed_set):
    """write_grouped_router (votes for expert 2 count for expert 1): ``certify --router`` of the grouped folder, plain
    and with router sets, gives exactly the rows replayed from the *source* router's scores with its votes merged,
    on torch and ONNX Runtime; with two experts a set row needs no router bound."""
    from dualrs_route.router.calibrate import (load_expert_stage, merged_votes, router_votes, scaled, simulate_sets,
                                               write_grouped_router)

    tmp_path, experts, router, data = routed_set
    n0, n, alpha = 20, 300, 0.002
    tsvs = certify_experts(tmp_path, experts, data, n0=n0, n=n, alpha=alpha)
    scores_path = tmp_path / "scores.npz"
    r = invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--router-N0", n0, "--router-N", n,
               "--seed", 3, "--engine", "torch", "--quiet", "--out", scores_path)
    assert r.exit_code == 0, r.output
    scores = load_scores(scores_path)
    stages = [load_expert_stage(p, scores) for p in tsvs]
    grouped = write_grouped_router(load_folder(str(router)), [load_folder(str(e)) for e in experts],
                                   tmp_path / "grouped", {2: 1})
    cfg = load_folder(str(grouped)).config
    assert cfg.num_classes == 2 and cfg.architecture_args["groups"] == "0,1+2" and len(cfg.experts) == 2
    votes = tuple(merged_votes(v, {2: 1}) for v in router_votes(scores, np.zeros(3)))
    assert votes[0].sum(axis=1).tolist() == [n0] * 24
    stand_in, kept, counts = scaled(scores, [stages[0], stages[1]], votes, 1)
    a, beta = alpha / 2, alpha / 2
    want = {2.0: simulate(stand_in, kept, np.zeros(2), alpha=a, beta=beta, counts=counts),
            0.2: simulate_sets(stand_in, kept, np.zeros(2), alpha=a, beta=beta, tau=0.2, counts=counts)}
    assert set(votes[0].argmax(axis=1).tolist()) == {0, 1}  # it selects both kept experts
    assert any(len(m) == 2 for m in want[0.2]["members"])  # some rows are sets
    assert not np.array_equal(want[0.2]["radius"], want[2.0]["radius"])  # so the two certificates differ
    for folder in (grouped, experts[0], experts[1]):
        assert invoke("export", folder, "--to", "onnx").exit_code == 0
    for engine in ("torch", "onnxruntime"):
        for tau, expected in want.items():
            out = tmp_path / f"grouped-{engine}-{tau}.tsv"
            extra = ["--router-sets", tau] if tau <= 1 else []
            r = invoke("certify", "--router", grouped, "--dataset", f"npz:{data}", "--N0", n0, "--N", n, "--alpha",
                       alpha, "--seed", 3, "--engine", engine, *extra, "--quiet", "--out", out)
            assert r.exit_code == 0, r.output
            table = read_results(out)
            np.testing.assert_array_equal(table.predict, expected["predict"])
            np.testing.assert_allclose(table.radius, expected["radius"], atol=1e-6)
    with pytest.raises(ValueError, match="two different experts"):
        write_grouped_router(load_folder(str(router)), [load_folder(str(e)) for e in experts], tmp_path / "bad", {0: 0})
    from dualrs_route.experts.architectures import parse_groups

    assert parse_groups("0,1+2", 3) == [[0], [1, 2]]
    for bad in ("0+0,1", "0,3", "a,b"):
        with pytest.raises(ValueError, match="groups"):
            parse_groups(bad, 3)


def test_unseen_replay_script_rows_are_the_replayed_certificates(routed_set):
    """benchmarks/unseen_replay.py: its K3 row at x1 is simulate / simulate_sets of the scores, a merge row is the
    replay of the merged votes, and the constant rows are constant_routers'."""
    import subprocess
    import sys

    from dualrs_route.router.calibrate import (acr, constant_routers, load_expert_stage, merged_votes, router_votes,
                                               scaled, simulate_sets)

    tmp_path, experts, router, data = routed_set
    tsvs = [str(p) for p in certify_experts(tmp_path, experts, data, n0=20, n=200, alpha=0.002)]
    scores_path = tmp_path / "scores.npz"
    r = invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--router-N0", 20, "--router-N", 200,
               "--seed", 3, "--engine", "torch", "--quiet", "--out", scores_path)
    assert r.exit_code == 0, r.output
    out = tmp_path / "replay.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "unseen_replay.py"), "--scores", f"lin={scores_path}",
                    *sum((["--expert-results", p] for p in tsvs), []), "--alpha", "0.002", "--scale", "1", "3",
                    "--tau", "0.2", "--json", str(out)], check=True, capture_output=True)
    table = json.loads(out.read_text())
    scores = load_scores(scores_path)
    stages = [load_expert_stage(p, scores) for p in tsvs]
    a = b = 0.001
    assert table["lin"]["K3, x1"]["plain"] == pytest.approx(acr(simulate(scores, stages, np.zeros(3), alpha=a, beta=b)))
    assert table["lin"]["K3, x1"]["sets"] == pytest.approx(
        acr(simulate_sets(scores, stages, np.zeros(3), alpha=a, beta=b, tau=0.2)))
    votes = tuple(merged_votes(v, {1: 0}) for v in router_votes(scores, np.zeros(3)))
    stand_in, kept, counts = scaled(scores, [stages[0], stages[2]], votes, 3)
    assert table["lin"]["0.5>0.25, x3"]["plain"] == pytest.approx(
        acr(simulate(stand_in, kept, np.zeros(2), alpha=a, beta=b, counts=counts)))
    constants = constant_routers(scores, stages, alpha=a, beta=b, scale=3)
    assert [table["constant"][f"{k}, x3"] for k in constants] == pytest.approx([acr(v) for v in constants.values()])
    # the split halves: the mean per-image value on the even and on the odd positions of the images
    sets = simulate_sets(scores, stages, np.zeros(3), alpha=a, beta=b, tau=0.2)
    values = sets["radius"] * sets["correct"]
    assert table["lin"]["K3, x1"]["halves"]["sets"] == pytest.approx([values[0::2].mean(), values[1::2].mean()])
    first = next(iter(constants))
    values = constants[first]["radius"] * constants[first]["correct"]
    assert table["constant halves"][f"{first}, x3"] == pytest.approx([values[0::2].mean(), values[1::2].mean()])
