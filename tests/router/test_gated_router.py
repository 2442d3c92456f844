"""The gated router (``gated_router`` architecture, ``router.calibrate.write_gated_router``,
``benchmarks/gated_router.py``).

A gated folder must vote exactly as the replay computes from the router's logits and the probe's sorted
probabilities on the same noisy copies; certified through its own router-scores + compose, and through
``certify --router`` on torch and ONNX Runtime, it must give exactly the rows the fit replays; a folder gated at
another threshold must not (the check can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.experts.errors import DataError
from dualrs_route.experts.folders import load_folder
from dualrs_route.router.calibrate import load_expert_stage, load_scores, write_gated_router
from dualrs_route.router.results import read_results
from bench_scripts import load_benchmark
from cli_checks import certify_experts
from rs_oracle import write_linear_folder

SHAPE = (1, 4, 4)
SIGMAS = (0.25, 0.5, 1.0)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def gated_set(tmp_path):
    """Three linear experts (3 classes), a linear router at sigma_e 1.0 and 24 images."""
    rng = np.random.default_rng(21)
    experts = [write_linear_folder(tmp_path / f"e{k}", weight=rng.normal(size=(3, 16)) * (1.0 + k), bias=np.zeros(3),
                                   sigma=sigma, input_shape=SHAPE, name=f"e{k}") for k, sigma in enumerate(SIGMAS)]
    router = write_linear_folder(tmp_path / "router", weight=rng.normal(scale=0.3, size=(3, 16)),
                                 bias=np.array([0.3, 0.0, -0.2]), sigma=1.0, kind="router",
                                 experts=[f"../e{k}" for k in range(3)], input_shape=SHAPE)
    x = rng.uniform(size=(24, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        clean = load_folder(str(experts[2])).load_torch_model()(torch.from_numpy(x)).argmax(1).numpy()
    y = np.where(np.arange(24) % 3 == 0, rng.integers(0, 3, size=24), clean).astype(np.int64)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    return tmp_path, [str(e) for e in experts], str(router), data


def _gate(tmp_path, router, experts, name, feature, threshold=2.0, **blend):
    return write_gated_router(load_folder(router), load_folder(experts[2]), [load_folder(e) for e in experts],
                              tmp_path / name, feature=feature, threshold=threshold, **blend)


def _outputs(folder, x):
    with torch.no_grad():
        return load_folder(str(folder)).load_torch_model().eval()(torch.from_numpy(x)).numpy()


def test_a_gated_folder_votes_as_the_replay(gated_set):
    tmp_path, experts, router, _ = gated_set
    gr, rr = load_benchmark("gated_router"), load_benchmark("rule_router")
    probe = rr.write_router(experts[2], experts, 1.0, str(tmp_path / "probe"), None)
    x = np.random.default_rng(0).normal(0.5, 1.0, size=(3000, *SHAPE)).astype(np.float32)
    logits, features = _outputs(router, x), _outputs(probe, x)
    for feature in ("p1", "margin"):
        s = rr.feature(features, feature)
        t = float(np.quantile(s, 0.6))
        gated = _outputs(_gate(tmp_path, router, experts, f"g-{feature}", feature, t), x).argmax(1)
        spec = {"mode": "gate", "feature": feature, "threshold": t, "gate_class": 2}
        want = gr.combined_logits(logits, features, spec).argmax(1)
        near = np.abs(s - t) < 1e-5
        assert (gated == want)[~near].all()
        assert (want == 2).mean() > 0.45 and (logits.argmax(1) != 2)[s >= t].any()  # the gate overrules the router
        assert (gated[s < t] == logits.argmax(1)[s < t]).all()
    # blend: the logit for expert 2 raised by w * margin + b, exactly as the replay computes it
    spec = {"mode": "blend", "feature": "margin", "weight": 1.5, "bias": -0.4, "gate_class": 2}
    blended = _outputs(_gate(tmp_path, router, experts, "blend", "margin", mode="blend", weight=1.5, bias=-0.4), x)
    np.testing.assert_allclose(blended, gr.combined_logits(logits, features, spec), atol=1e-6)
    np.testing.assert_array_equal(blended[:, :2], logits[:, :2])
    changed = blended.argmax(1) != logits.argmax(1)
    assert 0.05 < changed.mean() < 0.95
    never = _outputs(_gate(tmp_path, router, experts, "never", "p1", 2.0), x).argmax(1)
    always = _outputs(_gate(tmp_path, router, experts, "always", "p1", 0.0), x).argmax(1)
    assert (never == logits.argmax(1)).all() and (always == 2).all()
    cfg = load_folder(str(tmp_path / "never")).config
    assert cfg.kind == "router" and cfg.sigma == 1.0 and cfg.architecture == "gated_router"


def test_a_gated_folder_certifies_as_the_fit_replays(gated_set, capsys):
    tmp_path, experts, router, data = gated_set
    gr, rr = load_benchmark("gated_router"), load_benchmark("rule_router")
    n0, n, alpha, seed = 20, 300, 0.002, 5
    tsvs = [str(p) for p in certify_experts(tmp_path, experts, data, n0=n0, n=n, alpha=alpha, seed=seed)]
    probe = rr.write_router(experts[2], experts, 1.0, str(tmp_path / "probe"), None)

    def scores_of(folder, name, seed=seed):
        out = tmp_path / f"{name}.npz"
        r = invoke("router-scores", "--router", folder, "--dataset", f"npz:{data}", "--router-N0", n0, "--router-N", n,
                   "--seed", seed, "--engine", "torch", "--quiet", "--out", out)
        assert r.exit_code == 0, r.output
        return str(out)

    router_scores, probe_scores = scores_of(router, "router-scores"), scores_of(probe, "probe-scores")
    report = gr.fit(gr.argparse.Namespace(router_scores=router_scores, probe_scores=probe_scores, expert_results=tsvs,
                                          family="gate", gate_class=None, scale=1, tau=0.2, alpha=alpha, all=True,
                                          json=None))
    assert "| gate p1 >= 1.01 | plain |" in capsys.readouterr().out
    rows = {(r["spec"]["feature"], r["spec"]["threshold"], r["certificate"]): r for r in report["rows"]}
    scores, probe_s = load_scores(router_scores), load_scores(probe_scores)
    stages = [load_expert_stage(p, scores) for p in tsvs]
    s = rr.feature(probe_s.estimate, "p1")
    t = float(np.quantile(s, 0.5))
    gate = {"mode": "gate", "feature": "p1", "gate_class": 2}
    replayed = gr.replay(scores, probe_s, stages, {**gate, "threshold": t}, scale=1, alpha=alpha, tau=0.2)
    ungated = gr.replay(scores, probe_s, stages, {**gate, "threshold": 1.01}, scale=1, alpha=alpha, tau=0.2)
    assert not np.array_equal(replayed["plain"]["radius"], ungated["plain"]["radius"])  # the gate matters here
    assert rows[("p1", 1.01, "plain")]["acr"] == pytest.approx(float(np.mean(ungated["plain"]["radius"]
                                                                              * ungated["plain"]["correct"])))
    folder = _gate(tmp_path, router, experts, "gated", "p1", t)
    wrong = _gate(tmp_path, router, experts, "gated-other", "p1", float(np.quantile(s, 0.2)))
    for f in (folder, *experts):
        assert invoke("export", f, "--to", "onnx").exit_code == 0
    gated_scores = scores_of(folder, "gated-scores")
    wrong_scores = scores_of(wrong, "wrong-scores")
    for cert, tau in (("plain", 2.0), ("sets", 0.2)):
        extra = ["--router-sets", tau] if tau <= 1 else []
        expect = replayed[cert]
        for name, sc, want_equal in (("gated", gated_scores, True), ("other", wrong_scores, False)):
            out = tmp_path / f"{name}-{cert}.tsv"
            r = invoke("compose", "--router", folder if want_equal else wrong, "--scores", sc,
                       *sum((["--expert-results", p] for p in tsvs), []), "--alpha", alpha, *extra, "--out", out)
            assert r.exit_code == 0, r.output
            table = read_results(out)
            same = np.array_equal(table.predict, expect["predict"]) and np.allclose(table.radius, expect["radius"],
                                                                                   atol=1e-6)
            assert same == want_equal, (name, cert)
        for engine in ("torch", "onnxruntime"):
            out = tmp_path / f"certify-{engine}-{cert}.tsv"
            r = invoke("certify", "--router", folder, "--dataset", f"npz:{data}", "--N0", n0, "--N", n,
                       "--alpha", alpha, "--seed", seed, "--engine", engine, *extra, "--quiet", "--out", out)
            assert r.exit_code == 0, r.output
            table = read_results(out)
            np.testing.assert_array_equal(table.predict, expect["predict"])
            np.testing.assert_allclose(table.radius, expect["radius"], atol=1e-6)
    # a blend folder certifies as its replay too (ONNX Runtime)
    spec = {"mode": "blend", "feature": "margin", "weight": 2.0, "bias": -0.3, "gate_class": 2}
    blend = _gate(tmp_path, router, experts, "blend", "margin", mode="blend", weight=2.0, bias=-0.3)
    assert invoke("export", blend, "--to", "onnx").exit_code == 0
    expect = gr.replay(scores, probe_s, stages, spec, scale=1, alpha=alpha, tau=0.2)["sets"]
    assert not np.array_equal(expect["radius"], ungated["sets"]["radius"])
    out = tmp_path / "blend.tsv"
    r = invoke("certify", "--router", blend, "--dataset", f"npz:{data}", "--N0", n0, "--N", n, "--alpha", alpha,
               "--seed", seed, "--engine", "onnxruntime", "--router-sets", 0.2, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    table = read_results(out)
    np.testing.assert_array_equal(table.predict, expect["predict"])
    np.testing.assert_allclose(table.radius, expect["radius"], atol=1e-6)
    # score files of other noise are refused
    with pytest.raises(SystemExit, match="same noise"):
        gr.check_paired(scores, load_scores(scores_of(probe, "probe-other-seed", seed=seed + 1)))


def test_write_gated_router_refuses_mismatched_folders(gated_set):
    tmp_path, experts, router, _ = gated_set
    other = write_linear_folder(tmp_path / "other", weight=np.ones((3, 9)), bias=np.zeros(3), sigma=1.0,
                                input_shape=(1, 3, 3), name="other")
    with pytest.raises(DataError, match="other inputs"):
        write_gated_router(load_folder(router), load_folder(str(other)), [load_folder(e) for e in experts],
                           tmp_path / "bad", feature="p1", threshold=0.5)
    with pytest.raises(ValueError, match="gate feature"):
        _gate(tmp_path, router, experts, "bad2", "entropy", 0.5)
    with pytest.raises(ValueError, match="gate mode"):
        _gate(tmp_path, router, experts, "bad2", "p1", mode="mix")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
