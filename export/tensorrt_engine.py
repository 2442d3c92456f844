"""Native TensorRT: build a serialized engine from ``model.onnx`` and count noisy samples with it.

UNVERIFIED: the ``tensorrt`` package cannot be installed on the CPU machines this
project is developed on, so nothing in this module has been run yet. Its tests are
marked ``gpu`` and skip without TensorRT and a CUDA GPU.

* :func:`build_engine` parses ``model.onnx`` with the TensorRT 10 Python API and builds
  an engine with one dynamic-batch optimisation profile (1 .. ``max_batch``, tuned for
  ``max_batch``), optionally with fp16 kernels. Engines are specific to the GPU and the
  TensorRT version, so a JSON sidecar records both and a mismatch triggers a rebuild.
* :func:`tensorrt_counter` plugs :class:`TensorRTForward` into the torch engine's device-side loop (keyed noise
  blocks from a CUDA ``torch.Generator``, packing, ``bincount`` on the device) and
  replaces only the forward pass by the TensorRT engine, with input and output bound
  to torch CUDA buffers. Its noise is the torch-CUDA stream, so its counts match
  ``--engine torch --device cuda`` up to kernel float effects.

``tensorrt`` is imported lazily; without it every entry point raises
:class:`~experts.errors.EngineUnavailableError` with the install hint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from dualrs_route.experts.atomic import atomic_write_bytes, atomic_write_json
from dualrs_route.experts.engine import TorchCounter, resolve_device
from dualrs_route.experts.errors import EngineUnavailableError, ModelFormatError
from dualrs_route.experts.folders import ONNX_FILE, sha256_file

from .onnx_export import INPUT_NAME, OUTPUT_NAME

TRT_PRECISIONS = ("fp32", "fp16")
INSTALL_HINT = "pip install 'dualrs-route[tensorrt]' (NVIDIA's TensorRT wheels; needs a CUDA GPU)"


def import_tensorrt():
    """The ``tensorrt`` module, or EngineUnavailableError with the install hint."""
    try:
        import tensorrt
    except ImportError:
        raise EngineUnavailableError(
            "--engine tensorrt needs the tensorrt Python package, which is not installed; on a machine with an "
            f"NVIDIA GPU and driver: `{INSTALL_HINT}` (or use --engine onnxruntime / --engine torch)"
        ) from None
    return tensorrt


def engine_path(folder_path: Path, precision: str) -> Path:
    """``model.engine`` (fp32) or ``model.fp16.engine`` inside the model folder."""
    return Path(folder_path) / ("model.fp16.engine" if precision == "fp16" else "model.engine")


def build_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, *, input_shape: Sequence[int],
                 max_batch: int = 400, fp16: bool = False, workspace_gib: float = 2.0, device_index: int = 0) -> Path:
    """Build a TensorRT engine for ``onnx_path`` (input ``pixels`` [batch, *input_shape], dynamic batch).

    The profile covers batch sizes 1..``max_batch``. Writes ``out_path`` atomically plus
    ``out_path.json`` (TensorRT version, GPU name, source ONNX sha256, precision, max
    batch). Raises ModelFormatError if the ONNX cannot be parsed or built.
    """
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailableError("building a TensorRT engine needs a CUDA GPU, and torch sees none here")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelFormatError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors) or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise EngineUnavailableError("this GPU has no fast fp16; build without --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 layers would run in TF32 (10-bit mantissa)
        config.clear_flag(trt.BuilderFlag.TF32)
    shape = tuple(int(d) for d in input_shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *shape), (int(max_batch), *shape), (int(max_batch), *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelFormatError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    atomic_write_bytes(out_path, bytes(serialized))
    meta = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(device_index),
            "onnx_sha256": sha256_file(onnx_path), "precision": "fp16" if fp16 else "fp32",
            "max_batch": int(max_batch), "input_shape": list(shape)}
    atomic_write_json(out_path.with_name(out_path.name + ".json"), meta)
    return out_path


def engine_is_current(path: Path, onnx_path: Path, *, precision: str, max_batch: int, device_index: int = 0) -> bool:
    """True when ``path`` exists and its sidecar matches this GPU, TensorRT version, ONNX file and batch range."""
    sidecar = path.with_name(path.name + ".json")
    if not path.is_file() or not sidecar.is_file():
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    trt = import_tensorrt()
    import torch

    return (meta.get("tensorrt") == trt.__version__ and meta.get("gpu") == torch.cuda.get_device_name(device_index)
            and meta.get("onnx_sha256") == sha256_file(onnx_path) and meta.get("precision") == precision
            and int(meta.get("max_batch", 0)) >= max_batch)


class TensorRTForward:
    """The forward function of a TensorRT engine, for :class:`~dualrs_route.experts.engine.TorchCounter`'s
    shared batch loop: float32 CUDA batch [b, *input_shape] (b <= ``batch_size``) to float32 CUDA logits
    [b, num_classes]. ``engine_file`` must have been built for this GPU with a batch profile covering
    ``batch_size``. fp16 (when built so) is internal to the engine's kernels; its I/O is float32.
    """

    tf32 = False  # build_engine clears TensorRT's TF32 flag

    def __init__(self, engine_file: str | os.PathLike, *, num_classes: int, device, batch_size: int = 400):
        trt = import_tensorrt()
        import torch

        self.device = device
        self.engine_file = Path(engine_file)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self._engine = self._runtime.deserialize_cuda_engine(self.engine_file.read_bytes())
            if self._engine is None:
                raise ModelFormatError(f"{self.engine_file} is not a TensorRT engine for this GPU/TensorRT version; "
                                       "delete it to rebuild")
            self._context = self._engine.create_execution_context()
            self._out = torch.empty((int(batch_size), int(num_classes)), dtype=torch.float32, device=self.device)
            self._stream = torch.cuda.Stream(device=self.device)

    def __call__(self, batch):
        import torch

        batch = batch.contiguous()
        size = int(batch.shape[0])
        out = self._out[:size]
        self._context.set_input_shape(INPUT_NAME, tuple(batch.shape))
        self._context.set_tensor_address(INPUT_NAME, int(batch.data_ptr()))
        self._context.set_tensor_address(OUTPUT_NAME, int(out.data_ptr()))
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise EngineUnavailableError(f"TensorRT execution failed for a batch of {size}")
        current.wait_stream(self._stream)
        return out


def tensorrt_counter(engine_file: str | os.PathLike, *, num_classes: int, input_shape: Sequence[int],
                     device: str = "cuda", batch_size: int = 400, precision: str = "fp32") -> TorchCounter:
    """A :class:`~dualrs_route.experts.engine.NoisyCounter` whose forward pass is the TensorRT engine
    ``engine_file``; noise, packing and counting are the torch engine's, on the GPU."""
    if precision not in TRT_PRECISIONS:
        raise EngineUnavailableError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {precision!r} "
                                     "(int8 runs on --engine onnxruntime)")
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise EngineUnavailableError(f"--engine tensorrt runs on a CUDA GPU; got --device {device}")
    forward = TensorRTForward(engine_file, num_classes=num_classes, device=dev, batch_size=batch_size)
    return TorchCounter(forward=forward, engine="tensorrt", num_classes=num_classes, input_shape=input_shape,
                        device=device, batch_size=batch_size, precision=precision)


def make_tensorrt_counter(folder, *, device: str = "cuda", batch_size: int = 400, precision: str = "fp32",
                          rebuild: bool = False, **options) -> TorchCounter:
    """A TensorRT counter (:func:`tensorrt_counter`) for ``folder``, building its engine from ``model.onnx`` when missing or stale."""
    if options:
        raise ValueError(f"unknown TensorRT option(s) {sorted(options)}; known: rebuild")
    import_tensorrt()
    if not str(device).startswith("cuda"):
        raise EngineUnavailableError(f"--engine tensorrt needs --device cuda[:N], got --device {device}")
    if precision not in TRT_PRECISIONS:
        raise EngineUnavailableError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {precision!r}")
    resolve_device(device)
    onnx_path = folder.path / ONNX_FILE
    if not onnx_path.is_file():
        raise ModelFormatError(f"{folder.reference}: --engine tensorrt builds from {ONNX_FILE}, which is missing; run "
                               f"`dualrs-route export {folder.reference} --to onnx` first")
    index = int(str(device).partition(":")[2] or 0)
    path = engine_path(folder.path, precision)
    if rebuild or not engine_is_current(path, onnx_path, precision=precision, max_batch=batch_size, device_index=index):
        build_engine(onnx_path, path, input_shape=folder.config.input_shape, max_batch=batch_size,
                     fp16=precision == "fp16", device_index=index)
    return tensorrt_counter(path, num_classes=folder.config.num_classes, input_shape=folder.config.input_shape,
                           device=device, batch_size=batch_size, precision=precision)
