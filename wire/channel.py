"""The router's end of a decode worker's output stream (`DecodeWorker.outputs`).

No torch, no nixl: this runs in the router process.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import ray

from wire.api import Delta, WorkerError


class OutputChannel:
    """The caller's end of a decode worker's `outputs` stream: one Ray stream per
    (caller, decode actor) carries every request's tokens, step by step; this
    hands each request its own queue. If the stream fails (actor died or
    restarted), every open request's queue gets the error and the channel is
    dead: the caller opens a new one for later requests."""

    def __init__(self, actor, name: str):
        self.id = f"{name}-{uuid.uuid4().hex}"  # never repeats (id(self) would)
        self.error: BaseException | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self.messages = 0  # received so far (the router replaces a channel past a bound)
        self._open = asyncio.Event()  # the worker has the channel (its first, empty message)
        self._gen = actor.outputs.options(num_returns="streaming").remote(self.id)
        self._task = asyncio.get_event_loop().create_task(self._pump())

    @property
    def alive(self) -> bool:
        return self.error is None

    def __len__(self) -> int:
        """Requests with a queue open on this channel."""
        return len(self._queues)

    def open(self, request_id: str) -> asyncio.Queue:
        """Items: Deltas in order, or an exception when the channel fails."""
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
    ) -> AsyncIterator[Delta]:
        """The Deltas (tokens, finish reason, logprobs) of one request until it finishes. `submit()`
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
                while item.finish_reason is None and buf and isinstance(buf[0], Delta):
                    item.extend(buf.popleft())
                yield item
                if item.finish_reason is not None:
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
                self.messages += 1
                self._open.set()
                for rid, delta in items:
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(delta)
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
