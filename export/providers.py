"""Choosing ONNX Runtime execution providers: the one place that knows about them.

:func:`choose_providers` turns what the user asked for (a device, an ORT provider
preference, a precision) and what this ONNX Runtime build offers into an ordered
provider list with options (TensorRT -> CUDA -> CPU). :func:`create_session` builds
the session and then checks ``session.get_providers()``: ONNX Runtime silently falls
back to the CPU when, for example, the CUDA libraries are missing, and a benchmark
or a certificate would then quietly describe a different engine than the one asked for.

Nothing is imported at module import time; ``onnxruntime`` is imported on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dualrs_route.experts.errors import EngineUnavailableError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
"""Values of the ``provider`` option: ``auto`` = the fastest one installed for the device."""

GPU_INSTALL_HINT = (
    "install the GPU build in a fresh environment: `pip uninstall onnxruntime && pip install 'dualrs-route[gpu]'` "
    "(onnxruntime and onnxruntime-gpu share one import name and must never be installed together)"
)


@dataclass(frozen=True)
class ProviderPlan:
    """An ordered ORT provider list with per-provider options, and the provider that must be active.

    ``required`` is the provider the user asked for (or ``auto`` resolved to); after the
    session is built it must appear in ``session.get_providers()``. Later entries of
    ``providers`` only take the nodes the required provider cannot run.
    """

    providers: tuple[str, ...]
    options: tuple[dict, ...]
    required: str
    device: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_ort_arguments(self) -> tuple[list[str], list[dict]]:
        return list(self.providers), [dict(o) for o in self.options]


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ("cpu", 0); ``"cuda"`` / ``"cuda:1"`` -> ("cuda", index). Anything else raises."""
    if not isinstance(device, str):
        raise EngineUnavailableError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    kind, _, index = device.strip().lower().partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda":
        if not index:
            return "cuda", 0
        if index.isdigit():
            return "cuda", int(index)
    raise EngineUnavailableError(f"unknown device {device!r} for ONNX Runtime; use cpu, cuda or cuda:N")


def available_providers() -> list[str]:
    """The execution providers this ONNX Runtime build offers (not proof that they work)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineUnavailableError(
            "ONNX Runtime is not installed; `pip install 'dualrs-route[cpu]'` (CPU build) or `pip install 'dualrs-route[gpu]'` (CUDA build), never both"
        ) from None
    return list(ort.get_available_providers())


def choose_providers(
    *,
    device: str = "cpu",
    provider: str = "auto",
    precision: str = "fp32",
    engine_cache_dir: str | os.PathLike | None = None,
    input_name: str = "pixels",
    input_shape: Sequence[int] | None = None,
    max_batch: int = 400,
    available: Sequence[str] | None = None,
) -> ProviderPlan:
    """Pick the ORT providers for ``device`` and the ``provider`` preference.

    * ``device="cpu"``: the CPU provider (``provider`` must be ``auto`` or ``cpu``).
    * ``device="cuda[:i]"``: ``provider="auto"`` takes TensorRT if this build has it,
      else CUDA; ``"tensorrt"`` or ``"cuda"`` demand that one. The CPU provider is
      appended so that nodes the GPU provider lacks still run.
    * ``precision``: ``fp32``; ``fp16`` only through the TensorRT provider (its fp16
      flag); ``int8`` runs a static-QDQ model file on any provider. ``bf16`` is a torch
      precision and is refused here.

    TensorRT options: the engine cache lives in ``engine_cache_dir`` (default
    ``$DUALRS_TRT_CACHE`` or ``~/.cache/dualrs-route/trt``), and when ``input_shape``
    is given an explicit dynamic-batch profile 1..``max_batch`` is declared so one
    engine serves every batch size. ``available`` overrides the installed list (tests).

    Raises :class:`EngineUnavailableError` when the requested provider is missing,
    naming what is installed and how to get it.
    """
    kind, index = parse_device(device)
    if provider not in PROVIDER_CHOICES:
        raise EngineUnavailableError(f"unknown ORT provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    if precision not in ("fp32", "fp16", "int8"):
        raise EngineUnavailableError(
            f"precision {precision!r} is not available on ONNX Runtime (fp32, fp16 with the TensorRT provider, "
            "int8 from a static-QDQ model); use --engine torch for bf16"
        )
    installed = list(available) if available is not None else available_providers()
    shown = ", ".join(installed) or "none"
    if kind == "cpu":
        if provider not in ("auto", "cpu"):
            raise EngineUnavailableError(
                f"ORT provider {provider!r} needs a GPU but --device cpu was given; pass --device cuda")
        if precision == "fp16":
            raise EngineUnavailableError(
                "fp16 on ONNX Runtime needs the TensorRT provider on a GPU (--device cuda); on the CPU use "
                "fp32 or int8, or --engine torch --precision bf16")
        if CPU not in installed:
            raise EngineUnavailableError(f"this ONNX Runtime build has no {CPU} (it offers: {shown})")
        return ProviderPlan((CPU,), ({},), CPU, "cpu")

    # CUDA device
    if provider == "cpu":
        raise EngineUnavailableError("ORT provider 'cpu' contradicts --device cuda; pass --device cpu")
    if provider == "auto":
        required = TENSORRT if TENSORRT in installed else CUDA
    else:
        required = TENSORRT if provider == "tensorrt" else CUDA
    if required not in installed:
        raise EngineUnavailableError(
            f"--device {device} with ORT provider {provider!r} needs {required}, but this ONNX Runtime build only "
            f"offers: {shown}; {GPU_INSTALL_HINT}"
        )
    if precision == "fp16" and required != TENSORRT:
        raise EngineUnavailableError(
            "fp16 on ONNX Runtime needs the TensorRT provider, which this build lacks "
            f"(it offers: {shown}); use --engine torch --precision fp16 or {GPU_INSTALL_HINT}")
    providers: list[str] = []
    options: list[dict] = []
    notes: list[str] = []
    if required == TENSORRT:
        cache = Path(engine_cache_dir or os.environ.get("DUALRS_TRT_CACHE") or
                     Path.home() / ".cache" / "dualrs-route" / "trt").expanduser()
        trt = {
            "device_id": index,
            "trt_fp16_enable": precision == "fp16",
            "trt_int8_enable": False,  # int8 comes from the QDQ model's own scales, not TRT calibration
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }
        if input_shape is not None:
            dims = "x".join(str(int(d)) for d in input_shape)
            opt = max(1, int(max_batch))
            trt.update(trt_profile_min_shapes=f"{input_name}:1x{dims}",
                       trt_profile_opt_shapes=f"{input_name}:{opt}x{dims}",
                       trt_profile_max_shapes=f"{input_name}:{opt}x{dims}")
        providers.append(TENSORRT)
        options.append(trt)
        notes.append(f"TensorRT engine cache: {cache}")
    if CUDA in installed:
        providers.append(CUDA)
        # fp32 means fp32: the CUDA provider runs convolutions and GEMMs in TF32 unless use_tf32 is 0.
        options.append({"device_id": index, "use_tf32": 0})
    if CPU in installed:
        providers.append(CPU)
        options.append({})
    return ProviderPlan(tuple(providers), tuple(options), required, f"cuda:{index}", tuple(notes))


def session_options(*, threads: int | None = None):
    """ORT SessionOptions: all graph optimisations, sequential execution, ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def create_session(model_path: str | os.PathLike, plan: ProviderPlan, *, threads: int | None = None):
    """Build an ``InferenceSession`` for ``plan`` and verify that ``plan.required`` is really active.

    Raises :class:`EngineUnavailableError` if ORT fell back to another provider (for
    example CUDA requested but its libraries missing), or if the session cannot be built.
    """
    import onnxruntime as ort

    if plan.required == TENSORRT:
        for opts in plan.options:
            if "trt_engine_cache_path" in opts:
                Path(opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    providers, options = plan.as_ort_arguments()
    try:
        session = ort.InferenceSession(str(model_path), sess_options=session_options(threads=threads),
                                       providers=providers, provider_options=options)
    except Exception as exc:  # ORT raises its own Fail/InvalidArgument/RuntimeException types
        if isinstance(exc, (EngineUnavailableError, KeyboardInterrupt)):
            raise
        message = " ".join(str(exc).split())[:400]
        if plan.required == CPU:
            from dualrs_route.experts.errors import ModelFormatError

            raise ModelFormatError(f"ONNX Runtime cannot load {model_path}: {message}; re-export it with "
                                   "`dualrs-route export REF --to onnx`") from None
        raise EngineUnavailableError(f"ONNX Runtime could not start {plan.required} on {plan.device} for "
                                     f"{model_path}: {message}") from None
    active = list(session.get_providers())
    if plan.required not in active:
        raise EngineUnavailableError(
            f"asked ONNX Runtime for {plan.required} on {plan.device}, but the session runs on {', '.join(active)} "
            f"(ORT fell back silently; usually the CUDA/cuDNN/TensorRT libraries are missing or do not match). "
            f"Check `python -c \"import onnxruntime; print(onnxruntime.get_device())\"`; {GPU_INSTALL_HINT}"
        )
    return session
