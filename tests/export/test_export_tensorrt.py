"""TensorRT: clear errors where it is missing; the real engine only where a GPU and TensorRT exist.

The gpu-marked tests have NOT been run on this project's CPU machines.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dualrs_route.experts.errors import EngineUnavailableError
from dualrs_route.experts.folders import load_folder
from dualrs_route.export.engines import make_counter
from dualrs_route.experts.noise import NoiseKey, Stage

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_module_imports_without_tensorrt():
    import dualrs_route.export.tensorrt_engine as module

    assert callable(module.build_engine) and module.INSTALL_HINT.startswith("pip install 'dualrs-route[tensorrt]'")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_a_clear_error(exported_folder):
    with pytest.raises(EngineUnavailableError) as info:
        make_counter(load_folder(str(exported_folder)), engine="tensorrt", device="cuda")
    assert "pip install 'dualrs-route[tensorrt]'" in str(info.value) and "tensorrt" in str(info.value)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_export_to_tensorrt_without_tensorrt_exits_cleanly(exported_folder):
    from click.testing import CliRunner

    from dualrs_route.cli import main

    result = CliRunner().invoke(main, ["export", str(exported_folder), "--to", "tensorrt"])
    assert result.exit_code == 1 and "pip install 'dualrs-route[tensorrt]'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_counter_matches_torch_cuda(folder_copy, precision):
    if not _cuda_available():
        pytest.skip("needs a CUDA GPU")
    folder = load_folder(str(folder_copy))
    trt_counter = make_counter(folder, engine="tensorrt", device="cuda", batch_size=128, precision=precision)
    torch_counter = make_counter(folder, engine="torch", device="cuda", batch_size=128)
    assert (folder_copy / ("model.fp16.engine" if precision == "fp16" else "model.engine")).is_file()
    xs = np.random.default_rng(0).random((5, *folder.config.input_shape), dtype=np.float32)
    keys = [NoiseKey(0, i, Stage.EXPERT_ESTIMATE) for i in range(5)]
    a = torch_counter.counts_many(xs, 0.5, 500, keys=keys)
    b = trt_counter.counts_many(xs, 0.5, 500, keys=keys)
    assert np.all(b.sum(axis=1) == 500)
    allowed = 3 if precision == "fp32" else 25  # samples per image allowed to change class (float near-ties)
    assert np.all(np.abs(a - b).sum(axis=1) <= 2 * allowed)
    # independent of batch size
    small = make_counter(folder, engine="tensorrt", device="cuda", batch_size=128, precision=precision)
    small.batch_size = 37
    assert np.array_equal(b, small.counts_many(xs, 0.5, 500, keys=keys))


@pytest.mark.gpu
def test_ort_cuda_session_really_runs_on_cuda(exported_folder):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    counter = make_counter(load_folder(str(exported_folder)), engine="onnxruntime", device="cuda")
    assert counter.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
