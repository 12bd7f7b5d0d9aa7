"""Paged KV cache: one preallocated pool per rank and a block manager over it."""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict, deque

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
    """Block-major pool [blocks, layers, 2 (k/v), kv_heads, block_size, head_dim].

    Block-major so that a request's block is one contiguous region: a transfer
    moves one descriptor per block, and adjacent blocks merge into one. Inside a
    block, head-major: one head's K (or V) of one layer is one contiguous
    [block_size, head_dim] run, so attention gathers a sequence's keys straight
    into the [kv_heads, tokens, head_dim] layout it reads (workers/model.py).
    """
    return torch.zeros(
        num_blocks, num_layers, 2, kv_heads, block_size, head_dim, dtype=dtype, device=device
    )


class BlockManager:
    """Explicit allocate/free of block ids with counts tests can read. Thread-safe.

    With `caching` (automatic prefix caching, as vLLM's): a full block whose KV was
    computed can be registered under a hash of its tokens and of every token before
    it (a SHA-256 chain). Blocks are reference-counted: a new prompt takes references
    on the cached blocks of its longest cached prefix (`match`). A block whose last
    reference goes keeps its KV and its hash, evictable, least recently used first:
    `allocate` takes never-used blocks first, then evicts. So cached blocks count as
    free (`num_free`) and never make a request wait; `num_used` counts only blocks
    that requests hold, and `num_cached` the evictable ones.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs: dict[int, int] = {}  # held blocks -> references
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unheld, with KV; LRU first
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Blocks no request holds that keep reusable KV (evicted as needed)."""
        return len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > self.num_free:
                raise NoFreeBlocks(f"need {n} KV blocks, {self.num_free} free")
            ids = []
            for _ in range(n):
                if self._free:
                    i = self._free.popleft()
                else:  # the least recently used cached block loses its KV
                    i, _ = self._evictable.popitem(last=False)
                    del self._by_hash[self._hash_of.pop(i)]
                self._refs[i] = 1
                ids.append(i)
            return ids

    def share(self, ids: list[int]) -> None:
        """One more reference on each held block (a forked sequence shares them)."""
        with self._lock:
            bad = [i for i in ids if i not in self._refs]
            if bad:
                raise ValueError(f"sharing KV blocks that are not allocated: {bad[:8]}")
            for i in ids:
                self._refs[i] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference on each block; a block left unheld is free again (kept
        as evictable cache while it has a hash)."""
        with self._lock:
            bad = [i for i in ids if i not in self._refs]
            if bad:
                raise ValueError(f"freeing KV blocks that are not allocated: {bad[:8]}")
            # Last block first: of a freed prompt, its tail is evicted before its head
            # (a chain is matched from its start, so the head is worth the most).
            for i in reversed(ids):
                self._refs[i] -= 1
                if self._refs[i] == 0:
                    del self._refs[i]
                    if i in self._hash_of:
                        self._evictable[i] = None  # most recently used last
                    else:
                        self._free.append(i)

    # ---- prefix caching ----------------------------------------------------

    def prefix_hashes(
        self, token_ids: list[int], num_blocks: int, salt: str | None = None
    ) -> list[bytes]:
        """The chained hashes of the first `num_blocks` full blocks of `token_ids`. A
        salt enters the first block's hash, so it changes every hash of the chain:
        prompts under different salts never share a cached block."""
        out, bs = [], self.block_size
        prev = b"" if salt is None else hashlib.sha256(b"salt:" + salt.encode()).digest()
        for j in range(num_blocks):
            block = array("q", token_ids[j * bs : (j + 1) * bs]).tobytes()
            prev = hashlib.sha256(prev + block).digest()
            out.append(prev)
        return out

    def match(self, hashes: list[bytes]) -> list[int]:
        """Referenced block ids of the longest cached run at the start of `hashes`."""
        ids = []
        with self._lock:
            for h in hashes:
                i = self._by_hash.get(h)
                if i is None:
                    break
                if i in self._refs:
                    self._refs[i] += 1
                else:
                    del self._evictable[i]
                    self._refs[i] = 1
                ids.append(i)
        return ids

    def register(self, block_id: int, h: bytes) -> None:
        """Block `block_id` (held) now has the KV that hash `h` names. A hash already
        cached in another block keeps that block (two requests computed it at once)."""
        with self._lock:
            if h in self._by_hash or block_id in self._hash_of:
                return
            self._hash_of[block_id] = h
            self._by_hash[h] = block_id
