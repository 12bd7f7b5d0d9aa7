"""One pulled request's KV on decode, from admission to release: one object.

A `Pull` waits (in order, `Engine.admit_pulls`) for the blocks the engine gives it,
renewing the prefill lease meanwhile; claims the lease; READs every rank's shard into
the blocks; then gives the blocks back to the engine exactly once (`pull_done`, in a
`finally`: into the batch on success, back to the pool otherwise, or held while a READ
may still write them) and releases the lease exactly once (unless NIXL's completion
notification releases it on prefill). vLLM v1 keeps a request "waiting for remote KV"
in its scheduler and the transfer in its connector's worker half; here both halves of
one transfer are this class, on the decode worker's event loop.

Torch- and NIXL-free: the router imports the decode worker's module to hold handles.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import TYPE_CHECKING

import ray

from transfer.handle import (
    KVHandle,
    LeaseExpired,
    RankKV,
    ReadLate,
    ReadStuck,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from wire.api import XFER_BUCKETS, time_left

if TYPE_CHECKING:
    from workers.decode_worker import DecodeWorker

# A READ that ended so: its blocks are held until the backend's `release_stuck` names it.
HELD = (ReadStuck, ReadLate)

# How long past its deadline a pull waits for its READs to end before giving up on
# them (their blocks then stay held until they do end).
PULL_GRACE_S = 2.0


async def ask(ref, what: str, timeout: float | None = None):
    """Await a call to another worker on a transfer's path: its own transfer errors pass
    through; no answer within `timeout` is TransferTimeout; the actor gone or failing is
    TransferFailed (the router re-prefills elsewhere, as for any transfer failure,
    rather than taking it for a lost decode)."""
    try:
        return await asyncio.wait_for(ref, timeout)
    except (asyncio.TimeoutError, TimeoutError):
        raise TransferTimeout(f"{what} not answered in {timeout:.1f}s") from None
    except TransferError:
        raise
    except ray.exceptions.RayError as e:
        raise TransferFailed(f"{what} failed ({type(e).__name__})") from None


class Pull:
    """The KV of request `request_id` (lease `handle`, held by the prefill actor
    `prefill`, or None when the handle needs no lease) into this decode worker."""

    def __init__(
        self,
        worker: DecodeWorker,
        request_id: str,
        handle: KVHandle,
        prefill,
        deadline: float,
        lease_expires: float,
    ):
        self.w = worker
        self.request_id = request_id
        self.handle = handle
        self.prefill = prefill
        self.deadline = deadline  # the request's, on this process's monotonic clock
        self.lease_expires = lease_expires  # the lease's, on the same clock (at most)
        # Set by the worker's event loop with the blocks the engine gives (`_blocks_ready`),
        # or with the request's end when it ends first (`_end`).
        self.blocks = worker.loop.create_future()
        self.writers = 0  # what may still write the blocks when the pull gives up
        self._lease_released = False
        self._handed_back = False

    # ---- the whole life -------------------------------------------------------

    async def run(self, ended: asyncio.Future) -> None:
        """Returns once the KV is in the blocks (the sequence is in the batch); raises
        otherwise (TimeoutError at the deadline, a TransferError for the router to
        re-prefill). `ended` is the request's end (aborted, channel closed): then no
        READ starts. The READ, once started, runs to its end even if this is
        cancelled: the blocks go back only when nothing can write them."""
        blocks = None
        try:
            blocks = await self._await_blocks()
        finally:
            if blocks is None:  # no READ will start
                self._release_lease()
                if not self.blocks.done():
                    self.blocks.cancel()  # blocks given from now on go straight back
                elif not self.blocks.cancelled() and self.blocks.exception() is None:
                    self._hand_back(ok=False)  # given while this wait was ending
        if ended.done():
            self._hand_back(ok=False)
            self._release_lease()
            return
        await asyncio.shield(asyncio.ensure_future(self._transfer(blocks)))

    async def _transfer(self, blocks: list[int]) -> None:
        ok = False
        try:
            await self._claim_and_read(blocks)
            ok = True
        finally:
            self._hand_back(ok)
            # One rank with NIXL: prefill releases the lease when NIXL tells it the READ
            # is done. Otherwise (failure, several ranks, the object store) decode does.
            if not ok or not self._notified:
                self._release_lease()

    def _hand_back(self, ok: bool) -> None:
        """The blocks go back to the engine, once: into the batch, to the pool, or held."""
        if self._handed_back:
            return
        self._handed_back = True
        rid, writers = self.request_id, self.writers
        self.w.thread.call(lambda: self.w.engine.pull_done(rid, ok, writers))

    def _release_lease(self) -> None:
        if self._lease_released or self.prefill is None:
            return
        self._lease_released = True
        self.prefill.release.remote(self.handle.request_id, self.handle.epoch)

    # ---- waiting for blocks -----------------------------------------------------

    async def _await_blocks(self) -> list[int]:
        """The blocks the engine gives, awaited until the request's deadline. Meanwhile
        the prefill lease is renewed each time half of what it has left has passed, so
        a queue here never expires it; a renewal may take until the lease's known
        expiry to be answered (prefill answers between steps), and blocks given
        meanwhile are taken at once. Without a prefill actor to renew with, the
        lease's expiry bounds the wait. A renewal's answer (time left) counts from
        when it was asked, so a slow answer errs early. Raises TimeoutError at the
        deadline, LeaseExpired when the lease ran out or was refused renewal,
        TransferTimeout / TransferFailed when prefill did not answer or is gone."""
        got, rid, what = self.blocks, self.handle.request_id, f"request {self.request_id}"
        expires = self.lease_expires
        while True:
            now = time.monotonic()
            time_left(self.deadline, what)
            if self.prefill is None:
                wake = min(self.deadline, expires)
            else:
                wake = min(self.deadline, now + max(0.0, expires - now) / 2)
            await asyncio.wait([got], timeout=max(0.0, wake - now))
            if got.done():
                return got.result()
            time_left(self.deadline, what)
            if self.prefill is None:
                raise LeaseExpired(
                    f"the prefill lease of {rid} expired before KV blocks were free here"
                )
            asked = time.monotonic()
            renewal = asyncio.ensure_future(
                ask(self.prefill.renew.remote(rid, self.handle.epoch), f"renewal of {rid}")
            )
            renewal.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
            try:
                await asyncio.wait(
                    [got, renewal],
                    timeout=max(0.0, min(self.deadline, expires) - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if got.done():
                    return got.result()
                time_left(self.deadline, what)
                if not renewal.done():
                    raise TransferTimeout(
                        f"renewal of {rid}'s lease not answered before it expired"
                    )
                expires = asked + renewal.result()  # raises what the renewal raised
                self.w.transfer_counts["renewals"] += 1
            finally:
                renewal.cancel()  # nothing once it is done

    # ---- claim and READ ---------------------------------------------------------

    @property
    def _notified(self) -> bool:
        """Prefill learns of the READ's end from NIXL itself (one rank, NIXL backend)."""
        return self.handle.backend != "ray" and self.w.agent.notifies and self.w.spec.tp_size == 1

    async def _claim_and_read(self, blocks: list[int]) -> None:
        """Claim the lease (bounded), READ the blocks on every rank (bounded), count
        it. The claim's answer must name exactly the handle's blocks: the epoch check
        on both sides means a stale handle fails here, before any read. Claim and
        READs share one `transfer_timeout_s` deadline; every wait takes what is left
        of it and fails as TransferTimeout when nothing is."""
        w, handle = self.w, self.handle
        timeout = w.spec.transfer_timeout_s
        rid, src = handle.request_id, handle.ranks[0]
        t0 = time.monotonic()
        end = min(t0 + timeout, self.deadline)  # nor past the request's own deadline

        def left() -> float:
            return end - time.monotonic()

        w.transfers_pending += 1
        try:
            if self.prefill is not None:
                claim = self.prefill.claim.remote(rid, handle.epoch)
                claimed = await ask(claim, f"claim of {rid}", timeout)
                if claimed != src.block_ids:
                    raise TransferFailed(
                        f"lease of {rid} epoch {handle.epoch} names other "
                        "blocks than the handle; refusing to read"
                    )
            backend = w.ray_backend if handle.backend == "ray" else w.agent
            notif = f"{rid}:{handle.epoch}".encode() if self._notified else b""
            faults = w.faults  # read once: set_faults may swap it meanwhile
            # A connection to this peer being made by another pull is waited for here, off
            # the pull threads: pulls from an unreachable peer do not take them all.
            connecting = backend.connecting(src)
            while connecting is not None and not connecting.is_set() and left() > 0:
                await asyncio.sleep(min(0.01, left()))

            def read() -> int:  # a pull thread
                if faults is not None:
                    faults.before_pull(left())
                if left() <= 0:
                    raise TransferTimeout(f"pull of {rid}: nothing left of its {timeout}s")
                return backend.pull(src, blocks, timeout_s=left(), notif=notif, tag=self.request_id)

            jobs = [w.loop.run_in_executor(w.pull_threads, read)] + [
                asyncio.ensure_future(self._read_rank(f, shard, blocks, left()))
                for f, shard in zip(w.followers(), handle.ranks[1:])
            ]
            # Every rank's READ must have ended before anything may free the blocks. Each
            # bounds itself by the deadline; one that has not ended a grace period after
            # it (a handshake blocked on a peer that drops packets) is given up on here,
            # and the blocks stay held until it ends (`_hold`).
            _, late = await asyncio.wait(jobs, timeout=max(0.0, left()) + PULL_GRACE_S)
            results = [j.exception() or j.result() for j in jobs if j.done()]
            stuck = [r for r in results if isinstance(r, HELD)]
            if late or stuck:
                self._hold(late, stuck)
                if late:
                    raise TransferTimeout(
                        f"pull of {rid}: {len(late)} READ(s) still running "
                        f"{PULL_GRACE_S}s past the {timeout}s deadline"
                    )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        except TransferError as e:
            w.transfer_counts["timeouts" if isinstance(e, TransferTimeout) else "failures"] += 1
            raise
        finally:
            w.transfers_pending -= 1
        dt = time.monotonic() - t0
        counts = w.transfer_counts
        counts["count"] += 1
        counts["bytes"] += sum(results)
        counts["seconds"] += dt
        counts["buckets"][bisect.bisect_left(XFER_BUCKETS, dt)] += 1

    def _hold(self, late: set[asyncio.Future], stuck: list[TransferError]) -> None:
        """The pull ends while its blocks may still be written: by READs given up in
        flight or that NIXL would not release (`stuck`: each a writer until
        `release_stuck` returns this request's tag, on the engine thread) and by jobs
        still running (`late`: a writer until it ends, unless it ends held)."""
        w, rid = self.w, self.request_id
        self.writers = len(late) + len(stuck)

        def ended(job: asyncio.Future) -> None:
            e = None if job.cancelled() else job.exception()
            if not isinstance(e, HELD):  # a held one ends in `release_stuck`
                w.thread.call(lambda: w.engine.writer_done(rid))

        for job in late:
            job.add_done_callback(ended)

    @staticmethod
    async def _read_rank(follower, shard: RankKV, blocks: list[int], timeout: float) -> int:
        """Rank r of this group READs rank r's shard. The rank bounds its own READ by
        this absolute deadline (same node: one monotonic clock), so a call that starts
        late, queued behind others, reads nothing after this side has given up. The
        call itself is not timed out here: until it answers (or its process dies) the
        rank may still be writing, and the caller holds the blocks meanwhile."""
        if timeout <= 0:
            raise TransferTimeout(f"no time left to pull from {shard.agent_name}")
        ref = follower.pull.remote(shard, blocks, time.monotonic() + timeout)
        return await ask(ref, f"rank pull from {shard.agent_name}")
