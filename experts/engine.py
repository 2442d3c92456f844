"""The hot loop: run a network on n Gaussian-noised copies of an input and count argmax classes.

Every backend implements :class:`NoisyCounter`; the statistics never learn which
backend they have. This module holds the protocol and the torch engine:

* noise is drawn on the engine's device, keyed by :class:`~experts.noise.NoiseKey`
  (see :mod:`experts.noise`), so counts do not depend on batch size or packing;
* many images' noisy copies are packed into each forward batch (``counts_many``);
* the model runs under ``torch.inference_mode`` and classes are counted with
  ``bincount`` on the device, one transfer per call.
"""

from __future__ import annotations

import math

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import EngineUnavailableError, NonFiniteOutputError
from .noise import NoiseKey, fill_torch_noise
from .stats import check_count, check_sigma

PRECISIONS = ("fp32", "bf16", "fp16")


@runtime_checkable
class NoisyCounter(Protocol):
    """Counts the base classifier's argmax classes on Gaussian-noised copies of inputs."""

    num_classes: int
    input_shape: tuple[int, ...]
    engine: str
    precision: str
    logit_offsets: np.ndarray | None

    def counts(self, x: np.ndarray, sigma: float, n: int, *, key: NoiseKey, start: int = 0) -> np.ndarray:
        """int64 [num_classes]: class counts of f(x + sigma * eps_s), start <= s < start + n, eps from
        stream ``key``. Counts of [0, a) plus counts of [a, a + b) equal counts of [0, a + b) exactly, so
        a sequential procedure extends a stream instead of redrawing it."""

    def counts_many(
        self, xs: np.ndarray, sigma: float, n: int, *, keys: Sequence[NoiseKey], start: int = 0
    ) -> np.ndarray:
        """int64 [len(xs), num_classes]: :meth:`counts` for each image, packed into shared batches."""

    def logits_many(
        self, xs: np.ndarray, sigma: float, n: int, *, keys: Sequence[NoiseKey]
    ) -> np.ndarray:
        """float32 [len(xs), n, num_classes]: the logits behind :meth:`counts_many`, sample by sample
        (same noise streams: their argmax gives exactly its counts)."""

    def set_logit_offsets(self, offsets) -> None:
        """Add fixed per-class offsets to every logit vector before the argmax (None removes them)."""

    def describe(self) -> dict:
        """What run metadata records about this engine: at least ``engine`` and ``precision``."""


def validate_request(counter, xs: np.ndarray, sigma: float, n: int, keys, start: int = 0) -> np.ndarray:
    """Check a counts_many request and return ``xs`` as float32 [B, *input_shape]."""
    check_sigma(sigma)
    check_count(n, "n")
    check_count(start, "start", minimum=0)
    xs = np.asarray(xs, dtype=np.float32)
    if xs.ndim != len(counter.input_shape) + 1 or tuple(xs.shape[1:]) != tuple(counter.input_shape):
        raise ValueError(
            f"inputs must have shape [B, {', '.join(map(str, counter.input_shape))}], got {list(xs.shape)}"
        )
    if len(keys) != len(xs):
        raise ValueError(f"need one noise key per image: {len(keys)} keys for {len(xs)} images")
    return xs


def check_finite(finite_rows, segments, keys, engine: str) -> None:
    """Raise NonFiniteOutputError naming the first input whose batch rows are not all finite.

    ``finite_rows`` is a bool array [batch] (True where every logit of the row is finite),
    ``segments`` the batch's ``(image, s0, s1)`` runs. Cheap: one reduction per batch."""
    offset = 0
    for image, s0, s1 in segments:
        bad = np.flatnonzero(~np.asarray(finite_rows[offset:offset + s1 - s0]))
        if bad.size:
            key = keys[image]
            raise NonFiniteOutputError(
                f"the network ({engine} engine) returned NaN or infinite logits for input index {key.index} "
                f"(stage {key.stage.name}, noise sample {s0 + int(bad[0])}); no result is written for it; "
                "check the model's weights and inputs")
        offset += s1 - s0


def check_offsets(offsets, num_classes: int) -> np.ndarray | None:
    """Validate per-class logit offsets: None, or ``num_classes`` finite numbers -> float32 array."""
    if offsets is None:
        return None
    values = np.asarray(offsets, dtype=np.float64)
    if values.shape != (num_classes,) or not np.all(np.isfinite(values)):
        raise ValueError(f"logit offsets must be {num_classes} finite numbers (one per class), got {offsets!r}")
    return values.astype(np.float32)


def scatter_logits(out: np.ndarray, segments, values: np.ndarray) -> None:
    """Write one forward batch's logits ``values`` (rows in segment order) into ``out`` [images, n, K]."""
    offset = 0
    for image, s0, s1 in segments:
        out[image, s0:s1] = values[offset:offset + s1 - s0]
        offset += s1 - s0


MAX_BATCH_BYTES = 4 * 2**30
"""Largest float32 noise buffer (batch x input size x 4 bytes) a run accepts: 4 GiB."""


def check_batch_memory(batch: int, input_shape, name: str = "--batch") -> int:
    """Return ``batch``, or raise ValueError if a float32 noise buffer of ``batch`` inputs of
    ``input_shape`` would exceed :data:`MAX_BATCH_BYTES`."""
    per_input = 4 * math.prod(int(d) for d in input_shape)
    batch = check_count(batch, name)
    if batch * per_input > MAX_BATCH_BYTES:
        raise ValueError(f"{name} {batch:,} needs a {batch * per_input / 2**30:.1f} GiB noise buffer for inputs of "
                         f"shape {list(input_shape)}; the limit is {MAX_BATCH_BYTES // 2**30} GiB, i.e. {name} <= "
                         f"{MAX_BATCH_BYTES // per_input:,}")
    return batch


def batch_segments(num_images: int, n: int, batch_size: int, start: int = 0):
    """Split the flattened (image, sample) space into forward batches.

    Yields, per batch, a list of ``(image, first_sample, stop_sample)`` segments whose
    lengths add up to at most ``batch_size``; sample numbers run over [start, start + n).
    """
    total = num_images * n
    pos = 0
    while pos < total:
        end = min(total, pos + batch_size)
        segments = []
        for image in range(pos // n, (end - 1) // n + 1):
            s0 = max(pos, image * n) - image * n
            s1 = min(end, (image + 1) * n) - image * n
            segments.append((image, start + s0, start + s1))
        yield segments
        pos = end


def _compile_model(model, dtype, channels_last: bool):
    """``torch.compile`` of float32 batch -> logits: the cast to ``dtype`` and the layout change
    are inside the compiled graph (fused by inductor), with frozen weights and a static shape.
    Compiles lazily, on the first call."""
    import torch

    def run(batch):
        batch = batch.to(dtype)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return model(batch)

    try:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        # every compiled counter (router + experts, each precision and batch size) is one more
        # specialisation of ``run``; past dynamo's default limit of 8 it silently runs eagerly
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), 256))
        compiled = torch.compile(run, dynamic=False)
    except Exception as exc:  # e.g. an unsupported Python version or build
        raise EngineUnavailableError(f"torch.compile is not available here ({type(exc).__name__}: {exc}); "
                                     "run without --compile") from None

    def forward(batch):
        # compilation is lazy (first call), and freezing (weights as constants, folded into the
        # kernels) is an inductor setting read then: torch.compile(options={"freezing": True})
        # measured no faster than no freezing, the patched config twice as fast (bf16, 2 threads)
        with inductor_config.patch(freezing=True):
            return compiled(batch)

    return forward


def resolve_device(device: str):
    """Return a torch.device, or raise EngineUnavailableError if it cannot run here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineUnavailableError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailableError(
            f"device {device!r} requested but torch sees no CUDA GPU here; use --device cpu "
            "or install a CUDA build of torch"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EngineUnavailableError(f"device {device!r} requested but MPS is not available; use --device cpu")
    return dev


class TorchCounter:
    """:class:`NoisyCounter` over a torch module.

    The engine takes ownership of ``model`` (it is moved, cast and converted in place).
    ``model`` maps float32 [B, *input_shape] pixels in [0, 1] to logits [B, num_classes]
    (normalisation inside). ``precision`` is the dtype the network runs in; the noise
    is always drawn and added in float32 and then cast. Certificates are valid for
    the network that actually runs, so the precision is part of a run's metadata.

    ``channels_last`` (None: automatic) picks the memory layout: channels-last except for
    fp32 on a CUDA device, where NCHW measured faster. On CUDA, fp32 runs with TF32 off
    (process-wide torch flags) and ``describe()`` records ``"tf32": False``.

    ``forward`` replaces the module: a callable from a float32 device batch [b, *input_shape]
    (b <= ``batch_size``) to logits [b, num_classes]. Other runtimes that take torch device
    tensors (TensorRT) plug in here and share the noise, packing and counting loop; ``engine``
    names them in the metadata and ``precision`` is then what the forward function runs in.

    ``compile=True`` runs the network through ``torch.compile`` (inductor, weights frozen
    as constants, one static batch shape: partial batches are padded to ``batch_size``
    and the padding rows' predictions dropped). The first forward pass compiles (tens of
    seconds; inductor caches in ``TORCHINDUCTOR_CACHE_DIR``, by default a temp folder).
    The compiled network is numerically a different implementation of the same model,
    like a precision change, so ``compiled`` is part of the run metadata too.
    """

    engine = "torch"

    def __init__(
        self,
        model=None,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        device: str = "cpu",
        batch_size: int = 400,
        precision: str = "fp32",
        channels_last: bool | None = None,
        compile: bool = False,
        forward=None,
        engine: str = "torch",
    ):
        import torch

        if (model is None) == (forward is None):
            raise ValueError("TorchCounter needs exactly one of a torch module or a forward function")
        if forward is None and precision not in PRECISIONS:
            hint = (" (int8 runs on --engine onnxruntime from a static-QDQ model.int8.onnx: "
                    "`dualrs-route export REF --to int8`)") if precision == "int8" else ""
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}{hint}")
        self.engine = engine
        self.device = resolve_device(device)
        self.num_classes = check_count(num_classes, "num_classes")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.batch_size = check_count(batch_size, "batch_size")
        self.precision = precision
        self._generator = torch.Generator(device=self.device)
        self.logit_offsets: np.ndarray | None = None
        if forward is not None:  # the forward function takes float32 and owns its precision
            self.model, self._forward = None, forward
            self.dtype, self.channels_last, self.compiled = torch.float32, False, False
            self.tf32 = getattr(forward, "tf32", None)
            return
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        # channels_last (None: automatic) feeds tensor cores (CPU AMX, GPU bf16/fp16); for plain fp32 on a
        # GPU the automatic choice is NCHW (benchmarks/RESULTS.md, GPU table: both layouts side by side)
        if channels_last is None:
            channels_last = not (self.device.type == "cuda" and precision == "fp32")
        self.channels_last = bool(channels_last) and len(self.input_shape) == 3
        model = model.eval().to(self.device)
        if self.dtype != torch.float32:
            model = model.to(self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.tf32 = None
        if self.device.type == "cuda" and self.dtype == torch.float32:
            # fp32 means fp32: torch lets cuDNN convolutions use TF32 (10-bit mantissa) by default, which
            # would silently certify a reduced-precision network. Process-wide flags, set before any compile.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            self.tf32 = False
        self.compiled = bool(compile)
        self._forward = _compile_model(model, self.dtype, self.channels_last) if self.compiled else None

    def set_logit_offsets(self, offsets) -> None:
        """Add fixed per-class ``offsets`` (float32) to every logit vector before the argmax
        (a calibrated router's config ``logit_offsets``); None removes them."""
        self.logit_offsets = check_offsets(offsets, self.num_classes)

    def counts(self, x: np.ndarray, sigma: float, n: int, *, key: NoiseKey, start: int = 0) -> np.ndarray:
        return self.counts_many(np.asarray(x)[None], sigma, n, keys=[key], start=start)[0]

    def describe(self) -> dict:
        """What run metadata records about this engine (the noise stream depends on the device type)."""
        return {"engine": self.engine, "precision": self.precision, "device": str(self.device),
                "noise": f"torch-{self.device.type}", "compiled": self.compiled,
                **({"logit_offsets": self.logit_offsets.tolist()} if self.logit_offsets is not None else {}),
                **({"tf32": self.tf32} if self.tf32 is not None else {})}

    def _fill_noise(self, out, key: NoiseKey, s0: int, s1: int) -> None:
        """Write samples [s0, s1) of stream ``key`` into ``out`` (float32 [s1 - s0, *shape])."""
        fill_torch_noise(out, self._generator, key, s0, s1)

    def logits(self, batch):
        """Logits of a float32 batch already on the device, in the engine's precision."""
        import torch

        if self.model is None:
            return self._forward(batch)
        if not self.compiled:
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            return self.model(batch.to(self.dtype))
        size = len(batch)
        if size < self.batch_size:  # one static shape: no recompilation for the last, partial batch
            batch = torch.cat([batch, batch.new_zeros((self.batch_size - size, *batch.shape[1:]))])
        try:
            out = self._forward(batch)
        except Exception as exc:  # inductor needs a working C++ compiler (CPU) or triton (GPU)
            if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise EngineUnavailableError(f"torch.compile failed ({type(exc).__name__}: "
                                             f"{' '.join(str(exc).split())[:300]}); run without --compile") from None
            raise
        return out[:size]

    def _noisy_batches(self, xs: np.ndarray, sigma: float, n: int, keys: Sequence[NoiseKey], start: int = 0):
        """Yield ``(segments, logits)`` per forward batch: the noisy copies of ``segments`` (samples
        [start, start + n) of each stream) and the network's logits on them (with the folder's logit
        offsets, if any), on the device."""
        import torch

        # inference_mode tensors cannot enter a compiled graph that was traced outside it
        with (torch.no_grad() if self.compiled else torch.inference_mode()):
            images = torch.as_tensor(xs, device=self.device)
            buffer = torch.empty((min(self.batch_size, len(xs) * n), *self.input_shape), device=self.device)
            offsets = (None if self.logit_offsets is None
                       else torch.as_tensor(self.logit_offsets, device=self.device))
            for segments in batch_segments(len(xs), n, self.batch_size, start):
                batch = buffer[:sum(s1 - s0 for _, s0, s1 in segments)]
                offset = 0
                for image, s0, s1 in segments:
                    part = batch[offset : offset + s1 - s0]
                    self._fill_noise(part, keys[image], s0, s1)
                    part.mul_(sigma).add_(images[image])
                    offset += s1 - s0
                logits = self.logits(batch)
                if offsets is not None:
                    logits = logits.float() + offsets
                finite = torch.isfinite(logits).all(dim=1)
                if not bool(finite.all()):
                    check_finite(finite.cpu().numpy(), segments, keys, self.engine)
                yield segments, logits

    def counts_many(self, xs: np.ndarray, sigma: float, n: int, *, keys: Sequence[NoiseKey],
                    start: int = 0) -> np.ndarray:
        import torch

        xs = validate_request(self, xs, sigma, n, keys, start)
        k = self.num_classes
        totals = torch.zeros(len(xs) * k, dtype=torch.int64, device=self.device)
        for segments, logits in self._noisy_batches(xs, sigma, n, keys, start):
            predictions = logits.argmax(dim=1)
            if len(segments) == 1 and segments[0][0] == 0:
                flat = predictions
            else:
                flat = predictions + torch.cat([torch.full((s1 - s0,), image * k, dtype=torch.int64,
                                                           device=self.device) for image, s0, s1 in segments])
            totals += torch.bincount(flat, minlength=len(xs) * k)
        return totals.view(len(xs), k).cpu().numpy().astype(np.int64)

    def logits_many(self, xs: np.ndarray, sigma: float, n: int, *, keys: Sequence[NoiseKey]) -> np.ndarray:
        """float32 [len(xs), n, num_classes]: the logits behind :meth:`counts_many`, sample by sample
        (same noise streams, so ``argmax`` of these gives exactly its counts)."""
        xs = validate_request(self, xs, sigma, n, keys)
        out = np.empty((len(xs), n, self.num_classes), dtype=np.float32)
        for segments, logits in self._noisy_batches(xs, sigma, n, keys):
            scatter_logits(out, segments, logits.float().cpu().numpy())
        return out
