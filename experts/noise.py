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

import enum
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


def numpy_block(key: NoiseKey, block: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 noise of block ``block``: shape [BLOCK, *shape], from numpy's PCG64.

    Used by engines that run without torch. Not the same numbers as the torch streams.
    """
    rng = np.random.Generator(np.random.PCG64(key.block_seed(block)))
    return rng.standard_normal((BLOCK, *shape), dtype=np.float32)


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

    offset = 0
    for block, lo, hi in block_pieces(s0, s1):
        generator.manual_seed(key.block_seed(block))
        if lo == 0 and hi == BLOCK:
            target = out[offset:offset + BLOCK]
            torch.randn(target.shape, generator=generator, device=out.device, out=target)
        else:
            full = torch.randn((BLOCK, *out.shape[1:]), generator=generator, device=out.device)
            out[offset:offset + hi - lo].copy_(full[lo:hi])
        offset += hi - lo
