"""Router training (issue 4): the loss on hand-checked inputs, the trainer, the router folder, diagnostics."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dualrs_route.experts.data import load_dataset
from dualrs_route.experts.errors import DataError, IncompatibleModelsError
from dualrs_route.experts.folders import load_folder
from dualrs_route.router.dual import load_router_set
from dualrs_route.router.labels import compute_labels, load_labels, routable
from dualrs_route.router.training import (bottleneck_report, class_weights, consistency_loss, consistency_terms, format_report,
                             lr_milestones,
                             router_loss, routing_diagnostics, soft_cross_entropy, soft_labels, train_router)
from rs_oracle import write_linear_folder

# --- soft labels and class weights ---


def test_soft_labels_are_a_softmax_of_the_radii():
    y = soft_labels([[0.0, math.log(3.0)], [0.5, 0.5]])
    assert y.numpy() == pytest.approx(np.array([[0.25, 0.75], [0.5, 0.5]]), abs=1e-6)
    # exp(R_k) / sum_j exp(R_j) on a 1x3 row: e^0, e^1, e^2 over their sum
    z = 1 + math.e + math.e ** 2
    assert soft_labels([[0.0, 1.0, 2.0]]).numpy()[0] == pytest.approx([1 / z, math.e / z, math.e ** 2 / z], abs=1e-6)
    # a temperature T divides the radii: T = 0.5 doubles them
    assert soft_labels([[0.0, math.log(3.0) / 2]], temperature=0.5).numpy()[0] == pytest.approx([0.25, 0.75], abs=1e-6)
    with pytest.raises(ValueError):
        soft_labels([[0.0, 1.0]], temperature=0.0)


def test_class_weights_are_inverse_best_expert_shares():
    per_image, per_expert = class_weights([0, 0, 0, 1], 3)
    assert per_expert.tolist() == pytest.approx([4 / 3, 4.0, 0.0])  # q = (3/4, 1/4, 0); never-best -> 0
    assert per_image.tolist() == pytest.approx([4 / 3, 4 / 3, 4 / 3, 4.0])
    # every best-expert class then carries the same total weight
    assert per_image[:3].sum() == pytest.approx(per_image[3:].sum())
    with pytest.raises(ValueError):
        class_weights([0, 3], 3)


# --- the consistency loss on hand-checked 2x2 / 2x3 inputs ---


def _logits(*rows):
    """[M, 1, K] logits whose softmax is exactly the given probability rows."""
    return torch.log(torch.tensor(rows, dtype=torch.float64)).unsqueeze(1)


def test_consistency_terms_2x2_by_hand():
    # copies p1 = (0.5, 0.5), p2 = (0.9, 0.1): pbar = (0.7, 0.3)
    # KL(pbar||p1) = 0.7 ln(0.7/0.5) + 0.3 ln(0.3/0.5) = 0.235531 - 0.153248 = 0.082283
    # KL(pbar||p2) = 0.7 ln(0.7/0.9) + 0.3 ln(0.3/0.1) = -0.175919 + 0.329584 = 0.153665
    # mean = 0.117974;  H(pbar) = -(0.7 ln 0.7 + 0.3 ln 0.3) = 0.249672 + 0.361192 = 0.610864
    kl, entropy = consistency_terms(_logits([0.5, 0.5], [0.9, 0.1]))
    assert kl.item() == pytest.approx(0.117974, abs=1e-5)
    assert entropy.item() == pytest.approx(0.610864, abs=1e-5)
    # the other direction, mean KL(p_m || pbar) = (0.087177 + 0.116320) / 2 = 0.101749, is NOT what we compute
    assert abs(kl.item() - 0.101749) > 0.01
    # lambda * KL + eta * H
    assert consistency_loss(_logits([0.5, 0.5], [0.9, 0.1]), lam=40, eta=0.5).item() == pytest.approx(
        40 * 0.117974 + 0.5 * 0.610864, abs=1e-3)
    assert consistency_loss(_logits([0.5, 0.5], [0.9, 0.1]), lam=0, eta=1).item() == pytest.approx(0.610864, abs=1e-5)


def test_consistency_terms_2x3_by_hand():
    p1, p2 = [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]
    pbar = [(a + b) / 2 for a, b in zip(p1, p2)]  # (0.3, 0.35, 0.35)
    kl_expected = (sum(m * math.log(m / a) for m, a in zip(pbar, p1))
                   + sum(m * math.log(m / b) for m, b in zip(pbar, p2))) / 2
    h_expected = -sum(m * math.log(m) for m in pbar)
    kl, entropy = consistency_terms(_logits(p1, p2))
    assert kl.item() == pytest.approx(kl_expected, abs=1e-6)
    assert entropy.item() == pytest.approx(h_expected, abs=1e-6)
    assert h_expected == pytest.approx(1.0961, abs=1e-4)  # close to ln 3: pbar is nearly uniform
    # identical copies: no inconsistency, entropy of the common prediction
    kl0, h0 = consistency_terms(_logits(p1, p1))
    assert kl0.item() == pytest.approx(0.0, abs=1e-7)
    assert h0.item() == pytest.approx(-sum(p * math.log(p) for p in p1), abs=1e-6)


def test_router_loss_combines_weights_ce_kl_entropy():
    # two images, two copies, two experts
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.8, 0.2]],
                                     [[0.9, 0.1], [0.8, 0.2]]], dtype=torch.float64))  # [M=2, B=2, K=2]
    targets = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([2.0, 0.5], dtype=torch.float64)
    loss, parts = router_loss(logits, targets, weights, lam=40.0, eta=0.5)
    # image 0: CE = mean(-(0.25 ln .5 + .75 ln .5), -(0.25 ln .9 + .75 ln .1)) = mean(0.693147, 1.753279) = 1.223213
    #          KL/H from the 2x2 example above: 0.117974, 0.610864
    # image 1: CE = mean(-ln .8, -ln .8) = 0.223144; copies identical -> KL 0; H(.8,.2) = 0.500402
    img0 = 2.0 * (1.223213 + 40 * 0.117974 + 0.5 * 0.610864)
    img1 = 0.5 * (0.223144 + 0.0 + 0.5 * 0.500402)
    assert loss.item() == pytest.approx((img0 + img1) / 2, abs=1e-3)
    assert parts["ce"] == pytest.approx((1.223213 + 0.223144) / 2, abs=1e-5)
    assert parts["kl"] == pytest.approx(0.117974 / 2, abs=1e-5)
    ce = soft_cross_entropy(logits, targets)
    assert ce.tolist() == pytest.approx([1.223213, 0.223144], abs=1e-5)
    with pytest.raises(ValueError):
        router_loss(logits[0], targets, weights)


def test_lr_is_halved_at_one_and_two_thirds():
    assert lr_milestones(90) == [30, 60]
    assert lr_milestones(3) == [1, 2]
    assert lr_milestones(1) == []


# --- diagnostics ---


def test_routing_diagnostics_by_hand():
    radii = np.array([[0.5, 0.2], [0.1, 0.3], [0.0, 0.0], [0.4, 0.4]])
    report = routing_diagnostics(radii, [0, 0, 1, 1])
    # routable: rows 0, 1, 3; dR = (0, 0.2, 0); row 3 is a tie, so choosing 1 attains R*
    assert report["routable"] == 3
    assert report["routing_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["argmax_agreement"] == pytest.approx(1 / 3, abs=1e-4)
    assert report["delta_r_mean"] == pytest.approx(0.2 / 3, abs=1e-4)
    assert report["delta_r_ecdf"]["0"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["mean_routed_radius"] == pytest.approx((0.5 + 0.1 + 0.4) / 3, abs=1e-4)
    assert routing_diagnostics(radii, [-1, 1, 1, 1])["router_abstained"] == 1


def test_bottleneck_report_from_results_tsv(tmp_path):
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime\texpert\tsigma\tradius_router\tradius_expert\t" \
             "p_router_lower\tp_expert_lower\tn_router\tn_expert"
    rows = [
        "0\t1\t1\t0.3\t1\t0.1\t0:a\t0.25\t0.3\t0.5\t0.7\t0.9\t10\t10",   # router bottleneck
        "1\t1\t1\t0.4\t1\t0.1\t0:a\t0.25\t0.9\t0.4\t0.9\t0.9\t10\t10",   # expert bottleneck
        "2\t2\t-1\t0.0\t0\t0.1\t-1:-\t-\t0.000000\t-\t0.4\t-\t5\t-",     # router abstained
        "3\t2\t-1\t0.0\t0\t0.1\t1:b\t0.5\t0.8\t0.000000\t0.9\t0.3\t10\t3",  # expert abstained
        "4\t0\t2\t0.2\t0\t0.1\t1:b\t0.5\t0.1\t0.2\t0.6\t0.9\t10\t10",   # wrong class, router bottleneck
    ]
    path = tmp_path / "r.tsv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    report = bottleneck_report(str(path))
    assert report["both_certified"] == 3
    assert report["router_abstained"] == 1 and report["expert_abstained"] == 1
    assert report["router_bottleneck_share"] == pytest.approx(2 / 3, abs=1e-4)
    # a set row that holds every expert has R_sigma = inf: quantiles stay numbers (no nan from inf - inf)
    sets = tmp_path / "sets.tsv"
    sets.write_text(header + "\n" + "\n".join(rows) + "\n" + "\n".join(
        f"{5 + i}\t1\t1\t0.5\t1\t0.1\t0:a\t0.25\tinf\t0.5\t1.0\t0.9\t10\t10" for i in range(7)) + "\n")
    report = bottleneck_report(str(sets))
    q = report["delta_r_sigma_quantiles"]
    assert report["both_certified"] == 10 and not any(np.isnan(v) for v in q.values())
    assert q["q10"] == pytest.approx(-0.2) and q["q50"] == np.inf and "inf" in format_report({"bottleneck": report})
    plain = tmp_path / "plain.tsv"
    plain.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.1\n")
    with pytest.raises(DataError, match="radius_router"):
        bottleneck_report(str(plain))


# --- the trainer end to end on tiny linear experts ---


@pytest.fixture
def tiny_labels(tmp_path):
    """Two linear experts (sigma 0.25, 0.5) on 1x4x4 inputs, 40 images (3 with wrong labels), and labels."""
    rng = np.random.default_rng(5)
    weight = (rng.normal(size=(3, 16)) * 3).astype(np.float32)
    experts = [write_linear_folder(tmp_path / "zoo" / f"e{s}", weight=weight, bias=np.zeros(3, np.float32), sigma=s,
                                   input_shape=(1, 4, 4)) for s in (0.25, 0.5)]
    x = rng.uniform(size=(40, 1, 4, 4)).astype(np.float32)
    y = np.argmax(x.reshape(40, -1) @ weight.T, axis=1).astype(np.int64)
    y[:3] = (y[:3] + 1) % 3
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    folders = [load_folder(str(e)) for e in experts]
    ds = load_dataset(f"npz:{data}", split="train")
    labels = tmp_path / "labels.npz"
    compute_labels(folders, ds, np.arange(40), out=labels, n0=10, n=50, seed=0)
    holdout = tmp_path / "holdout.npz"
    compute_labels(folders, ds, np.arange(20, 40), out=holdout, n0=10, n=50, seed=9)
    return experts, labels, holdout, tmp_path


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_train_router_writes_a_loadable_portable_router_folder(tiny_labels):
    experts, labels, holdout, tmp = tiny_labels
    out = tmp / "routers" / "r1"
    path = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(out), arch="linear",
                        epochs=3, batch=16, holdout=str(holdout), report_n=20, log=None)
    config = json.loads((path / "config.json").read_text())
    assert config["kind"] == "router" and config["sigma"] == 0.5  # default sigma_e = largest expert sigma
    assert config["experts"] == ["../../zoo/e0.25", "../../zoo/e0.5"]  # relative to the router folder
    record = config["training"]
    n_routable = int(routable(load_labels(labels).radii).sum())
    assert n_routable < 40  # the wrong-label images are all-zero rows ...
    assert record["train_images"] == n_routable  # ... and were dropped
    assert record["epochs"] == 3 and len(record["history"]) == 3 and "loss" in record["final"]
    assert record["holdout_report"]["images"] == 20
    assert not (path / "checkpoint.pt").exists()
    router, folders = load_router_set(str(path))
    assert [f.path for f in folders] == [load_folder(str(e)).path for e in experts]
    # move router and experts together: the relative references still resolve
    moved = tmp / "moved"
    shutil.copytree(tmp / "zoo", moved / "zoo")
    shutil.copytree(tmp / "routers", moved / "routers")
    router2, folders2 = load_router_set(str(moved / "routers" / "r1"))
    assert folders2[0].path == (moved / "zoo" / "e0.25").resolve()
    assert router2.files == router.files


def test_train_router_is_deterministic_and_resumes_to_the_same_weights(tiny_labels):
    experts, labels, _, tmp = tiny_labels
    common = dict(labels=str(labels), experts=[str(e) for e in experts], arch="small_cnn",
                  arch_args={"channels": [4], "hidden": 8}, epochs=4, batch=16, seed=3)
    a = train_router(out=str(tmp / "a"), log=None, **common)
    b = train_router(out=str(tmp / "b"), log=None, **common)
    wa, wb = _weights(a), _weights(b)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)

    class Killed(Exception):
        pass

    def die_at_epoch_3(message):
        if message.startswith("epoch 3/"):
            raise Killed

    with pytest.raises(Killed):
        train_router(out=str(tmp / "c"), log=die_at_epoch_3, **common)
    assert (tmp / "c" / "checkpoint.pt").is_file() and not (tmp / "c" / "config.json").exists()
    messages = []
    c = train_router(out=str(tmp / "c"), log=messages.append, **common)
    assert any("resuming" in m and "epoch 2" in m for m in messages)
    wc = _weights(c)
    assert all(np.array_equal(wa[k], wc[k]) for k in wa)
    other = train_router(out=str(tmp / "d"), log=None, **{**common, "seed": 4})
    assert not all(np.array_equal(wa[k], _weights(other)[k]) for k in wa)


def test_train_router_bf16_is_recorded_deterministic_and_close_to_fp32(tiny_labels):
    experts, labels, _, tmp = tiny_labels
    common = dict(labels=str(labels), experts=[str(e) for e in experts], arch="small_cnn",
                  arch_args={"channels": [4], "hidden": 8}, epochs=2, batch=16, seed=3, log=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 on CPUs without avx512_bf16: slow, still correct
        a = train_router(out=str(tmp / "bf-a"), precision="bf16", **common)
        b = train_router(out=str(tmp / "bf-b"), precision="bf16", **common)
    full = train_router(out=str(tmp / "fp"), **common)
    record = json.loads((a / "config.json").read_text())["training"]
    assert record["precision"] == "bf16"
    assert "precision" not in json.loads((full / "config.json").read_text())["training"]
    wa, wb, wf = _weights(a), _weights(b), _weights(full)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not all(np.array_equal(wa[k], wf[k]) for k in wa)  # autocast really ran
    assert all(wa[k].dtype == wf[k].dtype for k in wa)  # fp32 master weights are what is saved
    assert max(float(np.abs(wa[k] - wf[k]).max()) for k in wa) < 0.05
    with pytest.raises(DataError, match="precision must be fp32 or bf16"):
        train_router(out=str(tmp / "fp16"), precision="fp16", **common)


def test_train_router_checks_experts_and_labels(tiny_labels):
    experts, labels, _, tmp = tiny_labels
    with pytest.raises(IncompatibleModelsError, match="not the smoothed classifier"):
        train_router(labels=str(labels), experts=[str(experts[1]), str(experts[0])], out=str(tmp / "x"), log=None)
    with pytest.raises(IncompatibleModelsError, match="2 experts"):
        train_router(labels=str(labels), experts=[str(experts[0])], out=str(tmp / "x"), log=None)
    with pytest.warns(UserWarning, match="sigma_e = 0.25 is below the largest expert sigma"):
        train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "y"), arch="linear",
                     epochs=1, sigma_e=0.25, log=None)


def test_train_router_records_temperature_and_unbalanced_weights(tiny_labels):
    experts, labels, _, tmp = tiny_labels
    path = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "u"), arch="linear",
                        epochs=1, temperature=0.1, balance=False, log=None)
    record = json.loads((path / "config.json").read_text())["training"]
    assert record["temperature"] == 0.1 and record["class_balance"] is False
    assert set(record["class_weights"].values()) == {1.0}
    balanced = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "v"), arch="linear",
                            epochs=1, log=None)
    weights = json.loads((balanced / "config.json").read_text())["training"]["class_weights"]
    best = np.argmax(load_labels(labels).radii[routable(load_labels(labels).radii)], axis=1)
    share = np.bincount(best, minlength=2) / len(best)
    assert list(weights.values()) == pytest.approx([1 / q if q else 0.0 for q in share], abs=1e-3)


def test_regret_weights_by_hand():
    from dualrs_route.router.training import regret_weights

    radii = np.array([[0.8, 1.6, 3.2], [0.5, 0.5, 0.5], [0.0, 0.2, 0.0]])  # spreads 2.4, 0, 0.2: mean 2.6 / 3
    assert regret_weights(radii).tolist() == pytest.approx([2.4 * 3 / 2.6, 0.0, 0.2 * 3 / 2.6])
    with pytest.raises(ValueError, match="differ"):
        regret_weights(np.ones((3, 2)))


def test_train_router_regret_weights_change_training_and_are_recorded(tiny_labels, monkeypatch):
    import dualrs_route.router.training as training

    experts, labels, _, tmp = tiny_labels
    seen = []
    real = training.router_loss
    monkeypatch.setattr(training, "router_loss", lambda logits, targets, weights, *args: (
        seen.append(weights.detach().clone()), real(logits, targets, weights, *args))[1])
    plain = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "p"), arch="linear",
                         epochs=1, batch=10_000, augment=False, log=None)
    weighted = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "r"), arch="linear",
                            epochs=1, batch=10_000, augment=False, regret=True, log=None)
    assert json.loads((weighted / "config.json").read_text())["training"]["regret_weights"] is True
    assert "regret_weights" not in json.loads((plain / "config.json").read_text())["training"]
    radii = load_labels(labels).radii[routable(load_labels(labels).radii)]
    ratio = (seen[-1] / seen[0]).numpy()  # one batch of every image, the same order (same seed)
    spread = radii.max(1) - radii.min(1)
    assert sorted(ratio.tolist()) == pytest.approx(sorted((spread / spread.mean()).tolist()), rel=1e-5)


def test_train_router_refuses_all_zero_labels(tiny_labels):
    experts, labels, _, tmp = tiny_labels
    data = dict(np.load(labels, allow_pickle=False))
    data["radii"] = np.zeros_like(data["radii"])
    zero = tmp / "zero.npz"
    np.savez(zero, **data)
    with pytest.raises(DataError, match="radius 0 for every expert"):
        train_router(labels=str(zero), experts=[str(e) for e in experts], out=str(tmp / "z"), log=None)


def test_train_router_and_report_cli(tiny_labels):
    from dualrs_route.cli import main

    experts, labels, holdout, tmp = tiny_labels
    out = tmp / "cli-router"
    args = ["train-router", "--labels", str(labels), "--expert", str(experts[0]), "--expert", str(experts[1]),
            "--arch", "linear", "--epochs", "2", "--batch", "16", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_router_set(str(out))
    assert json.loads((out / "config.json").read_text())["training"]["command"].startswith("dualrs-route")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "--force" in again.output
    bad = CliRunner().invoke(main, args[:-3] + ["--lr", "-1", "--out", str(tmp / "bad")])
    assert bad.exit_code == 2
    bad_json = CliRunner().invoke(main, args[:-3] + ["--arch-args", "{x", "--out", str(tmp / "bad")])
    assert bad_json.exit_code == 2 and "JSON" in bad_json.output
    report = CliRunner().invoke(main, ["router-report", "--router", str(out), "--holdout", str(holdout), "--N", "20",
                                       "--format", "json"])
    assert report.exit_code == 0, report.output
    parsed = json.loads(report.output)
    assert parsed["routing"]["images"] == 20 and 0.0 <= parsed["routing"]["routing_accuracy"] <= 1.0
    none = CliRunner().invoke(main, ["router-report"])
    assert none.exit_code == 2


# --- several labels files, and starting from an expert's weights ---


def test_merged_label_files_equal_one_file_of_the_same_images(tiny_labels):
    from dualrs_route.router.labels import merge_labels

    experts, labels, _, tmp = tiny_labels
    folders = [load_folder(str(e)) for e in experts]
    ds = load_dataset(f"npz:{tmp / 'data.npz'}", split="train")
    # noise is keyed by image index, so labelling 0..39 in two files gives the same radii as one file
    compute_labels(folders, ds, np.arange(25, 40), out=tmp / "b.npz", n0=10, n=50, seed=0)
    compute_labels(folders, ds, np.arange(0, 25), out=tmp / "a.npz", n0=10, n=50, seed=0)
    whole = load_labels(labels)
    merged = merge_labels([load_labels(tmp / "b.npz"), load_labels(tmp / "a.npz")], ["b.npz", "a.npz"])
    assert np.array_equal(merged.indices, whole.indices)
    for name in ("labels", "radii", "predictions", "p_lower"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    assert merged.complete and [m["images"] for m in merged.meta["merged_from"]] == [15, 25]
    with pytest.raises(DataError, match="overlap"):
        merge_labels([load_labels(labels), load_labels(tmp / "a.npz")], ["whole", "a"])
    compute_labels(folders, ds, np.arange(0, 25), out=tmp / "a200.npz", n0=10, n=200, seed=0)
    with pytest.raises(DataError, match="N: 50 vs 200"):
        merge_labels([load_labels(tmp / "b.npz"), load_labels(tmp / "a200.npz")], ["b", "a200"])
    other = write_linear_folder(tmp / "zoo" / "other", weight=np.ones((3, 16), np.float32), bias=np.zeros(3),
                                sigma=0.25, input_shape=(1, 4, 4))
    compute_labels([load_folder(str(other)), folders[1]], ds, np.arange(0, 25), out=tmp / "ao.npz", n0=10, n=50)
    with pytest.raises(IncompatibleModelsError, match="other experts"):
        merge_labels([load_labels(tmp / "b.npz"), load_labels(tmp / "ao.npz")], ["b", "ao"])
    # training on the two files is training on the one file
    common = dict(experts=[str(e) for e in experts], arch="linear", epochs=2, batch=16, seed=1, log=None)
    one = train_router(labels=str(labels), out=str(tmp / "one"), **common)
    two = train_router(labels=[str(tmp / "a.npz"), str(tmp / "b.npz")], out=str(tmp / "two"), **common)
    w1, w2 = _weights(one), _weights(two)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    record = json.loads((two / "config.json").read_text())["training"]
    assert record["labels"]["file"] == [str(tmp / "a.npz"), str(tmp / "b.npz")] and record["train_images"] == int(routable(load_labels(labels).radii).sum())


def _small_cnn_expert(path, channels, sigma=0.5, seed=0):
    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.folders import ModelConfig, save_folder

    torch.manual_seed(seed)
    args = {"channels": channels, "hidden": 8}
    model = build_model("small_cnn", num_classes=3, input_shape=(1, 4, 4), mean=[0.0], std=[1.0], **args)
    config = ModelConfig(kind="expert", sigma=sigma, num_classes=3, input_shape=(1, 4, 4), mean=(0.0,), std=(1.0,),
                         architecture="small_cnn", architecture_args=args)
    return save_folder(path, config, model)


def test_train_router_init_copies_every_layer_but_the_last(tiny_labels):
    experts, labels, _, tmp = tiny_labels
    source = _small_cnn_expert(tmp / "cnn-expert", [4])
    messages = []
    # one epoch at a tiny learning rate: the copied layers stay close to the source, the new head does not
    path = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "init"),
                        init=str(source), epochs=1, batch=64, lr=1e-9, weight_decay=0.0, log=messages.append)
    config = json.loads((path / "config.json").read_text())
    assert config["architecture"] == "small_cnn" and config["architecture_args"]["channels"] == [4]
    assert config["training"]["init"]["reference"] == str(source)
    src, got = _weights(source), _weights(path)
    head = [k for k in got if got[k].shape != src[k].shape]
    assert len(head) == 2 and all(got[k].shape[0] == 2 for k in head)  # K = 2 router classes
    logged = [m.split("new (random) tensors: ")[1] for m in messages if "new (random) tensors: " in m]
    assert len(logged) == 1 and set(logged[0].split(", ")) == set(head)
    for k in got:  # parameters; batch-norm running statistics move with the training forward passes
        if k not in head and k.endswith(("weight", "bias")):
            assert np.allclose(got[k], src[k], atol=1e-6), k
    fresh = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "noinit"),
                         arch="small_cnn", arch_args={"channels": [4], "hidden": 8}, epochs=1, batch=64, lr=1e-9,
                         weight_decay=0.0, log=None)
    first = next(k for k in src if k not in head)
    assert not np.allclose(_weights(fresh)[first], src[first])  # without --init the weights are random
    with pytest.raises(IncompatibleModelsError, match="does not match the router"):
        train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "bad"), init=str(source),
                     arch="small_cnn", arch_args={"channels": [6], "hidden": 8}, epochs=1, log=None)


def test_confidence_head_router_starts_from_the_whole_expert(tiny_labels):
    """--arch confidence_head: the expert becomes base.* (fc included), only head.* is new."""
    from dualrs_route.experts.architectures import build_model

    experts, labels, _, tmp = tiny_labels
    source = _small_cnn_expert(tmp / "cnn-expert", [4])
    args = {"base": "small_cnn", "base_args": {"channels": [4], "hidden": 8}, "base_classes": 3, "hidden": 5}
    messages = []
    path = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "conf"),
                        init=str(source), arch="confidence_head", arch_args=args, epochs=1, batch=64, lr=1e-9,
                        weight_decay=0.0, log=messages.append)
    src, got = _weights(source), _weights(path)
    assert sorted(k for k in got if ".head." in k) == ["1.head.0.bias", "1.head.0.weight", "1.head.2.bias",
                                                      "1.head.2.weight"]
    for k in src:
        if k.endswith(("weight", "bias")):
            assert np.allclose(got[k.replace("1.", "1.base.", 1)], src[k], atol=1e-6), k
    logged = [m.split("new (random) tensors: ")[1] for m in messages if "new (random) tensors: " in m]
    assert set(logged[0].split(", ")) == {k for k in got if ".head." in k}
    # the head sees sorted probabilities: permuting the base's classes does not change the router
    model = build_model("confidence_head", num_classes=2, input_shape=(1, 4, 4), mean=[0.0], std=[1.0], **args)
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        model.eval()
        before = model(x)
        last = model[1].base[-1]
        perm = torch.tensor([2, 0, 1])
        last.weight.copy_(last.weight[perm])
        last.bias.copy_(last.bias[perm])
        assert torch.allclose(model(x), before, atol=1e-6)


def test_train_router_on_a_missing_gpu_fails_before_writing(tiny_labels):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from dualrs_route.experts.errors import EngineUnavailableError

    experts, labels, _, tmp = tiny_labels
    with pytest.raises(EngineUnavailableError, match="no CUDA GPU"):
        train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "gpu"), arch="linear",
                     epochs=1, device="cuda", log=None)
    assert not (tmp / "gpu").exists()


@pytest.mark.gpu
def test_train_router_on_gpu_is_deterministic_and_records_the_device(tiny_labels):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    experts, labels, holdout, tmp = tiny_labels
    common = dict(labels=str(labels), experts=[str(e) for e in experts], arch="small_cnn",
                  arch_args={"channels": [4], "hidden": 8}, epochs=2, batch=16, seed=3, device="cuda",
                  holdout=str(holdout), report_n=20, log=None)
    a = train_router(out=str(tmp / "ga"), **common)
    b = train_router(out=str(tmp / "gb"), **common)
    wa, wb = _weights(a), _weights(b)
    assert all(np.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    record = json.loads((a / "config.json").read_text())["training"]
    assert record["device_type"] == "cuda" and record["holdout_report"]["images"] == 20


def test_a_small_sigma_e_warns_with_the_cap_it_puts_on_the_radius_not_a_rule(tiny_labels):
    # sigma_e >= max sigma_k is the paper's heuristic: the warning must state the cap, not a rule
    experts, labels, _, tmp = tiny_labels
    with pytest.warns(UserWarning) as caught:
        path = train_router(labels=str(labels), experts=[str(e) for e in experts], out=str(tmp / "small"),
                            arch="linear", sigma_e=0.25, epochs=1, batch=16, log=None)
    text = " ".join(str(w.message) for w in caught)
    assert "stays valid" in text and "3.2 * sigma_e = 0.80" in text and "asks for" not in text
    assert json.loads((path / "config.json").read_text())["sigma"] == 0.25
    from dualrs_route.router.dual import sigma_e_note

    assert sigma_e_note(0.5, 0.5) is None and sigma_e_note(1.0, 0.5) is None
    # the exact cap behind "about 3.2": every one of N = 10,000 router samples agreeing, beta = 0.0005
    from scipy.stats import norm

    from dualrs_route.experts.stats import lower_confidence_bound

    assert norm.ppf(lower_confidence_bound(10_000, 10_000, 0.0005)) == pytest.approx(3.17, abs=0.01)
    assert norm.ppf(lower_confidence_bound(100_000, 100_000, 0.0005)) == pytest.approx(3.78, abs=0.01)
