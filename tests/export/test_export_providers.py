"""Execution-provider selection, with the installed providers faked, and the silent-fallback check."""

from __future__ import annotations

import pytest

from dualrs_route.experts.errors import EngineUnavailableError
from dualrs_route.export import providers
from dualrs_route.export.providers import CPU, CUDA, TENSORRT, ProviderPlan, choose_providers, create_session, parse_device


@pytest.fixture
def installed(monkeypatch):
    """Fake onnxruntime.get_available_providers() to return the given list."""
    import onnxruntime

    def fake(*names):
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(names))

    return fake


def test_cpu_device_uses_the_cpu_provider(installed):
    installed(TENSORRT, CUDA, CPU)
    plan = choose_providers(device="cpu")
    assert plan.providers == (CPU,) and plan.required == CPU


def test_cuda_auto_prefers_tensorrt_then_cuda_then_cpu(installed, tmp_path):
    installed(TENSORRT, CUDA, CPU)
    plan = choose_providers(device="cuda:1", engine_cache_dir=tmp_path, input_shape=(3, 32, 32), max_batch=256)
    assert plan.providers == (TENSORRT, CUDA, CPU) and plan.required == TENSORRT
    trt, cuda, _ = plan.options
    assert trt["device_id"] == 1 and cuda == {"device_id": 1, "use_tf32": 0}
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_fp16_enable"] is False
    assert trt["trt_profile_min_shapes"] == "pixels:1x3x32x32"
    assert trt["trt_profile_max_shapes"] == "pixels:256x3x32x32"


def test_tensorrt_fp16_flag(installed, tmp_path):
    installed(TENSORRT, CUDA, CPU)
    plan = choose_providers(device="cuda", provider="tensorrt", precision="fp16", engine_cache_dir=tmp_path)
    assert plan.options[0]["trt_fp16_enable"] is True


def test_cuda_without_tensorrt_uses_cuda(installed):
    installed(CUDA, CPU)
    plan = choose_providers(device="cuda")
    assert plan.providers == (CUDA, CPU) and plan.required == CUDA and plan.options[0] == {"device_id": 0, "use_tf32": 0}


def test_cuda_requested_but_missing_is_a_clear_error(installed):
    installed("AzureExecutionProvider", CPU)
    with pytest.raises(EngineUnavailableError) as info:
        choose_providers(device="cuda")
    message = str(info.value)
    assert CUDA in message and "AzureExecutionProvider, CPUExecutionProvider" in message
    assert "pip install 'dualrs-route[gpu]'" in message and "never be installed together" in message


def test_tensorrt_requested_but_missing_is_a_clear_error(installed):
    installed(CUDA, CPU)
    with pytest.raises(EngineUnavailableError, match="needs TensorrtExecutionProvider"):
        choose_providers(device="cuda", provider="tensorrt")


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="cpu", provider="cuda"), "needs a GPU"),
    (dict(device="cpu", precision="fp16"), "fp16 on ONNX Runtime needs the TensorRT provider"),
    (dict(device="cpu", precision="bf16"), "use --engine torch for bf16"),
    (dict(device="cuda", provider="cpu"), "contradicts"),
    (dict(device="cpu", provider="openvino"), "unknown ORT provider"),
])
def test_contradictory_requests(installed, kwargs, match):
    installed(TENSORRT, CUDA, CPU)
    with pytest.raises(EngineUnavailableError, match=match):
        choose_providers(**kwargs)


def test_fp16_needs_tensorrt_even_on_cuda(installed):
    installed(CUDA, CPU)
    with pytest.raises(EngineUnavailableError, match="fp16"):
        choose_providers(device="cuda", precision="fp16")


@pytest.mark.parametrize("device, expected", [("cpu", ("cpu", 0)), ("cuda", ("cuda", 0)), ("CUDA:3", ("cuda", 3))])
def test_parse_device(device, expected):
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:1", "", 3])
def test_parse_device_rejects(device):
    with pytest.raises(EngineUnavailableError):
        parse_device(device)


def test_really_missing_cuda_here():
    """Not faked: this CPU-only onnxruntime build has no CUDA provider."""
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this machine's onnxruntime has the CUDA provider")
    with pytest.raises(EngineUnavailableError, match="pip install 'dualrs-route\\[gpu\\]'"):
        choose_providers(device="cuda:0")


def test_silent_fallback_to_cpu_is_detected(monkeypatch, exported_folder):
    """ORT may build a 'CUDA' session that really runs on the CPU; create_session must refuse it."""
    import onnxruntime

    class FallbackSession:
        def __init__(self, path, sess_options=None, providers=None, provider_options=None):
            self.asked = providers

        def get_providers(self):
            return [CPU]

    monkeypatch.setattr(onnxruntime, "InferenceSession", FallbackSession)
    plan = ProviderPlan((CUDA, CPU), ({"device_id": 0}, {}), CUDA, "cuda:0")
    with pytest.raises(EngineUnavailableError, match="session runs on CPUExecutionProvider"):
        create_session(exported_folder / "model.onnx", plan)


def test_create_session_cpu_and_threads(exported_folder):
    session = create_session(exported_folder / "model.onnx", choose_providers(device="cpu"), threads=1)
    assert session.get_providers() == [CPU]
    with pytest.raises(ValueError):
        providers.session_options(threads=0)
