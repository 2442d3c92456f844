"""benchmarks/rule_router.py: the confidence-threshold router.

The probe folder's logits must be the base expert's sorted probabilities; a rule folder must route as
the replayed rule does; and a rule, written as a folder and certified through its
own router-scores + compose, must give exactly the rows the fit replays.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.experts.folders import load_folder
from dualrs_route.router.calibrate import load_expert_stage, load_scores
from dualrs_route.router.results import read_results
from cli_checks import certify_experts
from rs_oracle import write_linear_folder
from bench_scripts import load_benchmark

SHAPE = (1, 4, 4)
SIGMAS = (0.1, 0.15, 0.2)


def _script():
    return load_benchmark("rule_router")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def zoo(tmp_path):
    """Three linear experts with 4 classes (sigma 0.1 / 0.15 / 0.2: the data's scale) and 30 images, labelled by the
    last expert's clean class where it is confident (margin above the median) and by the first one's elsewhere."""
    rng = np.random.default_rng(5)
    experts = [write_linear_folder(tmp_path / f"e{k}", weight=rng.normal(size=(4, 16)), bias=np.zeros(4),
                                   sigma=sigma, input_shape=SHAPE, name=f"e{k}")
               for k, sigma in enumerate(SIGMAS)]
    x = rng.uniform(size=(30, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        logits = [load_folder(str(e)).load_torch_model()(torch.from_numpy(x)) for e in experts]
    top2 = torch.softmax(logits[2], 1).topk(2, dim=1).values.numpy()
    confident = top2[:, 0] - top2[:, 1] >= np.median(top2[:, 0] - top2[:, 1])
    y = np.where(confident, logits[2].argmax(1).numpy(), logits[0].argmax(1).numpy()).astype(np.int64)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    return tmp_path, [str(e) for e in experts], data


def _outputs(folder, x):
    with torch.no_grad():
        return load_folder(str(folder)).load_torch_model().eval()(torch.from_numpy(x)).numpy()


def test_probe_and_rule_folders_compute_the_replayed_rule(zoo):
    tmp_path, experts, _ = zoo
    rr = _script()
    probe = rr.write_router(experts[2], experts, SIGMAS[2], str(tmp_path / "probe"), None)
    x = np.random.default_rng(0).normal(0.5, 1.0, size=(2000, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        sorted_p = torch.softmax(load_folder(experts[2]).load_torch_model()(torch.from_numpy(x)), 1).sort(
            1, descending=True).values[:, :3].numpy()
    features = _outputs(probe, x)
    np.testing.assert_allclose(features, sorted_p, atol=1e-6)
    for feature in rr.FEATURES:
        s = rr.feature(features, feature)
        t1, t2 = (float(v) for v in np.quantile(s, [0.3, 0.7]))
        rule = rr.write_router(experts[2], experts, SIGMAS[2], str(tmp_path / f"rule-{feature}"),
                               {"feature": feature, "t1": t1, "t2": t2})
        routed = _outputs(rule, x).argmax(1)
        replayed = rr.rule_logits(features, feature, t1, t2).argmax(1)
        expected = np.where(s < t1, 0, np.where(s < t2, 1, 2))
        near = np.abs(s - t1) < 1e-5
        near |= np.abs(s - t2) < 1e-5
        assert (routed == replayed)[~near].all() and (replayed == expected)[~near].all()
        assert np.bincount(routed, minlength=3).min() > 400  # every expert gets its share
        assert load_folder(str(rule)).config.kind == "router"


def test_a_rule_folder_certifies_as_its_replay_and_the_fit_covers_constant_routers(zoo, monkeypatch):
    tmp_path, experts, data = zoo
    rr = _script()
    probe = rr.write_router(experts[2], experts, SIGMAS[2], str(tmp_path / "probe"), None)
    n0, n, alpha = 20, 300, 0.002
    tsvs = [str(p) for p in certify_experts(tmp_path, experts, data, n0=n0, n=n, alpha=alpha, seed=4)]

    def scores_of(router, out):
        r = invoke("router-scores", "--router", router, "--dataset", f"npz:{data}", "--router-N0", n0, "--router-N", n,
                   "--seed", 4, "--engine", "torch", "--quiet", "--out", out)
        assert r.exit_code == 0, r.output
        return out

    probe_scores = scores_of(probe, tmp_path / "probe-scores.npz")
    choice = tmp_path / "rule.json"
    monkeypatch.setattr(sys, "argv", ["rule_router.py", "fit", "--scores", str(probe_scores), "--expert-results", *tsvs,
                                      "--alpha", str(alpha), "--step", "0.1", "--taus", "2,0.1", "--out", str(choice)])
    rr.main()
    best = json.loads(choice.read_text())
    assert best["heldout_acr"] >= max(best["constant_routers"].values())  # constant rules are on the grid
    # a rule that routes to more than one expert, certified through its own folder, equals its replay
    scores = load_scores(probe_scores)
    stages = [load_expert_stage(p, scores) for p in tsvs]
    s = rr.feature(scores.estimate, "margin")
    t1, t2 = (float(v) for v in np.quantile(s, [0.3, 0.7]))
    rule = {"feature": "margin", "t1": t1, "t2": t2}
    folder = rr.write_router(experts[2], experts, SIGMAS[2], str(tmp_path / "rule"), rule)
    rule_scores = scores_of(folder, tmp_path / "rule-scores.npz")
    for tau in (2.0, 0.1):
        replayed = rr.replay(scores, stages, None, "margin", t1, t2, tau, alpha)
        assert (np.bincount(replayed["expert"][replayed["expert"] >= 0], minlength=3) > 0).sum() >= 2
        composed = tmp_path / f"rule-{tau}.tsv"
        extra = ["--router-sets", tau] if tau <= 1 else []
        r = invoke("compose", "--router", folder, "--scores", rule_scores,
                   *sum((["--expert-results", p] for p in tsvs), []), "--alpha", alpha, *extra, "--out", composed)
        assert r.exit_code == 0, r.output
        table = read_results(composed)
        np.testing.assert_array_equal(table.predict, replayed["predict"])
        np.testing.assert_allclose(table.radius, replayed["radius"], atol=1e-6)  # TSV decimals


def test_confidence_routing_bound_reads_the_expert_files(zoo, capsys):
    """benchmarks/confidence_routing_bound.py: its expert and oracle ACRs are those of the files, and no rule
    does worse than sending everything to the best expert (a constant rule is on its grid) or better than the oracle."""
    tmp_path, experts, data = zoo
    tsvs = [str(p) for p in certify_experts(tmp_path, experts, data, n0=20, n=200, alpha=0.01, seed=2)]
    module = load_benchmark("confidence_routing_bound")
    module.main([*tsvs, "--step", "0.05"])
    lines = capsys.readouterr().out.splitlines()
    gains = [t.radius * t.correct for t in map(read_results, tsvs)]
    assert f"experts {np.round([g.mean() for g in gains], 4).tolist()}" in lines[0]
    oracle = np.max(gains, axis=0).mean()
    assert f"oracle {oracle:.4f}" in lines[0]
    values = [float(line.split("own radii ")[1].split()[0]) for line in lines[1:]]
    assert len(values) == 3
    assert all(gains[2].mean() - 1e-4 <= v <= oracle + 1e-4 for v in values)
