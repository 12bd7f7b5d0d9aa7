"""Prefill and decode workers: Ray actors around an engine thread.

Each actor runs its engine in one thread (the only place the model runs) and
talks to callers on its asyncio loop. The prefill worker computes a prompt,
samples the first token and keeps the prompt's KV blocks pinned under a lease
until the decode worker has pulled them (NIXL notification) or the lease
expires. The decode worker allocates blocks, pulls the KV with a NIXL READ
bounded by `transfer_timeout_s`, and streams tokens from continuous batching.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import ctypes
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import ray
import torch

from transfer import (
    FaultConfig,
    FaultInjector,
    KVHandle,
    LeaseRegistry,
    NixlTransferAgent,
    RankKV,
    RayObjectBackend,
    TransferBackend,
    TransferBackpressure,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from workers.engine import Engine, StepOutput
from workers.kv_cache import BlockManager, NoFreeBlocks
from workers.runner import ModelRunner
from workers.sampling_params import SamplingParams
from workers.sequence import Sequence
from workers.tp import RENDEZVOUS_TIMEOUT_S, TPGroup, exit_for_restart

log = logging.getLogger("pdcluster.worker")

# Upper bounds (seconds) of the kv_transfer_seconds histogram buckets.
XFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerError(Exception):
    """A worker could not serve a request (engine failure, no room, deadline)."""


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs to start; built by the launcher from the config."""

    role: str  # "prefill" | "decode"
    replica: int
    model_dir: str
    max_model_len: int
    kv_blocks: int
    block_size: int
    dtype: str = "float32"
    device: str = "cpu"
    max_batched_tokens: int = 2048
    max_running: int = 32
    transfer_timeout_s: float = 10.0
    lease_ttl_s: float = 30.0
    max_pending: int = 1024
    num_threads: int = 1
    stream_interval: int = 1  # decode: tokens gathered per request before they go out
    faults: FaultConfig | None = None
    transfer_backend: str = "nixl"  # "nixl" | "ray"
    tp_rank: int = 0
    tp_size: int = 1
    group: str = ""  # rank r's Ray actor name is f"{group}-rank{r}"

    def rank_name(self, rank: int) -> str:
        return f"{self.group}-rank{rank}"


class OutputChannel:
    """The caller's end of a decode worker's `outputs` stream: one Ray stream per
    (caller, decode actor) carries every request's tokens, step by step; this
    hands each request its own queue. If the stream fails (actor died or
    restarted), every open request's queue gets the error and the channel is
    dead: the caller opens a new one for later requests."""

    def __init__(self, actor, name: str):
        self.id = f"{name}-{os.getpid()}-{id(self):x}"
        self.error: BaseException | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._open = asyncio.Event()  # the worker has the channel (its first, empty message)
        self._gen = actor.outputs.options(num_returns="streaming").remote(self.id)
        self._task = asyncio.get_event_loop().create_task(self._pump())

    @property
    def alive(self) -> bool:
        return self.error is None

    def open(self, request_id: str) -> asyncio.Queue:
        """Items: (tokens, finish_reason) in order, or an exception when the channel fails."""
        q = self._queues[request_id] = asyncio.Queue()
        if self.error is not None:
            q.put_nowait(self.error)
        return q

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def stream(
        self,
        request_id: str,
        submit: Callable[[], object],
        wait: Callable[[Callable[[], Awaitable]], Awaitable],
        grace_s: float = 5.0,
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        """(tokens, finish_reason) of one request until it finishes. `submit()`
        sends its `generate` call (after its queue exists) and returns the call's
        ref: a failed call raises here. `wait(fn)` awaits `fn()` under the
        caller's bounds (deadline, watchdog). Tokens that queued up meanwhile are
        merged into one item. A call that returned before its last tokens came
        gets `grace_s` for them (the call's reply and the stream are not ordered)."""
        q = self.open(request_id)
        call: asyncio.Future | None = None
        ended = False

        async def last_tokens():
            try:
                return await asyncio.wait_for(q.get(), grace_s)
            except (asyncio.TimeoutError, TimeoutError):
                raise WorkerError(
                    f"request {request_id} ended on decode but its last tokens "
                    f"did not arrive in {grace_s}s"
                ) from None

        buf: collections.deque = collections.deque()
        try:
            if not self._open.is_set():
                await wait(self._open.wait)
            if self.error is not None:
                raise self.error
            call = asyncio.ensure_future(submit())
            call.add_done_callback(lambda f: f.cancelled() or f.exception())  # always retrieved
            call.add_done_callback(q.put_nowait)
            while True:
                if not buf:
                    buf.append(await wait(last_tokens if ended else q.get))
                while not q.empty():
                    buf.append(q.get_nowait())
                item = buf.popleft()
                if isinstance(item, asyncio.Future):  # the call ended
                    if not item.cancelled() and item.exception() is not None:
                        raise item.exception()
                    ended = True
                    continue
                if isinstance(item, BaseException):
                    raise item
                tokens, reason = item
                while reason is None and buf and isinstance(buf[0], tuple):
                    more, reason = buf.popleft()
                    tokens = tokens + more
                yield tokens, reason
                if reason is not None:
                    return
        finally:
            self.close(request_id)
            if call is not None:
                call.remove_done_callback(q.put_nowait)

    def shutdown(self) -> None:
        """Close the stream; the worker aborts whatever was still decoding on it."""
        self._task.cancel()
        ray.cancel(self._gen)

    async def _pump(self) -> None:
        try:
            async for ref in self._gen:
                items = await ref
                self._open.set()
                for rid, tokens, reason in items:
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait((tokens, reason))
            self.error = WorkerError(f"output channel {self.id} ended")
        except asyncio.CancelledError:
            self.error = WorkerError(f"output channel {self.id} closed")
            raise
        except Exception as e:  # noqa: BLE001 - actor died/restarted: every request learns it
            self.error = e
        finally:
            self._open.set()  # wake requests waiting for it: they find the error
            for q in self._queues.values():
                q.put_nowait(self.error)


class PrefillResult(msgspec.Struct, frozen=True):
    request_id: str
    first_token: int
    finish_reason: str | None  # set when the first token already ends the request
    handle: KVHandle | None  # None when finished: nothing to transfer


def _omp_max_threads() -> int | None:
    """What OpenMP (which MKL's GEMMs follow) gives the calling thread, asked of
    libgomp directly: torch's own getters reinitialise the count and would hide it."""
    with open("/proc/self/maps") as f:
        path = next((ln.split()[-1] for ln in f if "/libgomp" in ln), None)
    return ctypes.CDLL(path).omp_get_max_threads() if path else None


def _model_thread_start(runner: ModelRunner, num_threads: int) -> int | None:
    """First call of the one thread that runs the model; returns OpenMP's thread
    count there. Three things found by measuring (2 cores, batch-32 decode step
    85 ms in-process, 160-195 ms in the actor before this):
    - OpenMP counts threads per thread. Ray starts workers with OMP_NUM_THREADS=1,
      so a thread other than the one that called torch.set_num_threads runs
      MKL's GEMMs on one core. The model thread sets its own count.
    - One OpenMP team per process. With a second one (the loading thread's),
      libgomp manages more threads than cores and makes its workers sleep
      between parallel regions: silu on 32 x 1536 took 53 us instead of 12.
      So loading runs on one thread (`_load_runner`).
    - MKL packs weights for the packing thread's count: packed here.
    A failure here exits the process (Ray restarts it): an actor whose model
    thread is gone would accept work that nothing runs."""
    try:
        torch.set_num_threads(num_threads)
        runner.pack_weights()
        return _omp_max_threads()
    except BaseException as e:  # noqa: BLE001
        exit_for_restart("model thread set-up", e)


class _EngineThread:
    """Runs `engine.step()` in a loop on a dedicated thread; other threads
    hand it work as callables through an inbox, so engine state has one owner."""

    def __init__(
        self,
        engine: Engine,
        on_outputs: Callable[[list[StepOutput]], None],
        on_tick: Callable[[], None],
        on_error: Callable[[BaseException], None],
        num_threads: int,
        idle_wait_s: float = 0.05,
        setup: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self.num_threads = num_threads
        self.omp_threads: int | None = None  # as OpenMP reports it on this thread
        self._setup = setup  # runs on the thread before the first step (TP rendezvous)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._on_outputs, self._on_tick, self._on_error = on_outputs, on_tick, on_error
        # Idle, the thread wakes for work at once and for `on_tick` (NIXL notifications,
        # lease expiry, TP keep-alive) every idle_wait_s. Each wake-up of an idle worker
        # preempts a busy one's OpenMP thread on a shared machine, so not more often.
        self._idle_wait_s = idle_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)

    def stop(self) -> None:
        self._stop.set()

    def _drain(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        self.omp_threads = _model_thread_start(self.engine.runner, self.num_threads)
        if self._setup is not None:
            self._setup()  # ends the process itself when the group cannot form
        while not self._stop.is_set():
            try:
                self._drain(block=not self.engine.has_work)
                if self.engine.has_work:
                    self._on_outputs(self.engine.step())
                self._on_tick()
            except BaseException as e:  # noqa: BLE001 - report, never die silently
                log.exception("engine step failed")
                self._on_error(e)


def _make_backend(spec: WorkerSpec, pool: torch.Tensor) -> TransferBackend:
    name = f"{spec.role}-{spec.replica}" + (f"-rank{spec.tp_rank}" if spec.tp_size > 1 else "")
    if spec.transfer_backend == "nixl":
        try:
            if NixlTransferAgent is None:
                raise ImportError("the nixl package does not import")
            return NixlTransferAgent(name, pool)
        except Exception as e:  # noqa: BLE001 - any NIXL/UCX start failure
            if spec.tp_size > 1:  # shards move rank to rank over NIXL only
                raise RuntimeError(f"NIXL is required at tensor_parallel_size > 1: {e!r}") from e
            log.warning("NIXL unavailable (%r): using the Ray object store for KV", e)
    return RayObjectBackend(name, pool)


def _load_runner(spec: WorkerSpec) -> ModelRunner:
    # Loads on one thread: the model thread alone takes `num_threads` (see
    # _model_thread_start), so the process has one OpenMP team.
    torch.set_num_threads(1)
    return ModelRunner(
        spec.model_dir,
        max_model_len=spec.max_model_len,
        num_blocks=spec.kv_blocks,
        block_size=spec.block_size,
        dtype=spec.dtype,
        device=spec.device,
        tp_rank=spec.tp_rank,
        tp_size=spec.tp_size,
    )


def _ready(spec: WorkerSpec, agent: TransferBackend) -> dict:
    """What every rank answers once it is up (the launcher waits for all of them)."""
    return {
        "role": spec.role,
        "replica": spec.replica,
        "rank": spec.tp_rank,
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "agent": agent.name,
    }


def _left(deadline: float, rid: str) -> float:
    left = deadline - time.time()
    if left <= 0:
        raise TimeoutError(f"request {rid} passed its deadline in decode")
    return left


def _fail_future(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, exc: BaseException):
    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(exc))


class _WorkerBase:
    """Rank 0 of a worker group: the engine, its block manager and the API.
    At tensor_parallel_size > 1 it leads ranks 1.. (`RankWorker`) in lockstep."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.runner = _load_runner(spec)
        self.blocks = BlockManager(spec.kv_blocks, spec.block_size)
        self.engine = Engine(
            self.runner,
            self.blocks,
            max_batched_tokens=spec.max_batched_tokens,
            max_running=spec.max_running,
            prefill_only=spec.role == "prefill",
        )
        self.agent = _make_backend(spec, self.runner.kv_pool)
        self.loop = asyncio.get_event_loop()
        # Ranks 1..: their KV described with no blocks (filled per handle), their actors.
        self.tp_peers: list[RankKV] = []
        self._followers: list | None = None
        setup = None
        if spec.tp_size > 1:
            self.runner.tp = TPGroup(0, spec.tp_size, self.runner.device)
            self._tp_address = self.runner.tp.open(ray.util.get_node_ip_address())
            setup = self._form_group
        self.thread = _EngineThread(
            self.engine,
            self._on_outputs,
            self._on_tick,
            self._on_error,
            num_threads=spec.num_threads,
            setup=setup,
        )

    def _form_group(self) -> None:  # engine thread, before the first step
        tp = self.runner.tp
        try:
            tp.join(self._tp_address)
            self.tp_peers = tp.gather(self.agent.rank_kv([]))[1:]
        except Exception as e:  # noqa: BLE001 - the followers retry against our next start
            tp.failed(e)

    def tp_address(self) -> tuple[str, int, str]:
        """Where ranks 1.. find this group's rendezvous (this incarnation's)."""
        return self._tp_address

    def followers(self) -> list:
        if self._followers is None:
            self._followers = [
                ray.get_actor(self.spec.rank_name(r)) for r in range(1, self.spec.tp_size)
            ]
        return self._followers

    def rank_kvs(self, block_ids: list[int]) -> list[RankKV]:
        """Every rank's share of these blocks (same block ids on every rank)."""
        return [self.agent.rank_kv(block_ids)] + [
            msgspec.structs.replace(t, block_ids=list(block_ids)) for t in self.tp_peers
        ]

    def _on_outputs(self, outputs: list[StepOutput]) -> None:
        raise NotImplementedError

    def _on_tick(self) -> None:  # engine thread
        if self.runner.tp is not None:
            self.runner.tp.keepalive()

    def _on_error(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def _on_thread(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread and await its result."""
        fut = self.loop.create_future()

        def run() -> None:
            try:
                res = fn()
            except BaseException as e:  # noqa: BLE001
                _fail_future(self.loop, fut, e)
                return
            self.loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(res))

        self.thread.call(run)
        return await asyncio.wait_for(fut, timeout=30)

    def ready(self) -> dict:
        return _ready(self.spec, self.agent)


@ray.remote
class PrefillWorker(_WorkerBase):
    """Runs prompts, samples the first token, pins the prompt's KV under a lease."""

    def __init__(self, spec: WorkerSpec):
        self._futures: dict[str, asyncio.Future] = {}
        # A claimed lease stays pinned for the longest a read can take.
        self.leases = LeaseRegistry(
            spec.max_pending, spec.lease_ttl_s, claim_s=spec.transfer_timeout_s + 5.0
        )
        self.faults = FaultInjector(spec.faults, f"prefill-{spec.replica}") if spec.faults else None
        super().__init__(spec)

    async def prefill(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> PrefillResult:
        if len(self.leases) + len(self._futures) >= self.spec.max_pending:
            raise TransferBackpressure(
                f"prefill-{self.spec.replica}: {self.spec.max_pending} "
                "requests and leases pending (max_pending); try later"
            )
        fut = self.loop.create_future()
        self._futures[request_id] = fut
        seq = Sequence(request_id, prompt_ids, params)
        self.thread.call(lambda: self.engine.add(seq))
        try:
            return await fut
        except BaseException:
            # Cancelled or failed: whatever this request holds goes back.
            self.thread.call(lambda: self._release(request_id))
            raise
        finally:
            self._futures.pop(request_id, None)

    async def release(self, request_id: str, epoch: int | None = None) -> None:
        """Drop a request's lease (that epoch's, if given) or queued prefill:
        decode after a pull without notification, or the router's backstop."""
        self.thread.call(lambda: self._release(request_id, epoch))

    def _release(self, request_id: str, epoch: int | None = None) -> None:  # engine thread
        self.engine.abort(request_id)
        blocks = self.leases.release(request_id, epoch)
        if blocks is not None:
            self.blocks.free(blocks)

    async def claim(self, request_id: str, epoch: int) -> list[int]:
        """Decode asks before it reads: is (request, epoch) still live? Holds the
        lease for one read; raises LeaseExpired otherwise."""
        return await self._on_thread(lambda: self.leases.claim(request_id, epoch))

    def _on_outputs(self, outputs: list[StepOutput]) -> None:  # engine thread
        for out in outputs:
            seq = out.seq
            fut = self._futures.get(seq.request_id)
            if out.finish_reason is not None or fut is None or fut.done():
                # Finished at its first token, or nobody is waiting: nothing to pin.
                if seq.block_table:
                    self.blocks.free(seq.block_table)
                    seq.block_table = []
                handle = None
            else:
                ttl = self.spec.lease_ttl_s
                old = self.leases.release(seq.request_id)
                if old is not None:  # a caller reused an id: never leak the older blocks
                    self.blocks.free(old)
                if self.faults is not None:
                    ttl = self.faults.lease_ttl(ttl)
                try:
                    lease = self.leases.register(seq.request_id, seq.block_table, ttl)
                except TransferBackpressure as e:
                    self.blocks.free(seq.block_table)
                    seq.block_table = []
                    _fail_future(self.loop, fut, e)
                    continue
                handle = KVHandle(
                    request_id=seq.request_id,
                    backend="ray" if isinstance(self.agent, RayObjectBackend) else "nixl",
                    num_tokens=seq.num_cached,
                    ranks=self.rank_kvs(seq.block_table),
                    epoch=lease.epoch,
                    expires_at=time.time() + ttl,
                )
            if fut is not None:
                res = PrefillResult(seq.request_id, out.token, out.finish_reason, handle)
                self.loop.call_soon_threadsafe(lambda f=fut, r=res: f.done() or f.set_result(r))

    def _on_tick(self) -> None:  # engine thread
        super()._on_tick()
        for msg in self.agent.poll_notifs():  # "<request id>:<epoch>" when a READ completed
            rid, _, epoch = msg.decode().rpartition(":")
            if epoch.isdigit():
                self._release(rid, int(epoch))
        for lease in self.leases.sweep():
            self.blocks.free(lease.blocks)

    def _on_error(self, exc: BaseException) -> None:  # engine thread
        for s in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(s.request_id)
        for fut in list(self._futures.values()):
            _fail_future(self.loop, fut, WorkerError(f"prefill engine failed: {exc!r}"))

    def stats(self) -> dict:
        return {
            "role": "prefill",
            "replica": self.spec.replica,
            "pinned_blocks": self.blocks.num_used,
            "leases": len(self.leases),
            "leases_expired": self.leases.expired_total,
            "pending": len(self._futures),
            "queued_tokens": self.engine.num_queued_tokens,
            "steps": self.engine.steps,
            "omp_threads": self.thread.omp_threads,
        }


@ray.remote
class DecodeWorker(_WorkerBase):
    """Pulls a request's KV from prefill and decodes it in the running batch."""

    def __init__(self, spec: WorkerSpec):
        # Output channels (one per router replica, `outputs`) and the requests
        # decoding here: request id -> (its channel's queue, future set when it ends).
        self._channels: dict[str, asyncio.Queue] = {}
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.Future]] = {}
        self.transfers_pending = 0
        # Counters the router publishes as pdcluster_kv_transfer_* metrics.
        self.xfer = {
            "count": 0,
            "bytes": 0,
            "seconds": 0.0,
            "timeouts": 0,
            "failures": 0,
            "buckets": [0] * (len(XFER_BUCKETS) + 1),
        }
        self.faults = FaultInjector(spec.faults, f"decode-{spec.replica}") if spec.faults else None
        super().__init__(spec)
        # Pulls poll NIXL and must not block the event loop; several threads so
        # one stalled peer (bounded by its timeout) does not hold up the others.
        self._xfer = ThreadPoolExecutor(4, thread_name_prefix="kv-pull")
        # Handles say which backend holds their bytes; the object store needs no setup.
        self._ray_backend = RayObjectBackend(f"decode-{spec.replica}", self.runner.kv_pool)

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
        q = self._channel(channel)
        blocks = await self._allocate_for(handle, deadline)
        try:
            await self._pull(handle, blocks, prefill)
        except BaseException:
            self.blocks.free(blocks)
            raise
        seq = Sequence(request_id, prompt_ids, params, output_ids=[first_token])
        seq.block_table, seq.num_cached = blocks, handle.num_tokens
        return await self._run(seq, q, deadline)

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
        q = self._channel(channel)
        return await self._run(Sequence(request_id, prompt_ids, params), q, deadline)

    def _channel(self, channel: str) -> asyncio.Queue:
        q = self._channels.get(channel)
        if q is None:  # this incarnation never saw it: the router must reopen it
            raise WorkerError(f"decode-{self.spec.replica}: no output channel {channel}")
        return q

    async def _run(self, seq: Sequence, q: asyncio.Queue, deadline: float) -> str:
        """Hand `seq` to the engine and wait for it to end (its tokens go out on
        `q`'s channel); on any exit before it finished, abort it there (which
        frees its blocks)."""
        rid = seq.request_id
        if rid in self._streams:
            self.blocks.free(seq.block_table)
            raise WorkerError(f"request {rid} is already decoding here")
        done = self.loop.create_future()
        self._streams[rid] = (q, done)
        finished = False
        self.thread.call(lambda: self.engine.add(seq))
        try:
            reason = await asyncio.wait_for(asyncio.shield(done), _left(deadline, rid))
            finished = True
            return reason
        except (asyncio.TimeoutError, TimeoutError):
            raise TimeoutError(f"request {rid} passed its deadline in decode") from None
        finally:
            if self._streams.get(rid, (None, None))[1] is done:
                del self._streams[rid]
            if not finished:
                self.thread.call(lambda: self.engine.abort(rid))

    def _end(self, rid: str, result: str | BaseException) -> None:  # event loop
        """A request stops decoding here: its `generate` call returns (or raises)."""
        _, done = self._streams.pop(rid, (None, None))
        if done is not None and not done.done():
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)

    async def _pull(self, handle: KVHandle, blocks: list[int], prefill) -> None:
        """Claim the lease (bounded), READ the blocks (bounded), count it.
        The claim's answer must name exactly the handle's blocks: the epoch
        check on both sides means a stale handle fails here, before any read."""
        timeout = self.spec.transfer_timeout_s
        rid, src = handle.request_id, handle.ranks[0]
        t0 = time.monotonic()
        self.transfers_pending += 1
        try:
            if prefill is not None:
                try:
                    claimed = await asyncio.wait_for(
                        prefill.claim.remote(rid, handle.epoch), timeout
                    )
                except (asyncio.TimeoutError, TimeoutError):
                    raise TransferTimeout(f"claim of {rid} not answered in {timeout}s") from None
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

            def pull() -> int:
                if self.faults is not None:
                    self.faults.before_pull(timeout - (time.monotonic() - t0))
                return backend.pull(
                    src, blocks, timeout_s=timeout - (time.monotonic() - t0), notif=notif
                )

            pulls = [self.loop.run_in_executor(self._xfer, pull)] + [
                self._pull_rank(f, shard, blocks, timeout - (time.monotonic() - t0))
                for f, shard in zip(self.followers(), handle.ranks[1:])
            ]
            # Wait for every rank (each bounded) before the blocks can be freed on error.
            results = await asyncio.gather(*pulls, return_exceptions=True)
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

    @staticmethod
    async def _pull_rank(follower, shard: RankKV, blocks: list[int], timeout: float) -> int:
        """Rank r of this group READs rank r's shard of the prompt's KV."""
        try:
            # The rank bounds its own READ by `timeout`; this bounds the call around it.
            return await asyncio.wait_for(
                follower.pull.remote(shard, blocks, timeout), timeout + 5.0
            )
        except (asyncio.TimeoutError, TimeoutError):
            raise TransferTimeout(
                f"rank pull from {shard.agent_name} not answered in {timeout + 5.0:.1f}s"
            ) from None
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 - rank actor died or failed
            raise TransferFailed(f"rank pull from {shard.agent_name} failed: {e!r}") from None

    async def _allocate_for(self, handle: KVHandle, deadline: float) -> list[int]:
        """Blocks for a pulled prompt. A full pool is a queue, not an error: wait
        (bounded by the request deadline and the prefill lease) for blocks to free."""
        n = self.blocks.blocks_for(handle.num_tokens)
        until = min(deadline, handle.expires_at or deadline)
        while True:
            try:
                return self.blocks.allocate(n)
            except NoFreeBlocks as e:
                if time.time() >= until:
                    raise WorkerError(f"decode-{self.spec.replica}: {e} until the deadline")
            await asyncio.sleep(0.01)

    async def abort(self, request_id: str) -> None:
        """Stop decoding a request (the router's backstop; idempotent)."""
        self._end(request_id, WorkerError(f"request {request_id} aborted"))
        self.thread.call(lambda: self.engine.abort(request_id))

    def _on_outputs(self, outputs: list[StepOutput]) -> None:  # engine thread
        steps: dict[int, tuple[asyncio.Queue, list]] = {}  # channel -> this step's items
        ended = []
        for out in outputs:
            rid = out.seq.request_id
            stream = self._streams.get(rid)
            if stream is None:  # nobody waits for it any more: stop computing for it
                if out.finish_reason is None:
                    self.engine.abort(rid)
                continue
            q = stream[0]
            step = steps.get(id(q))
            if step is None:
                step = steps[id(q)] = (q, [])
            step[1].append((rid, [out.token] if out.token >= 0 else [], out.finish_reason))
            if out.finish_reason is not None:
                ended.append((rid, out.finish_reason))
        if steps:  # one wake-up of the event loop per step, whatever the batch size
            self.loop.call_soon_threadsafe(self._deliver, list(steps.values()), ended)

    def _deliver(self, steps: list[tuple[asyncio.Queue, list]], ended: list) -> None:  # loop
        for q, items in steps:
            q.put_nowait(items)
        for rid, reason in ended:
            self._end(rid, reason)

    def _on_error(self, exc: BaseException) -> None:  # engine thread
        for s in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(s.request_id)
        err = WorkerError(f"decode engine failed: {exc!r}")
        for rid in list(self._streams):
            self.loop.call_soon_threadsafe(self._end, rid, err)

    def stats(self) -> dict:
        return {
            "role": "decode",
            "replica": self.spec.replica,
            "used_blocks": self.blocks.num_used,
            "free_blocks": self.blocks.num_free,
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting),
            "streams": len(self._streams),
            "channels": len(self._channels),
            "transfers_pending": self.transfers_pending,
            "transfers": dict(self.xfer),
            "steps": self.engine.steps,
            "omp_threads": self.thread.omp_threads,
        }


@ray.remote
class RankWorker:
    """Rank r >= 1 of a tensor-parallel group: its shard of the weights and KV
    pool. It runs every plan the leader broadcasts and, on decode, READs its
    shard of a prompt's KV from the same rank of the prefill group."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.runner = _load_runner(spec)
        self.agent = _make_backend(spec, self.runner.kv_pool)
        self.steps = 0
        self.omp_threads: int | None = None
        tp = self.runner.tp = TPGroup(spec.tp_rank, spec.tp_size, self.runner.device)
        try:
            leader = ray.get_actor(spec.rank_name(0))
            tp.join(ray.get(leader.tp_address.remote(), timeout=RENDEZVOUS_TIMEOUT_S))
            tp.gather(self.agent.rank_kv([]))
        except Exception as e:  # noqa: BLE001 - exit, so Ray restarts us to try again
            tp.failed(e)
        threading.Thread(target=self._follow, name="tp-follow", daemon=True).start()

    def _follow(self) -> None:
        self.omp_threads = _model_thread_start(self.runner, self.spec.num_threads)
        while True:
            plan = self.runner.tp.recv()
            if plan is not None:
                self.runner.run(plan)
                self.steps += 1

    def pull(self, src: RankKV, blocks: list[int], timeout_s: float) -> int:
        return self.agent.pull(src, blocks, timeout_s=timeout_s)

    def ready(self) -> dict:
        return _ready(self.spec, self.agent)

    def stats(self) -> dict:
        return {"rank": self.spec.tp_rank, "steps": self.steps, "omp_threads": self.omp_threads}


__all__ = [
    "DecodeWorker",
    "OutputChannel",
    "PrefillResult",
    "PrefillWorker",
    "RankWorker",
    "TransferError",
    "WorkerError",
    "WorkerSpec",
]
