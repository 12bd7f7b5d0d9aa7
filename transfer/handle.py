"""What a finished prefill hands to decode: where a request's KV blocks live.

A `KVHandle` travels prefill -> router -> decode as a plain msgspec struct, so it
pickles through Ray and carries everything decode needs to pull the blocks
(including the prefill agent's NIXL metadata: no extra round trip).
"""

from __future__ import annotations

import msgspec


class TransferError(Exception):
    """Base of every transfer failure. Holds only a message so it pickles across Ray."""


class TransferTimeout(TransferError):
    """A pull did not complete before its deadline (peer stalled, slow or unreachable)."""


class TransferFailed(TransferError):
    """A pull ended in an error: peer gone, bad metadata, NIXL/UCX error."""


class ReadStuck(TransferFailed):
    """A READ that ended badly could not be released: NIXL may still write the local
    blocks it targeted. They must stay out of use until the backend's
    `release_stuck()` returns the pull's tag (or the process ends)."""


class ReadLate(TransferTimeout):
    """A READ given up at its deadline while still in flight. NIXL let it go, but the
    transport may still write its data into the local blocks: over TCP, the peer's
    retransmission lands once a partition heals (seen on the testbed, seconds later).
    The blocks stay out of use until the backend's `release_stuck()` returns the pull's
    tag, once no write can come any more (`until`, this process's monotonic clock: the
    READ's start + `NixlTransferAgent.late_write_s`)."""

    until: float = 0.0


class LeaseExpired(TransferError):
    """The prefill side's lease on the blocks ran out before decode pulled them."""


class TransferBackpressure(TransferError):
    """The prefill side holds `max_pending` leases: back off or go elsewhere."""


class RankKV(msgspec.Struct, frozen=True):
    """One tensor-parallel rank's share of a request's KV, in that rank's pool."""

    agent_name: str  # NIXL agent of the prefill rank; unique per process incarnation
    agent_metadata: bytes  # lets decode handshake without another round trip
    base_addr: int  # address of the registered pool tensor
    num_blocks: int  # blocks in the remote pool
    block_bytes: int  # pool is block-major: block i = base_addr + i * block_bytes
    device_id: int  # 0 for DRAM
    mem_type: str  # "DRAM" or "VRAM"
    block_ids: list[int]  # the request's blocks in that pool, in sequence order
    object_ref: object = None  # Ray object store backend: the blocks' bytes (ObjectRef)
    # One block's tensor shape (the pool's dims after the first): blocks of equal size but
    # another layout (another pdcluster version) must not be copied as if they matched.
    block_shape: list[int] = []


def check_blocks_match(
    src: RankKV, local_block_ids: list[int], block_bytes: int, block_shape: tuple[int, ...]
) -> None:
    """Refuse a pull whose blocks do not fit ours one for one: a count that differs is
    a caller's bug (ValueError); blocks of another size or layout, a peer that cannot be
    pulled from (TransferFailed: the router re-prefills on another replica, which in a
    mixed-version roll-out may run ours)."""
    if len(local_block_ids) != len(src.block_ids):
        raise ValueError(
            f"{len(local_block_ids)} local blocks for {len(src.block_ids)} remote blocks"
        )
    if src.block_bytes != block_bytes or list(src.block_shape) != list(block_shape):
        raise TransferFailed(
            f"{src.agent_name}'s block is {list(src.block_shape)} ({src.block_bytes} bytes), "
            f"ours {list(block_shape)} ({block_bytes} bytes): prefill and decode must run "
            "the same model, dtype, tensor parallelism and pdcluster version"
        )


class KVHandle(msgspec.Struct, frozen=True):
    """A request's prefilled KV: per-rank block locations plus lease fields."""

    request_id: str
    backend: str  # "nixl"
    num_tokens: int  # tokens whose KV is in the blocks
    ranks: list[RankKV]  # index = TP rank
    epoch: int = 0  # lease epoch, checked on both sides (lease issue)
    # Seconds the lease had left when the handle was made (0 = none). A duration, not a
    # time stamp: clocks of different nodes are never compared; each side reads its own
    # monotonic clock.
    ttl_s: float = 0.0
