"""Leases on prefill KV blocks: the table that cannot grow and cannot be read stale.

Every finished prefill registers its blocks under a lease with a fresh epoch
and a TTL. Decode must **claim** (request id, epoch) before it reads: a claim
checks the epoch and that the lease is live, and extends the lease to cover
the read (`claim_s`), so the blocks cannot be freed and reused while a READ
may still be in flight. A decode worker that has the handle but no free blocks
yet **renews** the lease (a full TTL from now) while it waits, so a queue in
decode does not turn into expired leases and re-prefills. After the read,
decode **releases** (request id, epoch) and the blocks are freed. A lease nobody
claims or renews, or whose claim ran out, is expired by `sweep` and its blocks
freed.

Why this designs out reading another request's bytes (vLLM #21570): blocks
are only ever freed by release, drop or sweep, each of which removes the lease
first; a claim against a removed or re-registered lease fails with
`LeaseExpired` (epochs never repeat within a registry, and a restarted worker
has a new NIXL agent, so old handles cannot reach it), and a live claim keeps
the sweeper away until the read is bounded to have ended.

The registry is bounded (`max_leases`): at the bound `register` raises
`TransferBackpressure` instead of growing. Not thread-safe by itself: its one
owner is `transfer.sender.KVSender`, on the prefill engine thread.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from transfer.handle import LeaseExpired, TransferBackpressure


@dataclass
class Lease:
    request_id: str
    epoch: int
    blocks: list[int]
    expires: float  # time.monotonic()
    claimed: bool = False


class LeaseRegistry:
    def __init__(self, max_leases: int, ttl_s: float, claim_s: float):
        self.max_leases = max_leases
        self.ttl_s = ttl_s
        self.claim_s = claim_s
        self._leases: dict[str, Lease] = {}
        # Epochs start from the clock so they also differ across process incarnations.
        self._epochs = itertools.count(time.time_ns())
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def pinned_blocks(self) -> int:
        return sum(len(lease.blocks) for lease in self._leases.values())

    def ids(self) -> list[str]:
        return list(self._leases)

    def register(self, request_id: str, blocks: list[int], ttl_s: float | None = None) -> Lease:
        if request_id in self._leases:
            raise ValueError(f"lease for {request_id} already exists")
        if len(self._leases) >= self.max_leases:
            raise TransferBackpressure(
                f"{len(self._leases)} leases held (max_pending); retry later"
            )
        lease = Lease(
            request_id,
            next(self._epochs),
            list(blocks),
            time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s),
        )
        self._leases[request_id] = lease
        return lease

    def claim(self, request_id: str, epoch: int, now: float | None = None) -> list[int]:
        """Check (id, epoch) names a live lease and hold it for one read."""
        now = time.monotonic() if now is None else now
        lease = self._live(request_id, epoch, now)
        lease.claimed = True
        lease.expires = max(lease.expires, now + self.claim_s)
        return list(lease.blocks)

    def renew(self, request_id: str, epoch: int, now: float | None = None) -> float:
        """Decode still wants (id, epoch) and waits for room to pull it: push its
        expiry to a full TTL from now. Returns the seconds it has left; raises
        LeaseExpired as `claim` does. Only a live waiter renews, so a lease whose
        decode side died still expires one TTL after its last renewal."""
        now = time.monotonic() if now is None else now
        lease = self._live(request_id, epoch, now)
        lease.expires = max(lease.expires, now + self.ttl_s)
        return lease.expires - now

    def _live(self, request_id: str, epoch: int, now: float) -> Lease:
        lease = self._leases.get(request_id)
        if lease is None or lease.epoch != epoch:
            raise LeaseExpired(
                f"no live lease for {request_id} epoch {epoch} "
                "(expired, released, or never registered here)"
            )
        if lease.expires <= now:
            raise LeaseExpired(
                f"lease for {request_id} epoch {epoch} expired {now - lease.expires:.3f}s ago"
            )
        if lease.claimed:
            raise LeaseExpired(f"lease for {request_id} epoch {epoch} is already claimed")
        return lease

    def release(self, request_id: str, epoch: int | None = None) -> list[int] | None:
        """Remove the lease (when the epoch matches, if given); return its blocks to free."""
        lease = self._leases.get(request_id)
        if lease is None or (epoch is not None and lease.epoch != epoch):
            return None
        del self._leases[request_id]
        return lease.blocks

    def sweep(self, now: float | None = None) -> list[Lease]:
        """Remove and return every lease past its expiry."""
        now = time.monotonic() if now is None else now
        dead = [lease for lease in self._leases.values() if lease.expires <= now]
        for lease in dead:
            del self._leases[lease.request_id]
        self.expired_total += len(dead)
        return dead
