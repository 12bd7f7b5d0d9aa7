"""The sending side of KV transfer (prefill): one owner for leases and their blocks.

A finished prefill hands its blocks to `KVSender.register`, which puts them under a
lease and returns the `KVHandle` decode pulls with. From then on the sender owns
those blocks: it gives them back (through `free`) exactly once, when the lease is
released (decode's NIXL notification, decode's explicit release, the router's
backstop), or expired by `tick`'s sweep. Registration, claims, releases,
notifications and the sweep all run on one thread (the prefill engine thread) and
use one clock (`time.monotonic`; the handle carries the lease's time left, a duration)
and one bound (`max_pending` leases: past it `register` raises
`TransferBackpressure` and frees the blocks it was given).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from transfer.backend import RayObjectBackend, TransferBackend
from transfer.faults import FaultInjector
from transfer.handle import KVHandle, RankKV, TransferBackpressure
from transfer.lease import LeaseRegistry


class KVSender:
    def __init__(
        self,
        backend: TransferBackend,
        free: Callable[[list[int]], None],
        *,
        max_pending: int,
        lease_ttl_s: float,
        claim_s: float,
        describe: Callable[[list[int]], list[RankKV]] | None = None,
        faults: FaultInjector | None = None,
    ):
        """`free` returns blocks to the pool; `describe` gives every TP rank's share
        of a block list (default: this rank's alone); `claim_s` is how long a claim
        holds a lease (the longest a READ can take)."""
        self.backend = backend
        self._free = free
        self._describe = describe or (lambda ids: [backend.rank_kv(ids)])
        self.faults = faults  # chaos hooks; swapped at run time by set_faults
        self.leases = LeaseRegistry(max_pending, lease_ttl_s, claim_s)
        self._kind = "ray" if isinstance(backend, RayObjectBackend) else "nixl"

    def __len__(self) -> int:
        return len(self.leases)

    @property
    def pinned_blocks(self) -> int:
        return self.leases.pinned_blocks

    @property
    def expired_total(self) -> int:
        return self.leases.expired_total

    def register(self, request_id: str, blocks: list[int], num_tokens: int) -> KVHandle:
        """Pin `blocks` (the caller's no longer) under a fresh lease; the handle for decode.
        A lease left under the same id by an earlier attempt is released first."""
        self.release(request_id)
        faults = self.faults  # read once: set_faults may swap it meanwhile
        ttl = self.leases.ttl_s if faults is None else faults.lease_ttl(self.leases.ttl_s)
        try:
            lease = self.leases.register(request_id, blocks, ttl)
        except TransferBackpressure:
            self._free(blocks)
            raise
        return KVHandle(
            request_id=request_id,
            backend=self._kind,
            num_tokens=num_tokens,
            ranks=self._describe(blocks),
            epoch=lease.epoch,
            ttl_s=lease.expires - time.monotonic(),
        )

    def claim(self, request_id: str, epoch: int) -> list[int]:
        """Decode asks before it reads; raises LeaseExpired unless (id, epoch) is live."""
        return self.leases.claim(request_id, epoch)

    def renew(self, request_id: str, epoch: int) -> float:
        """Decode waits for room to pull: a full TTL from now; the seconds left."""
        return self.leases.renew(request_id, epoch)

    def release(self, request_id: str, epoch: int | None = None) -> bool:
        """Drop the lease (that epoch's, if given) and free its blocks; idempotent."""
        blocks = self.leases.release(request_id, epoch)
        if blocks is None:
            return False
        self._free(blocks)
        return True

    def tick(self) -> None:
        """Completed READs (NIXL notifies "<id>:<epoch>") release their leases; leases
        past their expiry are swept."""
        for msg in self.backend.poll_notifs():
            rid, _, epoch = msg.decode().rpartition(":")
            if epoch.isdigit():
                self.release(rid, int(epoch))
        for lease in self.leases.sweep():
            self._free(lease.blocks)

    def release_all(self) -> None:
        for rid in list(self.leases.ids()):
            self.release(rid)
