"""The ONNX Runtime counter: equivalence with the torch engine, reproducibility, int8, torch-free use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dualrs_route.experts.engine import NoisyCounter, TorchCounter
from dualrs_route.experts.errors import EngineUnavailableError, ModelFormatError
from dualrs_route.experts.folders import load_folder
from dualrs_route.export.engines import make_counter
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.export.runtime import TorchHostNoise

from conftest import TINY_CLASSES, TINY_SHAPE

SIGMA = 0.5


def _images(count, seed=0):
    return np.random.default_rng(seed).random((count, *TINY_SHAPE), dtype=np.float32)


def _keys(count, seed=1, stage=Stage.EXPERT_ESTIMATE):
    return [NoiseKey(seed, i, stage) for i in range(count)]


@pytest.fixture
def counters(exported_folder):
    folder = load_folder(str(exported_folder))
    torch_counter = make_counter(folder, engine="torch", batch_size=128)
    ort_counter = make_counter(folder, engine="onnxruntime", batch_size=100, threads=1)
    return torch_counter, ort_counter


def test_ort_counter_implements_the_protocol(counters):
    _, ort_counter = counters
    assert isinstance(ort_counter, NoisyCounter)
    assert (ort_counter.engine, ort_counter.precision, ort_counter.noise_source) == ("onnxruntime", "fp32", "torch")
    assert ort_counter.num_classes == TINY_CLASSES and ort_counter.input_shape == TINY_SHAPE
    described = ort_counter.describe()
    assert described["model_file"] == "model.onnx" and len(described["model_sha256"]) == 64


def test_torch_host_noise_is_bitwise_the_torch_engines_noise(exported_folder):
    """The ORT engine feeds the network exactly the inputs TorchCounter builds on the CPU."""
    import torch

    folder = load_folder(str(exported_folder))
    engine = TorchCounter(folder.load_torch_model(), num_classes=TINY_CLASSES, input_shape=TINY_SHAPE)
    noise = TorchHostNoise(TINY_SHAPE)
    x = _images(1)[0]
    key = NoiseKey(5, 2, Stage.ROUTER_SELECT)
    for s0, s1 in [(0, 50), (0, 130), (37, 163), (100, 101)]:
        want = torch.empty((s1 - s0, *TINY_SHAPE))
        engine._fill_noise(want, key, s0, s1)
        want.mul_(SIGMA).add_(torch.from_numpy(x))
        got = np.empty((s1 - s0, *TINY_SHAPE), dtype=np.float32)
        noise.add_noise(got, x, SIGMA, key, s0, s1)
        assert np.array_equal(got, want.numpy()), (s0, s1)


def test_same_certificates_as_the_torch_engine(counters):
    """Engine equivalence, fp32, identical noise. Tolerance: per image, at most 0.5% of the
    samples may change class (argmax flips on float near-ties between the two runtimes' kernels);
    certified predictions must be equal and radii within 0.01 (pixel units, sigma = 0.5)."""
    torch_counter, ort_counter = counters
    xs = _images(12)
    a = torch_counter.counts_many(xs, SIGMA, 600, keys=_keys(12))
    b = ort_counter.counts_many(xs, SIGMA, 600, keys=_keys(12))
    assert np.all(a.sum(axis=1) == 600) and np.all(b.sum(axis=1) == 600)
    assert np.all(np.abs(a - b).sum(axis=1) <= 2 * 3)  # <= 3 of 600 samples moved per image
    assert (a > 0).sum() > 12  # the tiny model is not constant: several classes are hit
    for i, x in enumerate(xs[:6]):
        ct = SmoothedClassifier(torch_counter, SIGMA).certify(x, n0=50, n=400, alpha=0.01, seed=3, index=i)
        co = SmoothedClassifier(ort_counter, SIGMA).certify(x, n0=50, n=400, alpha=0.01, seed=3, index=i)
        assert ct.prediction == co.prediction
        assert abs(ct.radius - co.radius) <= 0.01


def test_numpy_noise_agrees_statistically(exported_folder, counters):
    """numpy noise is a different stream: class frequencies agree within sampling error (5 s.e.)."""
    torch_counter, _ = counters
    folder = load_folder(str(exported_folder))
    numpy_counter = make_counter(folder, engine="onnxruntime", batch_size=200, threads=1, noise="numpy")
    assert numpy_counter.noise_source == "numpy"
    xs, n = _images(4, seed=9), 2000
    a = torch_counter.counts_many(xs, SIGMA, n, keys=_keys(4)) / n
    b = numpy_counter.counts_many(xs, SIGMA, n, keys=_keys(4)) / n
    assert not np.array_equal(a, b)  # really a different stream
    p = (a + b) / 2
    standard_error = np.sqrt(2 * p * (1 - p) / n) + 1e-3
    assert np.all(np.abs(a - b) <= 5 * standard_error)


@pytest.mark.parametrize("noise", ["torch", "numpy"])
def test_reproducible_and_independent_of_batching(exported_folder, noise):
    folder = load_folder(str(exported_folder))
    xs, n, keys = _images(3), 230, _keys(3)

    def counts(batch_size, prefetch=True):
        counter = make_counter(folder, engine="onnxruntime", batch_size=batch_size, threads=1, noise=noise,
                               prefetch=prefetch)
        return counter.counts_many(xs, SIGMA, n, keys=keys)

    reference = counts(100)
    assert np.array_equal(reference, counts(100))  # same seed, fresh session -> same counts
    assert np.array_equal(reference, counts(7))
    assert np.array_equal(reference, counts(7, prefetch=False))  # the noise worker thread changes timing only
    assert np.array_equal(reference, counts(400))  # all three images packed into one batch
    single = make_counter(folder, engine="onnxruntime", batch_size=64, threads=1, noise=noise)
    one_by_one = np.stack([single.counts(x, SIGMA, n, key=k) for x, k in zip(xs, keys)])
    assert np.array_equal(reference, one_by_one)


def test_stages_and_seeds_give_different_streams(counters, monkeypatch):
    """Selection and estimation must not share noise (the ORT RNG trap): the network's inputs
    differ between stages and seeds, and are identical for the same key."""
    _, ort_counter = counters
    seen = []
    original = ort_counter.logits
    monkeypatch.setattr(ort_counter, "logits", lambda batch: seen.append(batch.copy()) or original(batch))
    x = _images(1)[0]
    inputs = {}
    for seed in (0, 1):
        for stage in (Stage.EXPERT_SELECT, Stage.EXPERT_ESTIMATE):
            seen.clear()
            ort_counter.counts(x, SIGMA, 120, key=NoiseKey(seed, 0, stage))
            inputs[(seed, stage)] = np.concatenate(seen)
    values = list(inputs.values())
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(values[i], values[j])
    seen.clear()
    ort_counter.counts(x, SIGMA, 120, key=NoiseKey(1, 0, Stage.EXPERT_ESTIMATE))
    assert np.array_equal(np.concatenate(seen), inputs[(1, Stage.EXPERT_ESTIMATE)])
    # the noise really has standard deviation sigma around x
    residual = inputs[(0, Stage.EXPERT_SELECT)] - x
    assert abs(residual.std() - SIGMA) < 0.03 and abs(residual.mean()) < 0.03


def test_int8_counter_runs_the_qdq_model(exported_folder, counters):
    import onnx

    graph = onnx.load(str(exported_folder / "model.int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    folder = load_folder(str(exported_folder))
    int8 = make_counter(folder, engine="onnxruntime", precision="int8", batch_size=100, threads=1)
    assert int8.precision == "int8" and int8.describe()["model_file"] == "model.int8.onnx"
    _, fp32 = counters
    xs = _images(6, seed=4)
    a = fp32.counts_many(xs, SIGMA, 400, keys=_keys(6))
    b = int8.counts_many(xs, SIGMA, 400, keys=_keys(6))
    assert np.all(b.sum(axis=1) == 400)
    assert not np.array_equal(a, b)  # a different network really runs
    # same noise, so per-sample classes mostly agree: total variation below 15% of the samples
    assert np.all(np.abs(a - b).sum(axis=1) <= 2 * 0.15 * 400)


def test_int8_without_quantized_file_says_how_to_make_it(folder_copy):
    (folder_copy / "model.int8.onnx").unlink()
    with pytest.raises(ModelFormatError, match="export .* --to int8"):
        make_counter(load_folder(str(folder_copy)), engine="onnxruntime", precision="int8")


def test_missing_onnx_says_how_to_export(folder_copy):
    (folder_copy / "model.onnx").unlink()
    with pytest.raises(ModelFormatError, match="--to onnx"):
        make_counter(load_folder(str(folder_copy)), engine="onnxruntime")


def test_torch_engine_refuses_int8_clearly(exported_folder):
    with pytest.raises((ValueError, EngineUnavailableError), match="--engine onnxruntime .*--to int8"):
        make_counter(load_folder(str(exported_folder)), engine="torch", precision="int8")


def test_ort_refuses_bf16_and_unknown_options(exported_folder):
    folder = load_folder(str(exported_folder))
    with pytest.raises(EngineUnavailableError, match="bf16 runs with --engine torch"):
        make_counter(folder, engine="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="unknown ONNX Runtime option"):
        make_counter(folder, engine="onnxruntime", channels_last=True)


def test_bad_requests_are_rejected(counters):
    _, ort_counter = counters
    with pytest.raises(ValueError, match="shape"):
        ort_counter.counts_many(np.zeros((2, 3, 8, 8), np.float32), SIGMA, 10, keys=_keys(2))
    with pytest.raises(ValueError, match="one noise key per image"):
        ort_counter.counts_many(_images(2), SIGMA, 10, keys=_keys(1))


def test_onnx_only_expert_runs_without_torch(exported_folder, tmp_path):
    """An ONNX-only folder certifies in a process where importing torch fails."""
    from dualrs_route.export.onnx_export import export_onnx

    out = tmp_path / "onnx-only"
    export_onnx(str(exported_folder), out, validate=False)
    script = f"""
import sys
class NoTorch:  # any 'import torch' now raises ImportError, as on a torch-free install
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from dualrs_route.experts.folders import load_folder
from dualrs_route.export.engines import make_counter
from dualrs_route.experts.smoothing import SmoothedClassifier
folder = load_folder({str(out)!r})
counter = make_counter(folder)  # auto: no safetensors -> onnxruntime
assert counter.engine == "onnxruntime" and counter.noise_source == "numpy", counter.describe()
cert = SmoothedClassifier(counter, folder.config.sigma).certify(np.full({TINY_SHAPE}, 0.5, np.float32), n0=20, n=100)
assert "torch" not in sys.modules
print("ok", cert.prediction)
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


def test_config_and_graph_disagreeing_on_classes_is_refused(folder_copy):
    import json

    config = json.loads((folder_copy / "config.json").read_text())
    config["num_classes"] = TINY_CLASSES + 1
    (folder_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=f"has {TINY_CLASSES} classes but the config says"):
        make_counter(load_folder(str(folder_copy)), engine="onnxruntime")


def test_ort_counts_from_an_offset_extend_the_stream_like_torch(counters):
    # Sequential certification draws samples [start, start + n): both engines must give the same
    # counts as one draw of the whole prefix, and agree with each other (same torch host noise).
    torch_counter, ort_counter = counters
    xs, keys = _images(2), _keys(2)
    for counter in (torch_counter, ort_counter):
        whole = counter.counts_many(xs, SIGMA, 330, keys=keys)
        parts = counter.counts_many(xs, SIGMA, 130, keys=keys) + counter.counts_many(xs, SIGMA, 200, keys=keys,
                                                                                      start=130)
        np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(torch_counter.counts(xs[0], SIGMA, 77, key=keys[0], start=123),
                                  ort_counter.counts(xs[0], SIGMA, 77, key=keys[0], start=123))
