"""Shards: the K-th of N disjoint parts of a run's selected examples (``--shard K/N``).

Shard K (1-based, 1 <= K <= N) takes the selected examples (after ``--skip``/``--max``) at
positions K-1, K-1+N, K-1+2N, ... of the selection: **round-robin**, not contiguous blocks.
Data sets are often stored in an order that correlates with cost (sorted by class, or by
source); round-robin gives every shard the same mix, so the parts finish at about the same
time, and the N shards of a selection are disjoint and cover it exactly.

A result row does not depend on its shard: each example's noise is keyed by (seed, example
index, stage), so ``merge`` of the N parts equals the unsharded run row for row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (1-based)."""

    index: int
    count: int

    def __post_init__(self):
        if not (1 <= self.index <= self.count):
            raise ValueError(f"--shard must be K/N with 1 <= K <= N, got {self.index}/{self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, indices: Sequence[int]) -> list[int]:
        """This shard's share of ``indices``: every ``count``-th item from position ``index - 1``."""
        return list(indices)[self.index - 1::self.count]


def parse_shard(text: str | None) -> Shard | None:
    """``"K/N"`` -> Shard(K, N); None -> None. ValueError (one line) for anything else."""
    if text is None:
        return None
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"--shard must be K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def shard_of(settings: dict) -> Shard | None:
    """The shard recorded in a run's settings (``"shard": "K/N"``), or None for an unsharded run."""
    return parse_shard(settings.get("shard"))
