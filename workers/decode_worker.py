"""The decode worker: pulls a request's KV from prefill into its own blocks and
decodes it in the running batch; tokens go out on the router's output channel.

Blocks for a pull are the engine's to give (`Engine.add_pulled` /
`admit_pulls`: requests wait for them in order, and the engine thread sleeps
meanwhile) and the engine's to take back (`pull_done`, called when the transfer
has ended on every rank, whatever happened to the request meanwhile)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import ray

from transfer.handle import KVHandle, TransferFailed
from wire.api import (
    XFER_BUCKETS,
    DecodeStats,
    Delta,
    SequenceFailed,
    TransferStats,
    WorkerError,
    time_left,
)
from wire.sampling_params import SamplingParams
from workers.leader import GroupLeader
from workers.pull import Pull
from workers.sequence import ForkTooLate, Sequence

if TYPE_CHECKING:
    from workers.engine import StepOutput


async def _until(done: asyncio.Future, deadline: float, request_id: str) -> str:
    """The request's end (`done`), awaited until its deadline (TimeoutError then)."""
    return await asyncio.wait_for(
        asyncio.shield(done), time_left(deadline, f"request {request_id}")
    )


@ray.remote
class DecodeWorker(GroupLeader):
    """Pulls a request's KV from prefill and decodes it in the running batch."""

    def _init_role(self) -> None:
        from transfer.backend import RayObjectBackend

        spec = self.spec
        # Event-loop tables. Output channels (one per router replica, `outputs`); the
        # requests decoding here: id -> (its channel's queue, future set when it ends);
        # pulled requests waiting for blocks: id -> their Pull.
        self._channels: dict[str, asyncio.Queue] = {}
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.Future]] = {}
        self._pulls: dict[str, Pull] = {}  # pulled requests still waiting for blocks
        # Requests whose grammar compiles before they register: id -> aborted meanwhile.
        self._compiling: dict[str, bool] = {}
        # Pulled requests between their call's start and their engine registration: their
        # forks (n > 1), whose calls start after theirs, wait for it (`generate_fork`).
        self._arriving: dict[str, asyncio.Event] = {}
        self.transfers_pending = 0
        # Counters the router publishes as pdcluster_kv_transfer_* metrics.
        self.transfer_counts = {
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
        self.pull_threads = ThreadPoolExecutor(8, thread_name_prefix="kv-pull")
        # Handles say which backend holds their bytes; the object store needs no setup.
        self.ray_backend = RayObjectBackend(f"decode-{spec.replica}", self.runner.kv_pool)

    # ---- API (event loop) -----------------------------------------------------

    async def outputs(self, channel: str) -> AsyncIterator[list[tuple[str, Delta]]]:
        """A router's output channel: one message per decode step (or fewer, when
        the router lags: whatever queued meanwhile is merged) carrying
        (request id, its Delta: new tokens, finish reason, logprobs) for every request
        that router has decoding here, instead of one message per token per request.
        A request's tokens go out once `stream_interval` of them have gathered or
        it finished. When the channel closes (router gone), its requests are aborted."""
        q = self._channels.setdefault(channel, asyncio.Queue())
        held: dict[str, Delta] = {}  # request id -> what is not sent yet
        interval = self.spec.stream_interval
        try:
            yield []  # open: requests may name this channel now
            while True:
                steps = [await q.get()]
                while not q.empty():
                    steps.append(q.get_nowait())
                for step in steps:
                    for rid, delta in step:
                        if rid in held:
                            held[rid].extend(delta)
                        else:
                            held[rid] = delta
                for rid in [
                    r for r, d in held.items() if d.finish_reason is None and r not in self._streams
                ]:
                    del held[rid]  # aborted while its tokens were held back
                ready = [
                    rid
                    for rid, d in held.items()
                    if d.finish_reason is not None or len(d.tokens) >= interval
                ]
                if ready:
                    yield [(rid, held.pop(rid)) for rid in ready]
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
        timeout_s: float,
        prefill=None,
        output_ids: list[int] | None = None,
    ) -> str:
        """Pull the KV of the prompt (and of `output_ids`, the tokens produced before a
        migration) and decode it in the running batch; tokens go out on `channel` (the
        first came from prefill and is not repeated). Returns the finish reason when
        the request ends; raises if it cannot be served within `timeout_s` (seconds
        left of the request's deadline). `prefill` is the actor holding the lease:
        the pull claims it first."""
        # Its forks (n > 1), whose calls start after this one, wait for its registration.
        self._arriving[request_id] = asyncio.Event()
        now = time.monotonic()
        deadline = now + timeout_s
        # The lease's expiry on this node's clock (the handle carries time left; none left
        # in transit: renewed at once).
        lease_expires = now + max(0.0, handle.ttl_s)
        output_ids = list(output_ids or [])
        try:
            if handle.num_tokens != len(prompt_ids) + len(output_ids):
                raise WorkerError(
                    f"KV handle holds {handle.num_tokens} tokens, the request has "
                    f"{len(prompt_ids) + len(output_ids)}"
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
            seq = await self._sequence(request_id, prompt_ids, params, [*output_ids, first_token])
            q = self._open(request_id, channel)
        except BaseException:
            self._registered(request_id)  # never will be: its forks go on, on their own
            raise
        pull = self._pulls[request_id] = Pull(
            self, request_id, handle, prefill, deadline, lease_expires
        )

        async def pull_then_decode(done: asyncio.Future) -> str:
            # A full pool is a queue, not an error: the pull waits (in order) for the
            # engine's blocks, bounded by the deadline, renewing the lease meanwhile.
            try:
                await pull.run(done)
            finally:
                self._pulls.pop(request_id, None)
            return await _until(done, deadline, request_id)

        return await self._run(seq, q, pull_then_decode, pulled=True)

    async def generate_local(
        self,
        request_id: str,
        channel: str,
        prompt_ids: list[int],
        params: SamplingParams,
        timeout_s: float,
        output_ids: list[int] | None = None,
    ) -> str:
        """Prefill here, then decode (a short prompt, or no prefill worker healthy);
        every token from this sequence's first goes out on `channel`. `output_ids`:
        tokens produced before a migration; `timeout_s`: seconds left of the deadline."""
        deadline = time.monotonic() + timeout_s

        async def decode(done: asyncio.Future) -> str:
            return await _until(done, deadline, request_id)

        seq = await self._sequence(request_id, prompt_ids, params, output_ids)
        q = self._open(request_id, channel)
        return await self._run(seq, q, decode)

    async def generate_fork(
        self,
        request_id: str,
        channel: str,
        parent_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        timeout_s: float,
    ) -> str:
        """Another choice (n > 1) of the request whose KV `generate` pulls here as
        `parent_id`: forked from that KV when it lands (`Engine.add_fork`: the prompt's
        blocks shared, its last one copied), its first token computed here with its own
        params (its own seed); tokens go out on `channel`. TransferFailed when the
        parent's KV has landed already or never will: the router serves it on its own."""
        deadline = time.monotonic() + timeout_s

        async def decode(done: asyncio.Future) -> str:
            return await _until(done, deadline, request_id)

        seq = await self._sequence(request_id, prompt_ids, params)
        # The parent's call started first (Ray runs one caller's calls in order) but may
        # not have registered yet: forking before it would find nothing to fork from.
        arriving = self._arriving.get(parent_id)
        if arriving is not None:
            try:
                await asyncio.wait_for(arriving.wait(), max(0.0, deadline - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):
                raise TimeoutError(f"request {request_id} passed its deadline") from None
        q = self._open(request_id, channel)
        return await self._run(seq, q, decode, fork_of=parent_id)

    async def _sequence(self, request_id: str, *args) -> Sequence:
        """`sequence()`, refused (WorkerError) when the request was aborted while its
        grammar compiled: it is not registered yet, so the abort found nothing to end."""
        if request_id in self._compiling:
            raise WorkerError(f"request {request_id} is already decoding here")
        self._compiling[request_id] = False
        try:
            seq = await self.sequence(request_id, *args)
        finally:
            aborted = self._compiling.pop(request_id)
        if aborted:
            raise WorkerError(f"request {request_id} aborted")
        return seq

    async def abort(self, request_id: str) -> None:
        """Stop decoding a request (the router's backstop; idempotent)."""
        if request_id in self._compiling:
            self._compiling[request_id] = True
        self._end(request_id, WorkerError(f"request {request_id} aborted"))
        self.thread.call(lambda: self.engine.abort(request_id))

    def _set_faults(self, injector) -> None:
        self.faults = injector

    def stats(self) -> DecodeStats:
        return self._stats(
            DecodeStats,
            streams=len(self._streams),
            channels=len(self._channels),
            transfers_pending=self.transfers_pending,
            transfers=TransferStats(**self.transfer_counts),
        )

    # ---- event loop ---------------------------------------------------------

    def _open(self, request_id: str, channel: str) -> asyncio.Queue:
        """The queue of `channel`, for a request not decoding here yet."""
        q = self._channels.get(channel)
        if q is None:  # this incarnation never saw it: the router must reopen it
            raise WorkerError(f"decode-{self.spec.replica}: no output channel {channel}")
        if request_id in self._streams or request_id in self._pulls:
            raise WorkerError(f"request {request_id} is already decoding here")
        return q

    async def _run(
        self, seq: Sequence, q: asyncio.Queue, body, pulled: bool = False, fork_of=None
    ) -> str:
        """Register `seq`'s stream on `q`, hand it to the engine and run `body(done)`;
        on any exit before it finished, abort it there (which frees its blocks, or
        marks them to be freed when its transfer ends)."""
        rid = seq.request_id
        done = self.loop.create_future()
        self._streams[rid] = (q, done)
        finished = False
        self.thread.call(lambda: self._add(seq, pulled, fork_of))
        self._registered(rid)  # its forks' adds queue behind this one
        try:
            reason = await body(done)
            finished = True
            return reason
        except (asyncio.TimeoutError, TimeoutError):
            raise TimeoutError(f"request {rid} passed its deadline in decode") from None
        finally:
            self._pulls.pop(rid, None)
            if self._streams.get(rid, (None, None))[1] is done:
                del self._streams[rid]
            if not finished:
                self.thread.call(lambda: self.engine.abort(rid))

    def _registered(self, rid: str) -> None:
        arriving = self._arriving.pop(rid, None)
        if arriving is not None:
            arriving.set()

    def _end(self, rid: str, result: str | BaseException) -> None:
        """A request stops decoding here: its `generate` call returns (or raises)."""
        _, done = self._streams.pop(rid, (None, None))
        pull = self._pulls.pop(rid, None)
        for fut in (done, pull.blocks if pull is not None else None):
            if fut is not None and not fut.done():
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                    fut.exception()  # retrieved: the waiter may have left already
                else:
                    fut.set_result(result)

    def _refused(self, request_id: str, exc: Exception) -> None:
        self._end(
            request_id, (TransferFailed if isinstance(exc, ForkTooLate) else WorkerError)(str(exc))
        )

    def _blocks_ready(self, admitted: list[tuple[str, list[int]]]) -> None:
        for rid, blocks in admitted:
            pull = self._pulls.get(rid)
            if pull is not None and not pull.blocks.done():
                pull.blocks.set_result(blocks)
            else:  # its caller left before the blocks came: no pull will start
                self.thread.call(lambda r=rid: self.engine.pull_done(r, False))

    # ---- engine thread ------------------------------------------------------

    def _forks_failed(self) -> None:  # engine thread
        """Forks whose parent's KV did not land here: their calls raise TransferFailed."""
        failed, self.engine.failed_forks = self.engine.failed_forks, []
        if failed:
            err = "its parent's KV did not land here"
            self.loop.call_soon_threadsafe(
                lambda: [self._end(r, TransferFailed(f"fork {r}: {err}")) for r in failed]
            )

    def before_step(self) -> None:
        self._forks_failed()
        admitted = self.engine.admit_pulls()
        if admitted:
            self.loop.call_soon_threadsafe(
                self._blocks_ready, [(s.request_id, list(s.block_table)) for s in admitted]
            )

    def on_tick(self) -> None:
        self.before_step()  # blocks this step freed go to the next pull at once
        for rid in self.agent.release_stuck():  # NIXL let a stuck READ go at last
            self.engine.writer_done(rid)
        super().on_tick()

    def on_outputs(self, outputs: list[StepOutput]) -> None:
        # One wake-up of the event loop per step, whatever the batch size.
        items = [
            (o.seq.request_id, o.token, o.finish_reason, o.error, o.logprobs, o.prompt_logprobs)
            for o in outputs
        ]
        if items:
            self.loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list) -> None:  # event loop
        """A step's tokens onto their channels (one message per channel), and the
        ends of the requests that finished or failed."""
        steps: dict[int, tuple[asyncio.Queue, list]] = {}  # channel -> this step's items
        ended, orphans = [], []
        for rid, token, reason, error, lp, prompt_lps in items:
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
            tokens = [token] if token >= 0 else []
            lps = [lp] if lp is not None else None
            step[1].append((rid, Delta(tokens, reason, lps, prompt_lps)))
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
