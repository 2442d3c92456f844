"""The engine factory: :func:`make_counter` builds the :class:`~dualrs_route.experts.engine.NoisyCounter`
that runs a model folder's network on torch, ONNX Runtime or TensorRT.

It sits above the folders (core) and the backends' counters, so neither imports the other.
"""

from __future__ import annotations

from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.errors import EngineUnavailableError, ModelFormatError
from dualrs_route.experts.folders import ModelConfig, ModelFolder

from . import runtime

ENGINES = ("auto", "torch", "onnxruntime", "tensorrt")


def make_counter(folder: ModelFolder, *, engine: str = "auto", device: str = "cpu", batch_size: int = 400,
                 precision: str = "fp32", threads: int | None = None, raw_logits: bool = False, **engine_options):
    """Build the :class:`~experts.engine.NoisyCounter` that runs ``folder``'s network.

    A config's ``logit_offsets`` are added to the network's logits before every argmax, on
    every engine; ``raw_logits=True`` leaves them out (to collect the network's own scores).

    ``auto`` picks ONNX Runtime for int8 or when there is no ``model.safetensors``, else torch.
    ``threads`` sets ONNX Runtime's intra-op threads (torch's are process-wide: ``torch.set_num_threads``).
    ``compile=True`` (torch engine only) runs the network through ``torch.compile``.
    """
    if engine not in ENGINES:
        raise EngineUnavailableError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        engine = "torch" if folder.has_torch_weights and precision != "int8" else "onnxruntime"
    compile_ = bool(engine_options.pop("compile", False))
    if compile_ and engine != "torch":
        raise EngineUnavailableError(f"--compile runs torch.compile and needs the torch engine, but {folder.reference} "
                                     f"runs on {engine} here; pass --engine torch or drop --compile")
    if engine == "onnxruntime" and threads is not None:
        engine_options["threads"] = threads
    cfg = folder.config
    if engine == "torch":
        model = folder.load_torch_model()
        _check_output_width(model, cfg, folder.reference)
        counter = TorchCounter(model, num_classes=cfg.num_classes, input_shape=cfg.input_shape, device=device,
                               batch_size=batch_size, precision=precision, compile=compile_, **engine_options)
    elif engine == "tensorrt":
        from .tensorrt_engine import make_tensorrt_counter  # imports tensorrt only when asked for

        counter = make_tensorrt_counter(folder, device=device, batch_size=batch_size, precision=precision,
                                        **engine_options)
    else:
        counter = runtime.make_counter(folder, device=device, batch_size=batch_size, precision=precision,
                                       **engine_options)
    if cfg.logit_offsets is not None and not raw_logits:
        # a calibrated router: fixed per-class offsets on the logits, the same on every engine
        counter.set_logit_offsets(cfg.logit_offsets)
    return counter


def _check_output_width(model, cfg: ModelConfig, reference: str) -> None:
    import torch

    with torch.inference_mode():
        out = model(torch.zeros((1, *cfg.input_shape)))
    if out.ndim != 2 or out.shape[1] != cfg.num_classes:
        raise ModelFormatError(f"{reference}: the network outputs shape {list(out.shape)} but config.json says "
                               f"num_classes={cfg.num_classes}")


