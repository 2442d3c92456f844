"""Keyed noise, the torch engine and SmoothedClassifier: determinism and stream independence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from dualrs_route.experts import noise
from dualrs_route.experts.engine import NoisyCounter, TorchCounter, batch_segments, resolve_device
from dualrs_route.experts.errors import EngineUnavailableError
from dualrs_route.experts.noise import NoiseKey, Stage, numpy_noise
from dualrs_route.experts.smoothing import SmoothedClassifier
from rs_oracle import linear_model

SHAPE = (1, 4, 4)
RNG = np.random.default_rng(3)
W3 = RNG.normal(size=(3, 16)).astype(np.float32)
B3 = RNG.normal(scale=0.1, size=3).astype(np.float32)


def counter(batch_size=400, weight=W3, bias=B3, shape=SHAPE):
    return TorchCounter(linear_model(weight, bias, shape), num_classes=weight.shape[0], input_shape=shape,
                        batch_size=batch_size)


def torch_noise(key: NoiseKey, start: int, stop: int, shape=SHAPE) -> np.ndarray:
    import torch

    c = counter(shape=shape, weight=np.zeros((2, int(np.prod(shape))), np.float32), bias=np.zeros(2, np.float32))
    out = torch.empty((stop - start, *shape))
    c._fill_noise(out, key, start, stop)
    return out.numpy()


def test_torch_counter_is_a_noisy_counter():
    assert isinstance(counter(), NoisyCounter)


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_noise_sample_depends_only_on_key_and_position(source):
    key = NoiseKey(5, 17, Stage.EXPERT_ESTIMATE)
    get = (lambda k, a, b: numpy_noise(k, a, b, SHAPE)) if source == "numpy" else torch_noise
    whole = get(key, 0, 7 * noise.BLOCK + 3)
    for a, b in [(0, 1), (3, noise.BLOCK + 5), (noise.BLOCK, 2 * noise.BLOCK), (2 * noise.BLOCK - 1, 5 * noise.BLOCK + 2),
                 (7 * noise.BLOCK, 7 * noise.BLOCK + 3)]:
        np.testing.assert_array_equal(get(key, a, b), whole[a:b])
    np.testing.assert_array_equal(get(key, 0, 7 * noise.BLOCK + 3), whole)  # same key, same numbers


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_distinct_keys_give_independent_standard_normal_streams(source):
    get = (lambda k, a, b: numpy_noise(k, a, b, SHAPE)) if source == "numpy" else torch_noise
    n = 4 * noise.BLOCK
    base = NoiseKey(1, 2, Stage.EXPERT_SELECT)
    others = [NoiseKey(1, 2, s) for s in Stage if s != base.stage] + [NoiseKey(2, 2, base.stage),
                                                                      NoiseKey(1, 3, base.stage)]
    ref = get(base, 0, n).ravel().astype(np.float64)
    assert abs(ref.mean()) < 5 / np.sqrt(ref.size) and abs(ref.std() - 1) < 0.05
    for key in others:
        other = get(key, 0, n).ravel().astype(np.float64)
        assert not np.array_equal(ref, other), key
        # Slack: correlation of independent streams ~ N(0, 1/size); 5 SD bound (~6e-7 false alarm).
        assert abs(np.corrcoef(ref, other)[0, 1]) < 5 / np.sqrt(ref.size), key


def test_selection_and_estimation_draws_are_different_samples():
    # ISS pitfall: the estimate must not reuse the N0 selection samples (not even as a prefix).
    sel = torch_noise(NoiseKey(0, 4, Stage.EXPERT_SELECT), 0, 100)
    est = torch_noise(NoiseKey(0, 4, Stage.EXPERT_ESTIMATE), 0, 1000)
    assert not np.any(np.all(np.isclose(est[:, None], sel[None]), axis=(2, 3, 4)))


def test_block_seed_rejects_negative_parts():
    with pytest.raises(ValueError):
        NoiseKey(-1, 0, Stage.EXPERT_SELECT).block_seed(0)
    with pytest.raises(ValueError):
        NoiseKey(0, -1, Stage.EXPERT_SELECT).block_seed(0)


def test_batch_segments_cover_every_sample_once():
    for images, n, batch in [(1, 10, 3), (3, 7, 5), (4, 100, 400), (5, 1, 1), (2, 50, 64)]:
        seen = []
        for segments in batch_segments(images, n, batch):
            assert sum(s1 - s0 for _, s0, s1 in segments) <= batch
            for image, s0, s1 in segments:
                seen += [(image, s) for s in range(s0, s1)]
        assert seen == [(i, s) for i in range(images) for s in range(n)]


@pytest.mark.parametrize("batch", [1, 7, 49, 50, 64, 333, 400, 5000])
def test_counts_identical_for_every_batch_size(batch):
    x = RNG.uniform(size=(5, *SHAPE)).astype(np.float32)
    keys = [NoiseKey(9, i, Stage.EXPERT_ESTIMATE) for i in range(5)]
    ref = counter(400).counts_many(x, 0.5, 537, keys=keys)
    got = counter(batch).counts_many(x, 0.5, 537, keys=keys)
    np.testing.assert_array_equal(got, ref)  # bit-identical noise; the linear network is row-independent
    assert got.dtype == np.int64 and np.all(got.sum(axis=1) == 537)


def test_counts_many_equals_one_image_at_a_time():
    x = RNG.uniform(size=(4, *SHAPE)).astype(np.float32)
    keys = [NoiseKey(9, 10 + i, Stage.EXPERT_SELECT) for i in range(4)]
    c = counter(64)
    together = c.counts_many(x, 0.25, 130, keys=keys)
    alone = np.stack([c.counts(x[i], 0.25, 130, key=keys[i]) for i in range(4)])
    np.testing.assert_array_equal(together, alone)
    # order of images does not matter either
    perm = [2, 0, 3, 1]
    np.testing.assert_array_equal(c.counts_many(x[perm], 0.25, 130, keys=[keys[i] for i in perm]), together[perm])


def test_counts_distribution_matches_closed_form():
    # Binary linear model: count of class 1 ~ Bin(n, Phi(m / (sigma |dw|))).
    w = np.zeros((2, 16), np.float32)
    w[1, :4] = [0.5, -0.5, 0.25, 0.0]
    b = np.array([0.0, 0.05], np.float32)
    x = np.full(SHAPE, 0.5, np.float32)
    sigma, n = 0.5, 20_000
    p = norm.cdf((0.125 + 0.05) / (sigma * np.linalg.norm(w[1])))
    k1 = counter(weight=w, bias=b).counts(x, sigma, n, key=NoiseKey(0, 0, Stage.EXPERT_ESTIMATE))[1]
    # Slack: 5 SD of Bin(n, p) (two-sided ~6e-7).
    assert abs(k1 - n * p) <= 5 * np.sqrt(n * p * (1 - p))


def test_counter_rejects_bad_requests():
    c = counter()
    x = np.zeros(SHAPE, np.float32)
    key = NoiseKey(0, 0, Stage.EXPERT_SELECT)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            c.counts(x, sigma, 10, key=key)
    with pytest.raises(ValueError):
        c.counts(x, 0.5, 0, key=key)
    with pytest.raises(ValueError):
        c.counts(np.zeros((1, 5, 5), np.float32), 0.5, 10, key=key)
    with pytest.raises(ValueError):
        c.counts_many(np.zeros((2, *SHAPE), np.float32), 0.5, 10, keys=[key])


def test_unavailable_device_is_a_typed_error():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(EngineUnavailableError):
            resolve_device("cuda")
    with pytest.raises(EngineUnavailableError):
        resolve_device("no-such-device")


class Recorder:
    """Wraps a counter and records every (key, n, sigma) it is asked for."""

    def __init__(self, inner):
        self.inner = inner
        self.num_classes = inner.num_classes
        self.input_shape = inner.input_shape
        self.engine, self.precision = inner.engine, inner.precision
        self.calls = []

    def counts(self, x, sigma, n, *, key):
        self.calls.append((key, n, sigma))
        return self.inner.counts(x, sigma, n, key=key)

    def counts_many(self, xs, sigma, n, *, keys):
        self.calls += [(k, n, sigma) for k in keys]
        return self.inner.counts_many(xs, sigma, n, keys=keys)


def test_certify_uses_fresh_selection_then_estimation_streams():
    rec = Recorder(counter())
    smoothed = SmoothedClassifier(rec, 0.25)
    smoothed.certify(np.full(SHAPE, 0.3, np.float32), n0=30, n=200, alpha=0.01, seed=4, index=12)
    assert rec.calls == [(NoiseKey(4, 12, Stage.EXPERT_SELECT), 30, 0.25),
                         (NoiseKey(4, 12, Stage.EXPERT_ESTIMATE), 200, 0.25)]
    rec.calls.clear()
    smoothed.predict(np.full(SHAPE, 0.3, np.float32), n=50, alpha=0.01, seed=4, index=12)
    assert rec.calls == [(NoiseKey(4, 12, Stage.EXPERT_PREDICT), 50, 0.25)]


def test_certify_selection_comes_from_n0_draw_and_estimate_from_n_draw():
    # Direct replay of Cohen's CERTIFY with the same keyed streams.
    from dualrs_route.experts.stats import certify_from_counts

    c = counter()
    smoothed = SmoothedClassifier(c, 0.5)
    for index in range(20):
        x = RNG.uniform(size=SHAPE).astype(np.float32)
        cert = smoothed.certify(x, n0=40, n=300, alpha=0.01, seed=1, index=index)
        sel = c.counts(x, 0.5, 40, key=NoiseKey(1, index, Stage.EXPERT_SELECT))
        est = c.counts(x, 0.5, 300, key=NoiseKey(1, index, Stage.EXPERT_ESTIMATE))
        guess = int(np.argmax(sel))
        assert cert == certify_from_counts(guess, int(est[guess]), 300, 0.5, 0.01)


def test_same_seed_same_certificates_other_seed_differs():
    xs = RNG.uniform(size=(12, *SHAPE)).astype(np.float32)
    first = [SmoothedClassifier(counter(64), 0.5).certify(x, n0=50, n=400, alpha=0.01, seed=3, index=i)
             for i, x in enumerate(xs)]
    again = [SmoothedClassifier(counter(400), 0.5).certify(x, n0=50, n=400, alpha=0.01, seed=3, index=i)
             for i, x in enumerate(xs)]
    other = [SmoothedClassifier(counter(400), 0.5).certify(x, n0=50, n=400, alpha=0.01, seed=4, index=i)
             for i, x in enumerate(xs)]
    assert first == again
    assert [c.count for c in first] != [c.count for c in other]


def test_certificate_does_not_depend_on_which_examples_ran_before():
    # resume/sharding: example i's certificate is the same whether or not others ran first
    c = counter()
    smoothed = SmoothedClassifier(c, 0.5)
    xs = RNG.uniform(size=(6, *SHAPE)).astype(np.float32)
    forward = [smoothed.certify(x, n0=20, n=200, alpha=0.01, seed=0, index=i) for i, x in enumerate(xs)]
    backward = [smoothed.certify(xs[i], n0=20, n=200, alpha=0.01, seed=0, index=i) for i in reversed(range(6))]
    assert forward == backward[::-1]


def test_smoothed_classifier_validates_arguments():
    smoothed = SmoothedClassifier(counter(), 0.5)
    x = np.zeros(SHAPE, np.float32)
    for kwargs in (dict(n0=0), dict(n=0), dict(alpha=0.0), dict(alpha=1.0), dict(alpha=2.0)):
        with pytest.raises(ValueError):
            smoothed.certify(x, **{**dict(n0=10, n=10, alpha=0.1), **kwargs})
    with pytest.raises(ValueError):
        SmoothedClassifier(counter(), 0.0)
    with pytest.raises(ValueError):
        smoothed.predict(x, n=10, alpha=1.5)


def test_predict_abstains_on_a_coin_flip_and_predicts_a_sure_class():
    w = np.zeros((2, 16), np.float32)
    w[1, 0] = 1.0
    x_edge = np.zeros(SHAPE, np.float32)  # margin 0: p = 1/2 exactly
    smoothed = SmoothedClassifier(counter(weight=w, bias=np.zeros(2, np.float32)), 0.5)
    abstains = sum(smoothed.predict(x_edge, n=200, alpha=0.01, index=i)[0] == -1 for i in range(40))
    # PREDICT answers at p = 1/2 at rate <= alpha = 0.01. Slack: the test fails only with >= 5 answers
    # out of 40, P[Bin(40, 0.01) >= 5] = 5e-5.
    assert abstains >= 36
    sure = SmoothedClassifier(counter(weight=w, bias=np.array([0.0, 5.0], np.float32)), 0.5)
    prediction, counts = sure.predict(x_edge, n=200, alpha=0.001)
    assert prediction == 1 and counts.sum() == 200


def _have_compiler() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow  # a cold inductor compile takes ~30-120 s on 2 cores
@pytest.mark.skipif(not _have_compiler(), reason="torch.compile (inductor, CPU) needs a C++ compiler")
def test_compiled_counter_counts_like_eager_and_keeps_one_shape(tmp_path, monkeypatch):
    """``compile=True``: same counts as eager on a linear model, partial batches padded (no recompile)."""
    import torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    x = RNG.uniform(size=(3, *SHAPE)).astype(np.float32)
    keys = [NoiseKey(4, i, Stage.EXPERT_ESTIMATE) for i in range(3)]
    eager = counter(64).counts_many(x, 0.5, 150, keys=keys)
    compiled = TorchCounter(linear_model(W3, B3, SHAPE), num_classes=3, input_shape=SHAPE, batch_size=64,
                            compile=True)
    shapes = []
    forward = compiled._forward
    compiled._forward = lambda batch: (shapes.append(tuple(batch.shape)), forward(batch))[1]
    got = compiled.counts_many(x, 0.5, 150, keys=keys)  # 450 samples: 7 full batches of 64 and one of 2
    # argmax over logits that agree to float rounding: a different kernel may flip an exact near-tie only
    assert np.abs(got - eager).sum() <= 2 and np.all(got.sum(axis=1) == 150)
    assert set(shapes) == {(64, *SHAPE)} and len(shapes) == 8
    assert compiled.describe()["compiled"] is True and counter(64).describe()["compiled"] is False


def test_compile_needs_the_torch_engine(tmp_path):
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.export.engines import make_counter
    from rs_oracle import write_linear_folder

    folder = load_folder(str(write_linear_folder(tmp_path / "lin", weight=W3, bias=B3, sigma=0.5,
                                                 input_shape=SHAPE)))
    with pytest.raises(EngineUnavailableError, match="needs the torch engine"):
        make_counter(folder, engine="onnxruntime", compile=True)
    assert make_counter(folder, engine="torch", compile=True).compiled


def test_layout_and_tf32_metadata_on_the_cpu():
    # CPU: channels-last by default (AMX/oneDNN), NCHW on request; no TF32 entry in the metadata
    c = counter()
    assert c.channels_last is True and "tf32" not in c.describe()
    nchw = TorchCounter(linear_model(W3, B3, SHAPE), num_classes=3, input_shape=SHAPE, channels_last=False)
    assert nchw.channels_last is False
    x = np.full(SHAPE, 0.5, np.float32)
    key = NoiseKey(0, 0, Stage.EXPERT_ESTIMATE)
    assert np.array_equal(nchw.counts(x, 0.5, 300, key=key), c.counts(x, 0.5, 300, key=key))


@pytest.mark.gpu
def test_cuda_fp32_is_nchw_without_tf32():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    c = TorchCounter(linear_model(W3, B3, SHAPE), num_classes=3, input_shape=SHAPE, device="cuda")
    assert c.channels_last is False and c.describe()["tf32"] is False
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    bf16 = TorchCounter(linear_model(W3, B3, SHAPE), num_classes=3, input_shape=SHAPE, device="cuda",
                        precision="bf16")
    assert bf16.channels_last is True and "tf32" not in bf16.describe()
