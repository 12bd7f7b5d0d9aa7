"""Health of one role's worker replicas, seen from the router.

A progress watchdog: every poll reads each worker's `stats()` under a timeout.
A worker that has work but whose step counter has not moved for `watchdog_s`,
or that has not answered for `watchdog_s`, is marked unhealthy, gets no new
work, its in-flight calls fail over (`call` raises `WorkerStalled`), and it is
killed so Ray restarts it (`max_restarts`). A worker that answers again with
progress is healthy again: workers re-register simply by answering.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import ray

from workers.api import DecodeStats, PrefillStats, WorkerStats

log = logging.getLogger("pdcluster.health")


class WorkerStalled(Exception):
    """The worker serving this call was marked unhealthy while we waited."""


class WorkerPool:
    def __init__(self, role: str, handles: list, watchdog_s: float, metrics) -> None:
        self.role = role
        self.handles = handles
        self.watchdog_s = watchdog_s
        self.metrics = metrics
        n = len(handles)
        self.healthy = [True] * n
        self.load = [0] * n  # router-side outstanding work
        self.stats: list[WorkerStats | None] = [None] * n
        self.reason = [""] * n
        self._last_answer = [time.monotonic()] * n
        self._last_progress = [time.monotonic()] * n
        self._steps = [-1] * n
        # Set when replica i goes unhealthy; in-flight calls wait on it.
        self._lost = [asyncio.Event() for _ in range(n)]
        metrics.healthy.labels(role).set(n)

    # ---- routing ----------------------------------------------------------

    def pick(self, exclude: set[int] | frozenset = frozenset()) -> int | None:
        """Least-loaded healthy replica not in `exclude` (None when there is none).

        Prefill: fewest queued prompt tokens (the worker's last report plus what
        this router sent since it answered). Decode: most free KV blocks (last
        report), ties broken by fewer open streams from this router."""
        ok = [i for i in range(len(self.handles)) if self.healthy[i] and i not in exclude]
        if not ok:
            return None
        if self.role == "prefill":
            return min(ok, key=lambda i: (self.load[i] + self._engine(i, "queued_tokens"), i))
        return min(ok, key=lambda i: (-self._engine(i, "free_blocks"), self.load[i], i))

    def _engine(self, i: int, key: str) -> int:
        s = self.stats[i]
        return getattr(s.engine, key) if s else 0

    async def call(self, i: int, awaitable, timeout: float):
        """Await a call to replica i, bounded by `timeout`, abandoned (WorkerStalled)
        as soon as the watchdog marks the replica unhealthy."""
        task = asyncio.ensure_future(awaitable)
        # Abandoned calls may still fail later (Ray cancels a cancelled request's child
        # tasks): their errors are retrieved here, not logged as never retrieved.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        lost = asyncio.ensure_future(self._lost[i].wait())
        try:
            done, _ = await asyncio.wait(
                {task, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                return task.result()
            task.cancel()
            if lost in done:
                raise WorkerStalled(f"{self.role}-{i} unhealthy: {self.reason[i]}")
            raise TimeoutError(f"{self.role}-{i} did not answer within {timeout:.1f}s")
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()

    # ---- the watchdog -----------------------------------------------------

    def _mark(self, i: int, healthy: bool, reason: str = "") -> None:
        if self.healthy[i] == healthy:
            return
        self.healthy[i], self.reason[i] = healthy, reason
        if healthy:
            self._lost[i] = asyncio.Event()
            log.warning("%s-%d healthy again", self.role, i)
        else:
            self._lost[i].set()
            log.warning("%s-%d unhealthy: %s", self.role, i, reason)
        self.metrics.healthy.labels(self.role).set(sum(self.healthy))

    def _restart(self, i: int, reason: str) -> None:
        self._mark(i, False, reason)
        self.metrics.restarts.labels(self.role).inc()
        # SIGKILL works on a SIGSTOPped process too; Ray then restarts the actor.
        ray.kill(self.handles[i], no_restart=False)

    async def _poll_one(self, i: int) -> None:
        now = time.monotonic()
        try:
            s = await asyncio.wait_for(
                self.handles[i].stats.remote(), timeout=min(self.watchdog_s, 5.0)
            )
        except (asyncio.TimeoutError, TimeoutError):
            if self.healthy[i] and now - self._last_answer[i] > self.watchdog_s:
                self._restart(i, f"no answer for {now - self._last_answer[i]:.1f}s")
            return
        except Exception as e:  # noqa: BLE001 - dead or restarting: unhealthy until it answers
            self._mark(i, False, f"unreachable: {type(e).__name__}")
            self.stats[i] = None
            return
        self.stats[i] = s
        self._last_answer[i] = now
        self._publish()
        # Busy means work that can run: a worker waiting for KV blocks is not stalled.
        steps = s.engine.steps
        if steps != self._steps[i] or not s.busy:
            self._last_progress[i] = now
        self._steps[i] = steps
        if self.healthy[i] and now - self._last_progress[i] > self.watchdog_s:
            self._restart(i, f"busy without a step for {now - self._last_progress[i]:.1f}s")
        elif not self.healthy[i] and now - self._last_progress[i] <= self.watchdog_s:
            self._mark(i, True)

    def _publish(self) -> None:
        """Worker-side counts as router gauges, so one scrape sees the cluster."""
        m = self.metrics
        live = [s for s in self.stats if s]
        for i, s in enumerate(self.stats):
            if s:
                m.blocks_used.labels(self.role, str(i)).set(s.engine.used_blocks)
        if self.role == "decode":
            m.transfer_pending.set(
                sum(s.transfers_pending for s in live if isinstance(s, DecodeStats))
            )
        else:
            m.leases.set(sum(s.engine.leases for s in live if isinstance(s, PrefillStats)))

    async def poll(self) -> None:
        await asyncio.gather(*[self._poll_one(i) for i in range(len(self.handles))])

    async def fresh_stats(self) -> list[WorkerStats | None]:
        """Stats read now (for /debug/state); None for a worker that does not answer."""

        async def one(h):
            try:
                return await asyncio.wait_for(h.stats.remote(), timeout=5)
            except (Exception, asyncio.TimeoutError):  # noqa: BLE001
                return None

        return list(await asyncio.gather(*[one(h) for h in self.handles]))

    def describe(self, i: int, stats: WorkerStats | None) -> dict:
        return {
            "role": self.role,
            "replica": i,
            "healthy": self.healthy[i],
            "reason": self.reason[i],
            "load": self.load[i],
            "stats": msgspec.to_builtins(stats) if stats is not None else None,
        }
