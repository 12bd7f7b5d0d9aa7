"""The decode worker: pulls a request's KV from prefill into its own blocks and
decodes it in the running batch; tokens go out on the router's output channel.

Blocks for a pull are the engine's to give (`Engine.add_pulled` /
`admit_pulls`: requests wait for them in order, and the engine thread sleeps
meanwhile) and the engine's to take back (`pull_done`, called when the transfer
has ended on every rank, whatever happened to the request meanwhile)."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import ray

from transfer.handle import (
    KVHandle,
    LeaseExpired,
    RankKV,
    ReadStuck,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from workers.api import (
    XFER_BUCKETS,
    DecodeStats,
    SequenceFailed,
    TransferStats,
    WorkerError,
    process_usage,
)
from workers.leader import GroupLeader
from workers.sampling_params import SamplingParams
from workers.sequence import Sequence

if TYPE_CHECKING:
    from workers.engine import StepOutput


# How long past its deadline a pull waits for its READs to end before giving up on
# them (their blocks then stay held until they do end).
PULL_GRACE_S = 2.0


def _left(deadline: float, rid: str) -> float:
    """Seconds left before the request's (wall-clock) deadline; TimeoutError at none."""
    left = deadline - time.time()
    if left <= 0:
        raise TimeoutError(f"request {rid} passed its deadline in decode")
    return left


@ray.remote
class DecodeWorker(GroupLeader):
    """Pulls a request's KV from prefill and decodes it in the running batch."""

    def _init_role(self) -> None:
        from transfer.backend import RayObjectBackend

        spec = self.spec
        # Event-loop tables. Output channels (one per router replica, `outputs`); the
        # requests decoding here: id -> (its channel's queue, future set when it ends);
        # requests waiting for blocks: id -> future set with their block ids.
        self._channels: dict[str, asyncio.Queue] = {}
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.Future]] = {}
        self._allocs: dict[str, asyncio.Future] = {}
        self.transfers_pending = 0
        # Counters the router publishes as pdcluster_kv_transfer_* metrics.
        self.xfer = {
            "count": 0,
            "bytes": 0,
            "seconds": 0.0,
            "timeouts": 0,
            "failures": 0,
            "renewals": 0,
            "buckets": [0] * (len(XFER_BUCKETS) + 1),
        }
        self.faults = self.fault_injector(spec.faults)
        # Pulls poll NIXL and must not block the event loop; several threads so
        # one stalled peer (bounded by its timeout) does not hold up the others.
        self._xfer = ThreadPoolExecutor(8, thread_name_prefix="kv-pull")
        # A pull that gave up while something may still write its blocks: request id ->
        # how many (read by `pulled`); READs NIXL would not release: token -> request
        # id (engine thread: `on_tick` frees their blocks once NIXL lets them go).
        self._writers: dict[str, int] = {}
        self._stuck_reads: dict[int, str] = {}
        # Handles say which backend holds their bytes; the object store needs no setup.
        self._ray_backend = RayObjectBackend(f"decode-{spec.replica}", self.runner.kv_pool)

    # ---- API (event loop) -----------------------------------------------------

    async def outputs(self, channel: str) -> AsyncIterator[list[tuple[str, list[int], str | None]]]:
        """A router's output channel: one message per decode step (or fewer, when
        the router lags: whatever queued meanwhile is merged) carrying
        (request id, new token ids, finish_reason) for every request that router
        has decoding here, instead of one message per token per request. A
        request's tokens go out once `stream_interval` of them have gathered or
        it finished. When the channel closes (router gone), its requests are aborted."""
        q = self._channels.setdefault(channel, asyncio.Queue())
        held: dict[str, list] = {}  # request id -> [tokens, reason] not sent yet
        interval = self.spec.stream_interval
        try:
            yield []  # open: requests may name this channel now
            while True:
                steps = [await q.get()]
                while not q.empty():
                    steps.append(q.get_nowait())
                for step in steps:
                    for rid, tokens, reason in step:
                        h = held.setdefault(rid, [[], None])
                        h[0] += tokens
                        h[1] = reason
                for rid in [r for r, h in held.items() if h[1] is None and r not in self._streams]:
                    del held[rid]  # aborted while its tokens were held back
                ready = [
                    rid
                    for rid, (tokens, reason) in held.items()
                    if reason is not None or len(tokens) >= interval
                ]
                if ready:
                    yield [(rid, *held.pop(rid)) for rid in ready]
        finally:
            self._channels.pop(channel, None)
            for rid, (sq, _) in list(self._streams.items()):
                if sq is q:
                    self._end(rid, WorkerError(f"output channel {channel} closed"))
                    self.thread.call(lambda r=rid: self.engine.abort(r))

    async def generate(
        self,
        request_id: str,
        channel: str,
        prompt_ids: list[int],
        first_token: int,
        params: SamplingParams,
        handle: KVHandle,
        deadline: float,
        prefill=None,
    ) -> str:
        """Pull the prompt's KV and decode it in the running batch; tokens go out
        on `channel` (the first came from prefill and is not repeated). Returns
        the finish reason when the request ends; raises if it cannot be served.
        `prefill` is the actor holding the lease: the pull claims it first."""
        if handle.num_tokens != len(prompt_ids):
            raise WorkerError(
                f"KV handle holds {handle.num_tokens} tokens, prompt has {len(prompt_ids)}"
            )
        if len(handle.ranks) != self.spec.tp_size:
            raise WorkerError(
                f"KV handle has {len(handle.ranks)} rank shards, this decode "
                f"group has tensor_parallel_size {self.spec.tp_size}"
            )
        if self.blocks.blocks_for(handle.num_tokens + 1) > self.spec.kv_blocks:
            raise WorkerError(
                f"decode-{self.spec.replica}: {handle.num_tokens} tokens cannot "
                f"fit in {self.spec.kv_blocks} KV blocks"
            )
        q = self._open(request_id, channel)
        seq = Sequence(request_id, prompt_ids, params, output_ids=[first_token])
        got = self._allocs[request_id] = self.loop.create_future()

        async def pull_then_decode(done: asyncio.Future) -> str:
            # A full pool is a queue, not an error: wait (in order) for the engine to
            # give blocks, bounded by the deadline; the prefill lease is renewed meanwhile.
            blocks = None
            try:
                blocks = await self._await_blocks(got, handle, prefill, deadline)
            finally:
                self._allocs.pop(request_id, None)
                if blocks is None:  # no pull will start
                    if prefill is not None:  # whatever ended the wait: unpin prefill now
                        prefill.release.remote(handle.request_id, handle.epoch)
                    if not got.done():
                        got.cancel()  # blocks given from now on go straight back
                    elif not got.cancelled() and got.exception() is None:
                        # Given while this wait was being cancelled or timing out.
                        self.thread.call(lambda: self.engine.pull_done(request_id, False))
            if done.done():  # ended (aborted, channel closed) as its blocks came: no pull
                self.thread.call(lambda: self.engine.pull_done(request_id, False))
                return await done
            pull = asyncio.ensure_future(self._pull(request_id, handle, blocks, prefill))

            def pulled(t: asyncio.Future) -> None:
                ok = not t.cancelled() and t.exception() is None
                writers = self._writers.pop(request_id, 0)
                self.thread.call(lambda: self.engine.pull_done(request_id, ok, writers))

            # Runs to its end even if this request is cancelled meanwhile: the blocks
            # are freed only once nothing can write them (`pull_done`).
            pull.add_done_callback(pulled)
            await asyncio.shield(pull)
            return await asyncio.wait_for(asyncio.shield(done), _left(deadline, request_id))

        return await self._run(seq, q, pull_then_decode, pulled=True)

    async def _await_blocks(
        self, got: asyncio.Future, handle: KVHandle, prefill, deadline: float
    ) -> list[int]:
        """The blocks the engine gives this pulled request (`got`), awaited until the
        request's deadline. Meanwhile the prefill lease is renewed each time half of
        what it has left has passed, so a queue here never expires it; a renewal may
        take until the lease's known expiry to be answered (prefill answers between
        steps), and blocks given meanwhile are taken at once. Without a prefill actor
        to renew with, the lease's expiry bounds the wait. Raises TimeoutError at the
        deadline, LeaseExpired when the lease ran out or was refused renewal,
        TransferTimeout / TransferFailed when prefill did not answer or is gone."""
        rid = handle.request_id
        expires = handle.expires_at or deadline  # wall clock, as the deadline
        while True:
            now = time.time()
            _left(deadline, rid)
            if prefill is None:
                wake = min(deadline, expires)
            else:
                wake = min(deadline, now + max(0.0, expires - now) / 2)
            await asyncio.wait([got], timeout=max(0.0, wake - now))
            if got.done():
                return got.result()
            _left(deadline, rid)
            if prefill is None:
                raise LeaseExpired(
                    f"the prefill lease of {rid} expired before KV blocks were free here"
                )
            renewal = asyncio.ensure_future(
                self._ask_prefill(prefill.renew.remote(rid, handle.epoch), "renewal of", rid)
            )
            renewal.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
            try:
                await asyncio.wait(
                    [got, renewal],
                    timeout=max(0.0, min(deadline, expires) - time.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if got.done():
                    return got.result()
                _left(deadline, rid)
                if not renewal.done():
                    raise TransferTimeout(
                        f"renewal of {rid}'s lease not answered before it expired"
                    )
                expires = time.time() + renewal.result()  # raises what the renewal raised
                self.xfer["renewals"] += 1
            finally:
                renewal.cancel()  # nothing once it is done

    @staticmethod
    async def _ask_prefill(ref, what: str, rid: str, timeout: float | None = None):
        """Await a call to the prefill actor holding `rid`'s lease: its own transfer
        errors pass through; no answer within `timeout` is TransferTimeout; the actor
        gone or failing is TransferFailed (the router re-prefills elsewhere, as for
        any transfer failure, rather than taking it for a lost decode)."""
        try:
            return await asyncio.wait_for(ref, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise TransferTimeout(f"{what} {rid} not answered in {timeout}s") from None
        except TransferError:
            raise
        except ray.exceptions.RayError as e:
            raise TransferFailed(f"{what} {rid}: prefill failed ({type(e).__name__})") from None

    async def generate_local(
        self,
        request_id: str,
        channel: str,
        prompt_ids: list[int],
        params: SamplingParams,
        deadline: float,
    ) -> str:
        """Decode-only fallback when no prefill worker is healthy: prefill here,
        then decode; every token including the first goes out on `channel`."""

        async def decode(done: asyncio.Future) -> str:
            return await asyncio.wait_for(asyncio.shield(done), _left(deadline, request_id))

        q = self._open(request_id, channel)
        return await self._run(Sequence(request_id, prompt_ids, params), q, decode)

    async def abort(self, request_id: str) -> None:
        """Stop decoding a request (the router's backstop; idempotent)."""
        self._end(request_id, WorkerError(f"request {request_id} aborted"))
        self.thread.call(lambda: self.engine.abort(request_id))

    def _set_faults(self, injector) -> None:
        self.faults = injector

    def stats(self) -> DecodeStats:
        return DecodeStats(
            role="decode",
            replica=self.spec.replica,
            **process_usage(),
            node_id=self.node_id,
            engine=self.snapshot,
            omp_threads=self.thread.omp_threads,
            gemm=self.runner.gemm_plan,
            streams=len(self._streams),
            channels=len(self._channels),
            transfers_pending=self.transfers_pending,
            transfers=TransferStats(**self.xfer),
        )

    # ---- event loop ---------------------------------------------------------

    def _open(self, request_id: str, channel: str) -> asyncio.Queue:
        """The queue of `channel`, for a request not decoding here yet."""
        q = self._channels.get(channel)
        if q is None:  # this incarnation never saw it: the router must reopen it
            raise WorkerError(f"decode-{self.spec.replica}: no output channel {channel}")
        if request_id in self._streams or request_id in self._allocs:
            raise WorkerError(f"request {request_id} is already decoding here")
        return q

    async def _run(self, seq: Sequence, q: asyncio.Queue, body, pulled: bool = False) -> str:
        """Register `seq`'s stream on `q`, hand it to the engine and run `body(done)`;
        on any exit before it finished, abort it there (which frees its blocks, or
        marks them to be freed when its transfer ends)."""
        rid = seq.request_id
        done = self.loop.create_future()
        self._streams[rid] = (q, done)
        finished = False
        self.thread.call(lambda: self._add(seq, pulled))
        try:
            reason = await body(done)
            finished = True
            return reason
        except (asyncio.TimeoutError, TimeoutError):
            raise TimeoutError(f"request {rid} passed its deadline in decode") from None
        finally:
            self._allocs.pop(rid, None)
            if self._streams.get(rid, (None, None))[1] is done:
                del self._streams[rid]
            if not finished:
                self.thread.call(lambda: self.engine.abort(rid))

    def _end(self, rid: str, result: str | BaseException) -> None:
        """A request stops decoding here: its `generate` call returns (or raises)."""
        _, done = self._streams.pop(rid, (None, None))
        for fut in (done, self._allocs.pop(rid, None)):
            if fut is not None and not fut.done():
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                    fut.exception()  # retrieved: the waiter may have left already
                else:
                    fut.set_result(result)

    def _refused(self, request_id: str, exc: Exception) -> None:
        self._end(request_id, WorkerError(str(exc)))

    def _blocks_ready(self, admitted: list[tuple[str, list[int]]]) -> None:
        for rid, blocks in admitted:
            fut = self._allocs.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(blocks)
            else:  # its caller left before the blocks came: no pull will start
                self.thread.call(lambda r=rid: self.engine.pull_done(r, False))

    async def _pull(self, request_id: str, handle: KVHandle, blocks: list[int], prefill) -> None:
        """Claim the lease (bounded), READ the blocks of `request_id` on every rank
        (bounded), count it. The claim's answer must name exactly the handle's blocks: the epoch
        check on both sides means a stale handle fails here, before any read.
        Claim and READs share one `transfer_timeout_s` deadline; every wait takes
        what is left of it and fails as TransferTimeout when nothing is."""
        timeout = self.spec.transfer_timeout_s
        rid, src = handle.request_id, handle.ranks[0]
        t0 = time.monotonic()
        end = t0 + timeout

        def left() -> float:
            return end - time.monotonic()

        self.transfers_pending += 1
        try:
            if prefill is not None:
                claimed = await self._ask_prefill(
                    prefill.claim.remote(rid, handle.epoch), "claim of", rid, timeout
                )
                if claimed != src.block_ids:
                    raise TransferFailed(
                        f"lease of {rid} epoch {handle.epoch} names other "
                        "blocks than the handle; refusing to read"
                    )
            backend = self._ray_backend if handle.backend == "ray" else self.agent
            # One rank: NIXL tells prefill when the READ is done. Several: every
            # rank's READ must be done first, so decode releases the lease itself.
            tp = self.spec.tp_size
            notif = f"{rid}:{handle.epoch}".encode() if tp == 1 else b""

            faults = self.faults  # read once: set_faults may swap it meanwhile

            def pull() -> int:  # transfer thread
                if faults is not None:
                    faults.before_pull(left())
                if left() <= 0:
                    raise TransferTimeout(f"pull of {rid}: nothing left of its {timeout}s")
                return backend.pull(src, blocks, timeout_s=left(), notif=notif)

            jobs = [self.loop.run_in_executor(self._xfer, pull)] + [
                asyncio.ensure_future(self._pull_rank(f, shard, blocks, left()))
                for f, shard in zip(self.followers(), handle.ranks[1:])
            ]
            # Every rank's READ must have ended before anything may free the blocks. Each
            # bounds itself by the deadline; one that has not ended a grace period after
            # it (a handshake blocked on a peer that drops packets) is given up on here,
            # and the blocks stay held until it ends (`_hold_blocks`).
            _, late = await asyncio.wait(jobs, timeout=max(0.0, left()) + PULL_GRACE_S)
            results = [j.exception() or j.result() for j in jobs if j.done()]
            stuck = [r for r in results if isinstance(r, ReadStuck)]
            if late or stuck:
                self._hold_blocks(request_id, late, stuck)
                if late:
                    raise TransferTimeout(
                        f"pull of {rid}: {len(late)} READ(s) still running "
                        f"{PULL_GRACE_S}s past the {timeout}s deadline"
                    )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            nbytes = sum(results)
            if (not backend.notifies or tp > 1) and prefill is not None:
                prefill.release.remote(rid, handle.epoch)
        except TransferError as e:
            self.xfer["timeouts" if isinstance(e, TransferTimeout) else "failures"] += 1
            if prefill is not None:  # let prefill free its blocks now, not at lease expiry
                prefill.release.remote(rid)
            raise
        finally:
            self.transfers_pending -= 1
        dt = time.monotonic() - t0
        self.xfer["count"] += 1
        self.xfer["bytes"] += nbytes
        self.xfer["seconds"] += dt
        self.xfer["buckets"][bisect.bisect_left(XFER_BUCKETS, dt)] += 1

    def _hold_blocks(self, rid: str, late: set[asyncio.Future], stuck: list[ReadStuck]) -> None:
        """A pull of `rid` ends while its blocks may still be written: by READs NIXL
        would not release (`stuck`, freed once `release_stuck` names them) and by
        jobs still running (`late`, freed as each ends, unless it ends stuck)."""
        self._writers[rid] = len(late) + len(stuck)
        for e in stuck:
            self.thread.call(lambda t=e.token: self._stuck_reads.__setitem__(t, rid))

        def ended(job: asyncio.Future) -> None:
            e = None if job.cancelled() else job.exception()
            if isinstance(e, ReadStuck):
                self.thread.call(lambda: self._stuck_reads.__setitem__(e.token, rid))
            else:
                self.thread.call(lambda: self.engine.writer_done(rid))

        for job in late:
            job.add_done_callback(ended)

    @staticmethod
    async def _pull_rank(follower, shard: RankKV, blocks: list[int], timeout: float) -> int:
        """Rank r of this group READs rank r's shard of the prompt's KV."""
        if timeout <= 0:
            raise TransferTimeout(f"no time left to pull from {shard.agent_name}")
        try:
            # The rank bounds its own READ by this absolute deadline (same node, same
            # clock), so a call that starts late, queued behind others, reads nothing
            # after this side has given up and freed the blocks; this bounds the call.
            return await asyncio.wait_for(
                follower.pull.remote(shard, blocks, time.time() + timeout), timeout + 5.0
            )
        except (asyncio.TimeoutError, TimeoutError):
            raise TransferTimeout(
                f"rank pull from {shard.agent_name} not answered in {timeout + 5.0:.1f}s"
            ) from None
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 - rank actor died or failed
            raise TransferFailed(
                f"rank pull from {shard.agent_name} failed: {type(e).__name__}"
            ) from None

    # ---- engine thread ------------------------------------------------------

    def before_step(self) -> None:
        admitted = self.engine.admit_pulls()
        if admitted:
            self.loop.call_soon_threadsafe(
                self._blocks_ready, [(s.request_id, list(s.block_table)) for s in admitted]
            )

    def on_tick(self) -> None:
        self.before_step()  # blocks this step freed go to the next pull at once
        if self._stuck_reads:
            for token in self.agent.release_stuck():  # NIXL let a stuck READ go at last
                rid = self._stuck_reads.pop(token, None)
                if rid is not None:
                    self.engine.writer_done(rid)
        super().on_tick()

    def on_outputs(self, outputs: list[StepOutput]) -> None:
        # One wake-up of the event loop per step, whatever the batch size.
        items = [(o.seq.request_id, o.token, o.finish_reason, o.error) for o in outputs]
        if items:
            self.loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list) -> None:  # event loop
        """A step's tokens onto their channels (one message per channel), and the
        ends of the requests that finished or failed."""
        steps: dict[int, tuple[asyncio.Queue, list]] = {}  # channel -> this step's items
        ended, orphans = [], []
        for rid, token, reason, error in items:
            stream = self._streams.get(rid)
            if stream is None:  # nobody waits for it any more: stop computing for it
                if reason is None:
                    orphans.append(rid)
                continue
            if error is not None:
                ended.append((rid, SequenceFailed(str(error), error.status)))
                continue
            q = stream[0]
            step = steps.get(id(q))
            if step is None:
                step = steps[id(q)] = (q, [])
            step[1].append((rid, [token] if token >= 0 else [], reason))
            if reason is not None:
                ended.append((rid, reason))
        for q, step_items in steps.values():
            q.put_nowait(step_items)
        for rid, result in ended:
            self._end(rid, result)
        if orphans:
            self.thread.call(lambda: [self.engine.abort(r) for r in orphans])

    def on_error(self, exc: BaseException) -> None:
        err = WorkerError(f"decode engine failed: {type(exc).__name__}")
        failed = [s.request_id for s in self.engine.fail_all()]

        def fail() -> None:  # event loop
            for rid in failed:
                self._end(rid, err)

        self.loop.call_soon_threadsafe(fail)
