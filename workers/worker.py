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
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import ray
import torch

from transfer import KVHandle, NixlTransferAgent, TransferError
from workers.engine import Engine, StepOutput
from workers.kv_cache import BlockManager, NoFreeBlocks
from workers.runner import ModelRunner
from workers.sampling_params import SamplingParams
from workers.sequence import Sequence

log = logging.getLogger("pdcluster.worker")


class WorkerError(Exception):
    """A worker could not serve a request (engine failure, no room, deadline)."""


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs to start; built by the launcher from the config."""

    role: str                  # "prefill" | "decode"
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


class PrefillResult(msgspec.Struct, frozen=True):
    request_id: str
    first_token: int
    finish_reason: str | None  # set when the first token already ends the request
    handle: KVHandle | None    # None when finished: nothing to transfer


class _Lease(msgspec.Struct):
    blocks: list[int]
    expires: float  # time.monotonic()


class _EngineThread:
    """Runs `engine.step()` in a loop on a dedicated thread; other threads
    hand it work as callables through an inbox, so engine state has one owner."""

    def __init__(self, engine: Engine, on_outputs: Callable[[list[StepOutput]], None],
                 on_tick: Callable[[], None], on_error: Callable[[BaseException], None],
                 idle_wait_s: float = 0.01):
        self.engine = engine
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._on_outputs, self._on_tick, self._on_error = on_outputs, on_tick, on_error
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
        while not self._stop.is_set():
            try:
                self._drain(block=not self.engine.has_work)
                if self.engine.has_work:
                    self._on_outputs(self.engine.step())
                self._on_tick()
            except BaseException as e:  # noqa: BLE001 - report, never die silently
                log.exception("engine step failed")
                self._on_error(e)


def _fail_future(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, exc: BaseException):
    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(exc))


class _WorkerBase:
    def __init__(self, spec: WorkerSpec):
        torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.runner = ModelRunner(spec.model_dir, max_model_len=spec.max_model_len,
                                  num_blocks=spec.kv_blocks, block_size=spec.block_size,
                                  dtype=spec.dtype, device=spec.device)
        self.blocks = BlockManager(spec.kv_blocks, spec.block_size)
        self.engine = Engine(self.runner, self.blocks, max_batched_tokens=spec.max_batched_tokens,
                             max_running=spec.max_running, prefill_only=spec.role == "prefill")
        self.agent = NixlTransferAgent(f"{spec.role}-{spec.replica}", self.runner.kv_pool)
        self.loop = asyncio.get_event_loop()
        self.thread = _EngineThread(self.engine, self._on_outputs, self._on_tick, self._on_error)

    def _on_outputs(self, outputs: list[StepOutput]) -> None:
        raise NotImplementedError

    def _on_tick(self) -> None:
        pass

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
        return {"role": self.spec.role, "replica": self.spec.replica, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "agent": self.agent.name}


@ray.remote
class PrefillWorker(_WorkerBase):
    """Runs prompts, samples the first token, pins the prompt's KV under a lease."""

    def __init__(self, spec: WorkerSpec):
        self._futures: dict[str, asyncio.Future] = {}
        self.leases: dict[str, _Lease] = {}
        self.leases_expired = 0
        super().__init__(spec)

    async def prefill(self, request_id: str, prompt_ids: list[int],
                      params: SamplingParams) -> PrefillResult:
        if len(self.leases) + len(self._futures) >= self.spec.max_pending:
            raise WorkerError(f"prefill-{self.spec.replica}: {self.spec.max_pending} "
                              "requests pending; try later")
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

    async def release(self, request_id: str) -> None:
        """Drop a request's lease or queued prefill (router's `finally` backstop)."""
        self.thread.call(lambda: self._release(request_id))

    def _release(self, request_id: str) -> None:  # engine thread
        self.engine.abort(request_id)
        lease = self.leases.pop(request_id, None)
        if lease is not None:
            self.blocks.free(lease.blocks)

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
                old = self.leases.pop(seq.request_id, None)
                if old is not None:  # a caller reused an id: never leak the older blocks
                    self.blocks.free(old.blocks)
                self.leases[seq.request_id] = _Lease(seq.block_table, time.monotonic() + ttl)
                handle = KVHandle(request_id=seq.request_id, backend="nixl",
                                  num_tokens=seq.num_cached,
                                  ranks=[self.agent.rank_kv(seq.block_table)],
                                  expires_at=time.time() + ttl)
            if fut is not None:
                res = PrefillResult(seq.request_id, out.token, out.finish_reason, handle)
                self.loop.call_soon_threadsafe(lambda f=fut, r=res: f.done() or f.set_result(r))

    def _on_tick(self) -> None:  # engine thread
        for msg in self.agent.poll_notifs():
            lease = self.leases.pop(msg.decode(), None)
            if lease is not None:
                self.blocks.free(lease.blocks)
        now = time.monotonic()
        for rid in [r for r, lease in self.leases.items() if lease.expires <= now]:
            self.blocks.free(self.leases.pop(rid).blocks)
            self.leases_expired += 1

    def _on_error(self, exc: BaseException) -> None:  # engine thread
        for s in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(s.request_id)
        for fut in list(self._futures.values()):
            _fail_future(self.loop, fut, WorkerError(f"prefill engine failed: {exc!r}"))

    def stats(self) -> dict:
        return {"role": "prefill", "replica": self.spec.replica,
                "pinned_blocks": self.blocks.num_used, "leases": len(self.leases),
                "leases_expired": self.leases_expired, "pending": len(self._futures),
                "queued_tokens": self.engine.num_queued_tokens, "steps": self.engine.steps}


@ray.remote
class DecodeWorker(_WorkerBase):
    """Pulls a request's KV from prefill and decodes it in the running batch."""

    def __init__(self, spec: WorkerSpec):
        self._streams: dict[str, asyncio.Queue] = {}
        self.transfers_pending = 0
        super().__init__(spec)
        # One transfer thread: pulls poll NIXL and must not block the event loop.
        self._xfer = ThreadPoolExecutor(1, thread_name_prefix="kv-pull")

    async def generate(self, request_id: str, prompt_ids: list[int], first_token: int,
                       params: SamplingParams, handle: KVHandle,
                       deadline: float) -> AsyncIterator[tuple[list[int], str | None]]:
        """Stream (new token ids, finish_reason) until the request finishes.
        The first token came from prefill and is not repeated here."""
        if handle.num_tokens != len(prompt_ids):
            raise WorkerError(f"KV handle holds {handle.num_tokens} tokens, "
                              f"prompt has {len(prompt_ids)}")
        blocks = await self._allocate_for(handle, deadline)
        try:
            self.transfers_pending += 1
            try:
                await self.loop.run_in_executor(
                    self._xfer, lambda: self.agent.pull(
                        handle.ranks[0], blocks, timeout_s=self.spec.transfer_timeout_s,
                        notif=request_id.encode()))
            finally:
                self.transfers_pending -= 1
        except BaseException:
            self.blocks.free(blocks)
            raise
        seq = Sequence(request_id, prompt_ids, params, output_ids=[first_token])
        seq.block_table, seq.num_cached = blocks, handle.num_tokens
        async for item in self._run(seq, deadline):
            yield item

    async def generate_local(self, request_id: str, prompt_ids: list[int],
                             params: SamplingParams,
                             deadline: float) -> AsyncIterator[tuple[list[int], str | None]]:
        """Decode-only fallback when no prefill worker is healthy: prefill here,
        then decode; streams every token including the first."""
        async for item in self._run(Sequence(request_id, prompt_ids, params), deadline):
            yield item

    async def _run(self, seq: Sequence,
                   deadline: float) -> AsyncIterator[tuple[list[int], str | None]]:
        """Hand `seq` to the engine and stream its tokens; on any exit before
        it finished, abort it there (which frees its blocks)."""
        rid = seq.request_id
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = q
        finished = False
        self.thread.call(lambda: self.engine.add(seq))
        try:
            while True:
                timeout = deadline - time.time()
                if timeout <= 0:
                    raise TimeoutError(f"request {rid} passed its deadline in decode")
                tokens, reason = await asyncio.wait_for(q.get(), timeout)
                if isinstance(reason, BaseException):
                    raise reason
                yield tokens, reason
                if reason is not None:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.thread.call(lambda: self.engine.abort(rid))

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
        self.thread.call(lambda: self.engine.abort(request_id))

    def _on_outputs(self, outputs: list[StepOutput]) -> None:  # engine thread
        for out in outputs:
            q = self._streams.get(out.seq.request_id)
            if q is None:  # consumer gone: stop computing for it
                if out.finish_reason is None:
                    self.engine.abort(out.seq.request_id)
                continue
            item = ([out.token] if out.token >= 0 else [], out.finish_reason)
            self.loop.call_soon_threadsafe(q.put_nowait, item)

    def _on_error(self, exc: BaseException) -> None:  # engine thread
        for s in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(s.request_id)
        err = WorkerError(f"decode engine failed: {exc!r}")
        for q in list(self._streams.values()):
            self.loop.call_soon_threadsafe(q.put_nowait, ([], err))

    def stats(self) -> dict:
        return {"role": "decode", "replica": self.spec.replica,
                "used_blocks": self.blocks.num_used, "free_blocks": self.blocks.num_free,
                "running": len(self.engine.running), "waiting": len(self.engine.waiting),
                "streams": len(self._streams), "transfers_pending": self.transfers_pending,
                "steps": self.engine.steps}


__all__ = ["DecodeWorker", "PrefillResult", "PrefillWorker", "TransferError", "WorkerError",
           "WorkerSpec"]
