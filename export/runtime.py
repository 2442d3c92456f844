"""ONNX Runtime engine: a :class:`~experts.engine.NoisyCounter` over ``model.onnx``.

Where the noise comes from (the decision, measured in ``benchmarks/RESULTS.md``):

* **host noise, keyed blocks** (this module). Sample ``s`` of stream ``key`` comes from
  block ``s // BLOCK`` seeded with ``key.block_seed(block)`` (:mod:`experts.noise`),
  so counts do not depend on batch size, packing, sharding or resumption.
  - ``noise="torch"`` (default when torch is importable) draws each block with a CPU
    ``torch.Generator`` exactly as :class:`~experts.engine.TorchCounter` does on the
    CPU, and adds it with the same float32 operations: the network sees bit-identical
    inputs, so certificates equal the torch engine's up to the float differences of
    the two runtimes' kernels (a rare argmax flip on a near-tie).
  - ``noise="numpy"`` uses numpy's PCG64 per block (:func:`experts.noise.numpy_block`)
    for a torch-free install: equally reproducible, but a different stream, hence
    statistically (not bitwise) equal certificates.
* **in-graph noise** (RandomNormalLike) is not used: ORT's RNG gives the same stream
  to every unseeded session in a process (see PLATFORM_NOTES), it cannot reproduce
  per-example keyed blocks, and host noise costs only a few percent of a step here.

Batches are assembled in two preallocated float32 host buffers, many images' samples
packed per forward pass (:func:`experts.engine.batch_segments`), and bound to the
session with I/O binding (input and output bound to preallocated host memory, no
per-batch allocations). A worker thread draws batch i + 1's noise while ORT runs batch i
(``prefetch``; ORT releases the GIL); each batch's contents are fixed by its keys, so this
changes timing only. Argmax and counting happen on the host.

Precision: ``fp32`` runs ``model.onnx``; ``int8`` runs ``model.int8.onnx`` (static QDQ,
written by :func:`export.quantize.quantize_int8`); ``fp16`` only with the TensorRT
provider. Certificates hold for the network that actually runs, so the model file,
its sha256 and the precision are exposed for the run metadata.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from dualrs_route.experts.engine import batch_segments, check_finite, check_offsets, scatter_logits, validate_request
from dualrs_route.experts.errors import EngineUnavailableError, ModelFormatError
from dualrs_route.experts.noise import NoiseKey, block_pieces, fill_torch_noise, numpy_block
from dualrs_route.experts.stats import check_count

from .providers import CPU, PROVIDER_CHOICES, choose_providers, create_session

INT8_FILE = "model.int8.onnx"
ORT_PRECISIONS = ("fp32", "fp16", "int8")
NOISE_SOURCES = ("auto", "torch", "numpy")


def model_file_for(folder_path: Path, precision: str) -> Path:
    """``model.onnx`` for fp32/fp16, ``model.int8.onnx`` for int8."""
    from dualrs_route.experts.folders import ONNX_FILE

    return Path(folder_path) / (INT8_FILE if precision == "int8" else ONNX_FILE)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class TorchHostNoise:
    """Standard-normal float32 noise from CPU torch generators, same blocks as TorchCounter on the CPU."""

    name = "torch"

    def __init__(self, input_shape: Sequence[int]):
        import torch

        self.torch = torch
        self.shape = tuple(int(d) for d in input_shape)
        self.generator = torch.Generator(device="cpu")

    def add_noise(self, out: np.ndarray, x: np.ndarray, sigma: float, key: NoiseKey, s0: int, s1: int) -> None:
        """Write x + sigma * eps_s for samples s in [s0, s1) of stream ``key`` into ``out`` (float32 [s1 - s0, *shape])."""
        view = self.torch.from_numpy(out)
        fill_torch_noise(view, self.generator, key, s0, s1)
        view.mul_(sigma).add_(self.torch.from_numpy(x))


class NumpyHostNoise:
    """Standard-normal float32 noise from numpy PCG64 per block (:mod:`experts.noise`); needs no torch."""

    name = "numpy"

    def __init__(self, input_shape: Sequence[int]):
        self.shape = tuple(int(d) for d in input_shape)

    def add_noise(self, out: np.ndarray, x: np.ndarray, sigma: float, key: NoiseKey, s0: int, s1: int) -> None:
        offset = 0
        for block, lo, hi in block_pieces(s0, s1):
            out[offset:offset + hi - lo] = numpy_block(key, block, self.shape)[lo:hi]
            offset += hi - lo
        np.multiply(out, np.float32(sigma), out=out)
        np.add(out, x, out=out)


def make_noise(source: str, input_shape: Sequence[int]):
    """The host noise source: ``torch``, ``numpy`` or ``auto`` (torch when importable)."""
    if source not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {source!r}")
    if source == "auto":
        source = "torch" if _torch_available() else "numpy"
    if source == "torch":
        if not _torch_available():
            raise EngineUnavailableError("noise='torch' needs torch, which is not installed; use noise='numpy'")
        return TorchHostNoise(input_shape)
    return NumpyHostNoise(input_shape)


class OrtCounter:
    """:class:`~experts.engine.NoisyCounter` running an ONNX graph in ONNX Runtime.

    ``model_path``: an ONNX file with input ``pixels`` float32 [batch, *input_shape]
    (pixels in [0, 1], normalisation inside) and output ``logits`` float32
    [batch, num_classes]. ``batch_size`` noisy samples run per forward pass (it does not
    change results). ``threads`` sets ORT's intra-op threads (default: ORT's choice).
    ``prefetch`` draws the next batch's noise in a worker thread while ORT runs the current
    one (same results, overlapped timing). ``provider``/``device``/``precision`` go to
    :func:`export.providers.choose_providers`. One counter serves one thread at a time
    (its buffers are reused between calls); use one counter per thread.
    """

    engine = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, *, num_classes: int, input_shape: Sequence[int],
                 device: str = "cpu", batch_size: int = 400, precision: str = "fp32", provider: str = "auto",
                 threads: int | None = None, noise: str = "auto", io_binding: bool = True, prefetch: bool = True,
                 engine_cache_dir: str | os.PathLike | None = None):
        from dualrs_route.experts.folders import sha256_file

        if precision not in ORT_PRECISIONS:
            raise EngineUnavailableError(
                f"precision {precision!r} is not available on ONNX Runtime; choose one of {', '.join(ORT_PRECISIONS)}"
                + (" (bf16 runs with --engine torch)" if precision == "bf16" else ""))
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelFormatError(f"no ONNX model at {self.model_path}; create it with `dualrs-route export REF "
                                   f"--to {'int8' if precision == 'int8' else 'onnx'}`")
        self.num_classes = check_count(num_classes, "num_classes")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.batch_size = check_count(batch_size, "batch_size")
        self.precision = precision
        self.plan = choose_providers(device=device, provider=provider, precision=precision,
                                     engine_cache_dir=engine_cache_dir, input_shape=self.input_shape,
                                     max_batch=self.batch_size)
        self.session = create_session(self.model_path, self.plan, threads=threads)
        self.providers = list(self.session.get_providers())
        self.model_sha256 = sha256_file(self.model_path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelFormatError(f"{self.model_path}: expected one input and one output, got "
                                   f"{[i.name for i in inputs]} -> {[o.name for o in outputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        declared = inputs[0].shape
        if len(declared) != len(self.input_shape) + 1 or any(
                isinstance(d, int) and d != s for d, s in zip(declared[1:], self.input_shape)):
            raise ModelFormatError(f"{self.model_path}: input {self.input_name} has shape {declared} but the config "
                                   f"says [batch, {', '.join(map(str, self.input_shape))}]")
        width = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(width, int) and width != self.num_classes:
            raise ModelFormatError(f"{self.model_path}: output {outputs[0].name} has {width} classes but the config "
                                   f"says num_classes={self.num_classes}")
        if isinstance(declared[0], int) and declared[0] != 1:
            raise ModelFormatError(f"{self.model_path}: the batch axis is fixed to {declared[0]}; re-export with "
                                   "`dualrs-route export REF --to onnx` (dynamic batch)")
        self._noise = make_noise(noise, self.input_shape)
        self.noise_source = self._noise.name
        self.io_binding = bool(io_binding)
        self._fixed_batch = isinstance(declared[0], int)
        if self._fixed_batch:
            self.batch_size = 1
        self.prefetch = bool(prefetch)
        self._buffers = [np.empty((self.batch_size, *self.input_shape), dtype=np.float32)
                         for _ in range(2 if self.prefetch else 1)]
        self._logits = np.empty((self.batch_size, self.num_classes), dtype=np.float32)
        self._binding = self.session.io_binding() if self.io_binding and self.plan.required == CPU else None
        self.logit_offsets: np.ndarray | None = None

    def describe(self) -> dict:
        """What run metadata should record about this engine."""
        return {"engine": self.engine, "precision": self.precision, "model_file": self.model_path.name,
                "model_sha256": self.model_sha256, "providers": self.providers, "noise": self.noise_source,
                "prefetch": self.prefetch,
                **({"logit_offsets": self.logit_offsets.tolist()} if self.logit_offsets is not None else {})}

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 [b, num_classes] for a C-contiguous float32 batch [b, *input_shape], b <= batch_size.

        The returned array is a view of an internal buffer, overwritten by the next call.
        """
        size = len(batch)
        if self._binding is None:
            out = self.session.run([self.output_name], {self.input_name: batch})[0]
            if out.shape != (size, self.num_classes):
                raise ModelFormatError(f"{self.model_path}: output shape {list(out.shape)}, expected "
                                       f"[{size}, {self.num_classes}] (does config.json's num_classes match?)")
            return out
        binding = self._binding
        out = self._logits[:size]
        binding.bind_input(self.input_name, "cpu", 0, np.float32, list(batch.shape), batch.ctypes.data)
        binding.bind_output(self.output_name, "cpu", 0, np.float32, [size, self.num_classes], out.ctypes.data)
        self.session.run_with_iobinding(binding)
        return out

    def counts(self, x: np.ndarray, sigma: float, n: int, *, key: NoiseKey, start: int = 0) -> np.ndarray:
        return self.counts_many(np.asarray(x)[None], sigma, n, keys=[key], start=start)[0]

    def set_logit_offsets(self, offsets) -> None:
        """Add fixed per-class ``offsets`` (float32) to every logit vector before the argmax
        (a calibrated router's config ``logit_offsets``); None removes them."""
        self.logit_offsets = check_offsets(offsets, self.num_classes)

    def _noisy_batches(self, xs: np.ndarray, sigma: float, n: int, keys: Sequence[NoiseKey], start: int = 0):
        """Yield ``(segments, logits)`` per forward batch (samples [start, start + n) of each stream;
        logits with the logit offsets, if any; a view of a buffer that the next batch overwrites)."""
        plan = list(batch_segments(len(xs), n, self.batch_size, start))

        def fill(buffer, segments):
            """Write the noisy inputs of ``segments`` into ``buffer``; return the filled view."""
            batch = buffer[:sum(s1 - s0 for _, s0, s1 in segments)]
            offset = 0
            for image, s0, s1 in segments:
                self._noise.add_noise(batch[offset:offset + s1 - s0], xs[image], sigma, keys[image], s0, s1)
                offset += s1 - s0
            return batch

        def run(batch, segments):
            logits = self.logits(batch)
            if self.logit_offsets is not None:
                logits = logits + self.logit_offsets
            finite = np.isfinite(logits).all(axis=1)
            if not finite.all():
                check_finite(finite, segments, keys, self.engine)
            return logits

        if not self.prefetch or len(plan) == 1:
            for segments in plan:
                yield segments, run(fill(self._buffers[0], segments), segments)
            return
        # Double buffering: a worker thread draws batch i + 1's noise while ORT (which releases
        # the GIL) runs batch i. Each batch's contents are fixed by its keys, so results are
        # identical to the sequential loop; only the timing overlaps.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dualrs-noise") as pool:
            pending = pool.submit(fill, self._buffers[0], plan[0])
            for i, segments in enumerate(plan):
                batch = pending.result()
                if i + 1 < len(plan):
                    pending = pool.submit(fill, self._buffers[(i + 1) % 2], plan[i + 1])
                yield segments, run(batch, segments)

    def counts_many(self, xs: np.ndarray, sigma: float, n: int, *, keys: Sequence[NoiseKey],
                    start: int = 0) -> np.ndarray:
        """int64 [len(xs), num_classes]: per image, the argmax counts over its noisy samples
        [start, start + n).

        Image i's samples come from stream ``keys[i]``; the result does not depend on
        ``batch_size`` or on which images share a batch.
        """
        xs = np.ascontiguousarray(validate_request(self, xs, sigma, n, keys, start))
        k = self.num_classes
        totals = np.zeros((len(xs), k), dtype=np.int64)
        for segments, logits in self._noisy_batches(xs, sigma, n, keys, start):
            predictions = logits.argmax(axis=1)
            offset = 0
            for image, s0, s1 in segments:
                totals[image] += np.bincount(predictions[offset:offset + s1 - s0], minlength=k)[:k]
                offset += s1 - s0
        return totals

    def logits_many(self, xs: np.ndarray, sigma: float, n: int, *, keys: Sequence[NoiseKey]) -> np.ndarray:
        """float32 [len(xs), n, num_classes]: the logits behind :meth:`counts_many`, sample by sample."""
        xs = np.ascontiguousarray(validate_request(self, xs, sigma, n, keys))
        out = np.empty((len(xs), n, self.num_classes), dtype=np.float32)
        for segments, logits in self._noisy_batches(xs, sigma, n, keys):
            scatter_logits(out, segments, logits)
        return out


def make_counter(folder, *, device: str = "cpu", batch_size: int = 400, precision: str = "fp32", **options):
    """:class:`OrtCounter` for ``folder`` (a :class:`~dualrs_route.experts.folders.ModelFolder`) over
    ``model.onnx`` (``model.int8.onnx`` for int8); options ``provider``, ``threads``, ``noise``,
    ``io_binding``, ``prefetch``, ``engine_cache_dir``. The engine factory is
    :func:`dualrs_route.export.engines.make_counter`.
    """
    cfg = folder.config
    unknown = set(options) - {"provider", "threads", "noise", "io_binding", "prefetch", "engine_cache_dir"}
    if unknown:
        raise ValueError(f"unknown ONNX Runtime option(s) {sorted(unknown)}; known: provider "
                         f"({'/'.join(PROVIDER_CHOICES)}), threads, noise ({'/'.join(NOISE_SOURCES)}), io_binding, "
                         "prefetch, engine_cache_dir")
    path = model_file_for(folder.path, precision)
    if not path.is_file():
        how = "--to int8" if precision == "int8" else "--to onnx"
        raise ModelFormatError(f"{folder.reference}: --engine onnxruntime --precision {precision} needs {path.name} "
                               f"in {folder.path}; create it with `dualrs-route export {folder.reference} {how}`")
    return OrtCounter(path, num_classes=cfg.num_classes, input_shape=cfg.input_shape, device=device,
                      batch_size=batch_size, precision=precision, **options)
