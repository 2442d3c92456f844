"""Reproducible Gaussian noise keyed by (seed, example index, stage).

Every noisy sample is a pure function of its key and its sample number: sample
``s`` of a stream comes from block ``s // BLOCK``, whose generator is seeded from
(seed, index, stage, block). A certificate therefore does not depend on the batch
size, on how many images share a batch, on sharding or on a resumed run.

The torch streams differ between device types (a CPU and a CUDA generator give
different numbers for the same seed), so results are reproducible per
(seed, device type, engine noise source).
"""

from __future__ import annotations

import contextlib
import enum
import threading
from dataclasses import dataclass

import numpy as np

BLOCK = 50
"""Samples per independently seeded noise block. N0 = 100, N = 1e3..1e5 and batch sizes
of 100-400 are multiples of it, so no block is drawn twice."""


class Stage(enum.IntEnum):
    """Which draw a noise stream feeds. Distinct stages give independent streams."""

    EXPERT_SELECT = 0
    EXPERT_ESTIMATE = 1
    ROUTER_SELECT = 2
    ROUTER_ESTIMATE = 3
    EXPERT_PREDICT = 4
    ROUTER_PREDICT = 5
    LABEL_SELECT = 6
    LABEL_ESTIMATE = 7


@dataclass(frozen=True)
class NoiseKey:
    """Identifies one noise stream: the run seed, the example index and the stage."""

    seed: int
    index: int
    stage: Stage

    def block_seed(self, block: int) -> int:
        """63-bit generator seed of block ``block`` of this stream."""
        if self.seed < 0 or self.index < 0 or block < 0:
            raise ValueError(f"seed, index and block must be >= 0, got {self}, block={block}")
        state = np.random.SeedSequence(
            entropy=int(self.seed), spawn_key=(int(self.index), int(self.stage), int(block))
        ).generate_state(2, dtype=np.uint32)
        return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def blocks_for(start: int, stop: int) -> range:
    """Block numbers that cover samples [start, stop)."""
    return range(start // BLOCK, (stop - 1) // BLOCK + 1) if stop > start else range(0)


def block_pieces(start: int, stop: int):
    """Yield ``(block, lo, hi)``: samples [start, stop) are rows lo..hi-1 of each covering block, in order."""
    for block in blocks_for(start, stop):
        yield block, max(start, block * BLOCK) - block * BLOCK, min(stop, (block + 1) * BLOCK) - block * BLOCK


DEFAULT_SHARE_BYTES = 1 << 30
"""Default memory for the unit-noise blocks one example keeps for reuse (:func:`sharing`): 1 GiB, a CIFAR-10
router stage of about 87,000 samples."""


class BlockCache:
    """Unit-noise blocks drawn while it is active, kept for a second reader of the same stream.

    Keyed by (source, device, seed, index, stage, block, shape); holds at most ``max_bytes`` (later blocks
    are drawn again, never dropped from the results: a block's values do not depend on the cache). One
    lock, because ONNX Runtime draws its noise on a prefetch thread. ``hits``/``misses`` count blocks."""

    def __init__(self, max_bytes: int = DEFAULT_SHARE_BYTES):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._blocks: dict = {}
        self._lock = threading.Lock()

    def get(self, tag: tuple):
        with self._lock:
            value = self._blocks.get(tag)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def release(self) -> None:
        """Drop the kept blocks (the counts and ``bytes``, the most held, stay for reports)."""
        with self._lock:
            self._blocks.clear()

    def put(self, tag: tuple, value, nbytes: int) -> bool:
        """Keep ``value`` if it fits; return whether it was kept (the caller then must not modify it)."""
        with self._lock:
            if tag in self._blocks or self.bytes + nbytes > self.max_bytes:
                return False
            self._blocks[tag] = value
            self.bytes += nbytes
            return True


_active: BlockCache | None = None


@contextlib.contextmanager
def sharing(max_bytes: int = DEFAULT_SHARE_BYTES):
    """Within this block, every unit-noise block drawn (torch or numpy source) is kept in a
    :class:`BlockCache` (yielded) and a later draw of the same block copies it instead of drawing it
    again. Results are unchanged: a block's values are a pure function of its key. Not nestable."""
    global _active
    if _active is not None:
        raise RuntimeError("noise sharing is already active")
    cache = _active = BlockCache(max_bytes)
    try:
        yield cache
    finally:
        _active = None
        cache.release()


def numpy_block(key: NoiseKey, block: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 noise of block ``block``: shape [BLOCK, *shape], from numpy's PCG64.

    Used by engines that run without torch. Not the same numbers as the torch streams. Inside
    :func:`sharing`, a block drawn before is returned from the cache (do not modify the result).
    """
    cache = _active
    if cache is not None:
        tag = ("numpy", key.seed, key.index, int(key.stage), block, tuple(shape))
        kept = cache.get(tag)
        if kept is not None:
            return kept
    rng = np.random.Generator(np.random.PCG64(key.block_seed(block)))
    value = rng.standard_normal((BLOCK, *shape), dtype=np.float32)
    if cache is not None:
        cache.put(tag, value, value.nbytes)
    return value


def numpy_noise(key: NoiseKey, start: int, stop: int, shape: tuple[int, ...]) -> np.ndarray:
    """Samples [start, stop) of the numpy stream for ``key``: float32 [stop - start, *shape]."""
    parts = []
    for b, lo, hi in block_pieces(start, stop):
        parts.append(numpy_block(key, b, shape)[lo:hi])
    if not parts:
        return np.zeros((0, *shape), dtype=np.float32)
    return np.concatenate(parts, axis=0)


def fill_torch_noise(out, generator, key: NoiseKey, s0: int, s1: int) -> None:
    """Write samples [s0, s1) of the torch stream for ``key`` into ``out`` (float32 torch tensor
    [s1 - s0, *shape] on the generator's device). Each block is re-seeded from ``key``, so a
    sample's value does not depend on which call or batch draws it."""
    import torch

    cache = _active
    offset = 0
    for block, lo, hi in block_pieces(s0, s1):
        kept = tag = None
        if cache is not None:
            tag = ("torch", str(out.device), key.seed, key.index, int(key.stage), block, tuple(out.shape[1:]))
            kept = cache.get(tag)
        if kept is not None:
            out[offset:offset + hi - lo].copy_(kept[lo:hi])
        else:
            generator.manual_seed(key.block_seed(block))
            if lo == 0 and hi == BLOCK and cache is None:
                target = out[offset:offset + BLOCK]
                torch.randn(target.shape, generator=generator, device=out.device, out=target)
            else:
                full = torch.randn((BLOCK, *out.shape[1:]), generator=generator, device=out.device)
                out[offset:offset + hi - lo].copy_(full[lo:hi])
                if cache is not None:
                    cache.put(tag, full, full.numel() * full.element_size())
        offset += hi - lo
