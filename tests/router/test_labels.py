"""Router labels (issue 4): the label rule, the file format, determinism and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from dualrs_route.experts.data import load_dataset
from dualrs_route.experts.errors import DataError, IncompatibleModelsError, ResumeMismatchError
from dualrs_route.experts.folders import load_folder
from dualrs_route.export.engines import make_counter
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.stats import ABSTAIN
from dualrs_route.router.labels import (best_expert, compute_labels, label_radii_from_counts, load_labels, routable,
                           select_label_indices)
from rs_oracle import write_linear_folder

ALPHA = 0.001


# --- the label rule on hand-made counts ---


def test_label_rule_all_votes_for_true_class_gives_max_radius():
    preds, radii, p_lower = label_radii_from_counts([[0, 10, 0]], [[0, 100, 0]], [1], sigma=0.5, alpha=ALPHA)
    assert preds.tolist() == [1]
    assert p_lower[0] == pytest.approx(ALPHA ** (1 / 100))
    # 1.50 sigma is the largest radius reachable with N = 100 at alpha = 0.001
    assert radii[0] == pytest.approx(0.5 * norm.ppf(ALPHA ** (1 / 100)), rel=1e-6)
    assert radii[0] == pytest.approx(0.75, abs=0.01)
    assert radii.dtype == np.float32


def test_label_rule_wrong_class_gets_zero_radius_but_keeps_prediction():
    preds, radii, _ = label_radii_from_counts([[0, 10, 0]], [[0, 100, 0]], [2], sigma=0.5, alpha=ALPHA)
    assert preds.tolist() == [1]  # it certified class 1 ...
    assert radii.tolist() == [0.0]  # ... which is not the label


def test_label_rule_abstain_gets_zero_radius():
    preds, radii, p_lower = label_radii_from_counts([[1, 9]], [[40, 60]], [1], sigma=1.0, alpha=ALPHA)
    assert preds.tolist() == [ABSTAIN]
    assert radii.tolist() == [0.0]
    assert p_lower[0] == pytest.approx(beta_dist.ppf(ALPHA, 60, 41))
    assert p_lower[0] < 0.5


def test_label_rule_guess_comes_from_the_selection_draw_only():
    # selection says class 0; the estimation draw is all class 1 -> n_A = count of class 0 = 0 -> abstain
    preds, radii, _ = label_radii_from_counts([[6, 4]], [[0, 100]], [1], sigma=1.0, alpha=ALPHA)
    assert preds.tolist() == [ABSTAIN] and radii.tolist() == [0.0]


def test_label_rule_intermediate_count_matches_clopper_pearson():
    preds, radii, p_lower = label_radii_from_counts([[0, 7, 3]], [[2, 90, 8]], [1], sigma=0.25, alpha=ALPHA)
    expected_p = beta_dist.ppf(ALPHA, 90, 11)
    assert p_lower[0] == pytest.approx(expected_p)
    assert radii[0] == pytest.approx(0.25 * norm.ppf(expected_p), rel=1e-5)


def test_best_expert_and_routable():
    radii = np.array([[0.1, 0.3, 0.2], [0.4, 0.4, 0.0], [0.0, 0.0, 0.0]], np.float32)
    assert best_expert(radii).tolist() == [1, 0, 0]  # tie -> lowest index
    assert routable(radii).tolist() == [True, True, False]


def test_select_label_indices():
    assert select_label_indices(10).tolist() == list(range(10))
    assert select_label_indices(10, max_images=3).tolist() == [0, 1, 2]
    sub = select_label_indices(100, fraction=0.2, seed=3)
    assert len(sub) == 20 and np.all(np.diff(sub) > 0)
    assert np.array_equal(sub, select_label_indices(100, fraction=0.2, seed=3))
    assert not np.array_equal(sub, select_label_indices(100, fraction=0.2, seed=4))
    assert select_label_indices(10, max_images=3, start=8).tolist() == [8, 9]
    assert select_label_indices(10, start=7).tolist() == [7, 8, 9]
    shifted = select_label_indices(100, fraction=0.5, seed=0, start=60)
    assert len(shifted) == 20 and shifted.min() >= 60
    with pytest.raises(ValueError):
        select_label_indices(10, max_images=3, fraction=0.5)
    with pytest.raises(DataError):
        select_label_indices(10, start=10)


# --- end to end on tiny linear experts ---


@pytest.fixture
def tiny(tmp_path):
    """Two 3-class linear experts (same weights, sigma 0.25 and 0.5) on 1x4x4 inputs and 30 images.

    Images 0 and 1 carry a wrong label, so every expert gets radius 0 there.
    """
    rng = np.random.default_rng(11)
    weight = rng.normal(size=(3, 16)).astype(np.float32) * 3
    bias = np.zeros(3, np.float32)
    experts = [write_linear_folder(tmp_path / f"e{s}", weight=weight, bias=bias, sigma=s, input_shape=(1, 4, 4))
               for s in (0.25, 0.5)]
    x = rng.uniform(size=(30, 1, 4, 4)).astype(np.float32)
    y = np.argmax(x.reshape(30, -1) @ weight.T, axis=1).astype(np.int64)
    y[:2] = (y[:2] + 1) % 3
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    return experts, data


def _run(experts, data, out, **kwargs):
    folders = [load_folder(str(e), expected_kind="expert") for e in experts]
    ds = load_dataset(f"npz:{data}", split="train")
    indices = kwargs.pop("indices", np.arange(len(ds)))
    return compute_labels(folders, ds, indices, out=out, **kwargs)


def test_labels_match_single_image_certification(tiny, tmp_path):
    experts, data = tiny
    result = _run(experts, data, tmp_path / "l.npz", n0=10, n=100, seed=3, chunk=7, batch=64)
    assert result.complete and result.radii.shape == (30, 2) and result.predictions.shape == (30, 2)
    ds = load_dataset(f"npz:{data}", split="train")
    for k, ref in enumerate(experts):
        folder = load_folder(str(ref))
        counter = make_counter(folder, batch_size=37)  # another batch size, one image at a time
        for i in (0, 5, 17, 29):
            sel = counter.counts(ds.image(i), folder.config.sigma, 10, key=NoiseKey(3, i, Stage.LABEL_SELECT))
            est = counter.counts(ds.image(i), folder.config.sigma, 100, key=NoiseKey(3, i, Stage.LABEL_ESTIMATE))
            pred, radius, _ = label_radii_from_counts(sel[None], est[None], [ds.labels[i]], sigma=folder.config.sigma,
                                                      alpha=ALPHA)
            assert result.predictions[i, k] == pred[0]
            assert result.radii[i, k] == radius[0]
    # the wrong-label images have radius 0 everywhere; a correct prediction never has radius 0 unless abstaining
    assert np.all(result.radii[:2] == 0)
    assert routable(result.radii)[2:].sum() > 20
    wrong = result.predictions != result.labels[:, None]
    assert np.all(result.radii[wrong] == 0)


def test_labels_file_roundtrip_and_keys(tiny, tmp_path):
    experts, data = tiny
    out = tmp_path / "l.npz"
    _run(experts, data, out, n0=10, n=50, chunk=8)
    with np.load(out, allow_pickle=False) as archive:
        assert {"indices", "labels", "radii", "predictions", "p_lower", "experts", "references", "sha256", "sigmas",
                "meta"} <= set(archive.files)
        assert archive["radii"].dtype == np.float32 and archive["predictions"].dtype == np.int64
    loaded = load_labels(out, require_complete=True)
    assert loaded.sigmas.tolist() == [0.25, 0.5]
    assert loaded.meta["settings"]["N"] == 50 and loaded.meta["done"] == 30
    assert not list(tmp_path.glob("*.tmp"))


def test_labels_resume_after_kill_equals_uninterrupted(tiny, tmp_path):
    experts, data = tiny
    full = _run(experts, data, tmp_path / "full.npz", n0=10, n=100, seed=1, chunk=5)

    class Killed(Exception):
        pass

    calls = []

    def die_after_two(k):
        calls.append(k)
        if len(calls) == 2:
            raise Killed

    part = tmp_path / "part.npz"
    with pytest.raises(Killed):
        _run(experts, data, part, n0=10, n=100, seed=1, chunk=3, progress=die_after_two)
    partial = load_labels(part)
    assert not partial.complete and len(partial.indices) == 6
    with pytest.raises(DataError, match="incomplete"):
        load_labels(part, require_complete=True)
    resumed = _run(experts, data, part, n0=10, n=100, seed=1, chunk=4, batch=77)  # other chunk/batch: same result
    assert resumed.complete
    for key in ("indices", "labels", "radii", "predictions", "p_lower"):
        assert np.array_equal(getattr(resumed, key), getattr(full, key)), key
    # a finished file is returned as is
    again = _run(experts, data, part, n0=10, n=100, seed=1, chunk=4)
    assert np.array_equal(again.radii, full.radii)


def test_labels_depend_on_seed_and_refuse_other_settings(tiny, tmp_path):
    experts, data = tiny
    a = _run(experts, data, tmp_path / "a.npz", n0=10, n=100, seed=1)
    b = _run(experts, data, tmp_path / "b.npz", n0=10, n=100, seed=2)
    assert not np.array_equal(a.p_lower, b.p_lower)
    with pytest.raises(ResumeMismatchError, match="alpha"):
        _run(experts, data, tmp_path / "a.npz", n0=10, n=100, seed=1, alpha=0.01)


def test_labels_need_two_experts(tiny, tmp_path):
    experts, data = tiny
    with pytest.raises(IncompatibleModelsError, match="at least two"):
        _run(experts[:1], data, tmp_path / "l.npz")


def test_labels_cli(tiny, tmp_path):
    from dualrs_route.cli import main

    experts, data = tiny
    out = tmp_path / "cli.npz"
    args = ["labels", "--expert", str(experts[0]), "--expert", str(experts[1]), "--dataset", f"npz:{data}",
            "--N", "50", "--max", "12", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    loaded = load_labels(out, require_complete=True)
    assert loaded.indices.tolist() == list(range(12))
    assert loaded.meta["settings"]["selection"] == {"max": 12, "fraction": None, "start": 0}
    bad = CliRunner().invoke(main, ["labels", "--expert", str(experts[0]), "--dataset", f"npz:{data}",
                                    "--out", str(tmp_path / "x.npz")])
    assert bad.exit_code == 2 and "two experts" in bad.output
    both = CliRunner().invoke(main, args[:-3] + ["--fraction", "0.5", "--out", str(tmp_path / "y.npz")])
    assert both.exit_code == 2 and "not both" in both.output
    mismatch = CliRunner().invoke(main, args + ["--N0", "20"])
    assert mismatch.exit_code == 1 and "other settings" in mismatch.output
    assert math.isfinite(float(loaded.radii.max()))


def test_labels_cli_compile_is_a_setting(tiny, tmp_path, monkeypatch):
    """`labels --compile` builds compiled torch counters and records it; resuming without it is refused."""
    from dualrs_route.experts import engine
    from dualrs_route.cli import main

    built = []

    def fake_compile(model, dtype, channels_last):  # torch.compile itself: see the slow engine test
        built.append(dtype)
        return lambda batch: model(batch.to(dtype))

    monkeypatch.setattr(engine, "_compile_model", fake_compile)
    experts, data = tiny
    out, plain = tmp_path / "c.npz", tmp_path / "p.npz"
    args = ["labels", "--expert", str(experts[0]), "--expert", str(experts[1]), "--dataset", f"npz:{data}",
            "--N", "50", "--max", "6", "--engine", "torch", "--quiet"]
    assert CliRunner().invoke(main, args + ["--compile", "--out", str(out)]).exit_code == 0
    assert len(built) == 2  # one compiled counter per expert
    assert CliRunner().invoke(main, args + ["--out", str(plain)]).exit_code == 0
    compiled, eager = load_labels(out), load_labels(plain)
    assert compiled.meta["settings"]["compiled"] is True and "compiled" not in eager.meta["settings"]
    np.testing.assert_array_equal(compiled.radii, eager.radii)  # the fake compile runs the same network
    again = CliRunner().invoke(main, args + ["--out", str(out)])  # same file, now without --compile
    assert again.exit_code == 1 and "other settings" in again.output
