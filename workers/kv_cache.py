"""Paged KV cache: one preallocated pool per rank and a block manager over it."""

from __future__ import annotations

import threading
from collections import deque

import torch


class NoFreeBlocks(Exception):
    """Not enough free KV blocks right now; callers queue or preempt, never crash."""


def allocate_pool(
    num_blocks: int,
    num_layers: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> torch.Tensor:
    """Block-major pool [blocks, layers, 2 (k/v), block_size, kv_heads, head_dim].

    Block-major so that a request's block is one contiguous region: a transfer
    moves one descriptor per block, and adjacent blocks merge into one.
    """
    return torch.zeros(
        num_blocks, num_layers, 2, block_size, kv_heads, head_dim, dtype=dtype, device=device
    )


class BlockManager:
    """Explicit allocate/free of block ids with counts tests can read. Thread-safe."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise NoFreeBlocks(f"need {n} KV blocks, {len(self._free)} free")
            ids = [self._free.popleft() for _ in range(n)]
            self._used.update(ids)
            return ids

    def free(self, ids: list[int]) -> None:
        with self._lock:
            bad = [i for i in ids if i not in self._used]
            if bad:
                raise ValueError(f"freeing KV blocks that are not allocated: {bad[:8]}")
            self._used.difference_update(ids)
            self._free.extend(ids)
