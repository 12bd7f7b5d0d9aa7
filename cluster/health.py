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

from cluster.peers import identify, kill_worker
from workers.api import DecodeStats, PrefillStats, WorkerStats

log = logging.getLogger("pdcluster.health")


SILENT_POLL_S = 2.0  # poll period of a replica silent for longer than the watchdog
IDENTIFY_TIMEOUT_S = 10.0  # asking a new worker process for its start time
KILL_WAIT_S = 60.0  # a kill task on the worker's node (its start there, a stalled node)
GONE_POLL_S = 10.0  # and of one taken to be gone for good
NAMESPACE = "pdcluster"  # of the workers' named actors, `pdcluster-<role>-<i>-rank<r>`


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("health poll failed", exc_info=task.exception())


class WorkerStalled(Exception):
    """The worker serving this call was marked unhealthy while we waited."""


class WorkerPool:
    def __init__(
        self,
        role: str,
        handles: list,
        watchdog_s: float,
        metrics,
        health_period_s: float = 0.5,
        restart=None,
    ) -> None:
        self.role = role
        # async (worker name, handle, incarnation) -> bool: kills a stalled worker once
        # across router replicas (cluster/peers.py); False when another already did.
        # None: this router kills it itself.
        self.restart_hook = restart
        self.handles = handles
        self.watchdog_s = watchdog_s
        # A stats() call unanswered this long (several polls, before the watchdog
        # decides): suspect. Its last stats are stale (a frozen decode still shows the
        # free blocks it had), so new work goes to replicas that answer while any do.
        self.suspect_after_s = min(watchdog_s / 2, max(2.0, 4 * health_period_s))
        self.health_period_s = health_period_s
        self._polling: list[asyncio.Future | None] = [None] * len(handles)
        self._sent_at = [0.0] * len(handles)  # when the stats() call in flight was sent
        self.metrics = metrics
        n = len(handles)
        self.healthy = [True] * n
        self.load = [0] * n  # router-side outstanding work
        self.stats: list[WorkerStats | None] = [None] * n
        self.reason = [""] * n
        self._last_answer = [time.monotonic()] * n
        self._last_progress = [time.monotonic()] * n
        self._steps = [-1] * n
        # (node, pid, start time) of the process that last answered, once it has said
        # when it started (asked once per new process): what a kill of it names.
        self._ident: list[tuple[str, int, int | None] | None] = [None] * n
        self._identifying: list[asyncio.Future | None] = [None] * n
        # Set when replica i goes unhealthy; in-flight calls wait on it.
        self._lost = [asyncio.Event() for _ in range(n)]
        # At most one stats() call in flight per replica (a dead node's calls would
        # otherwise pile up in Ray's queue), and a silent replica is polled less often.
        self.polls = [0] * n  # stats() calls sent, per replica
        self._inflight: list[asyncio.Future | None] = [None] * n
        self._next_poll = [0.0] * n
        # Silent this long: taken to be gone for good (its node died), reported as
        # lost and polled every GONE_POLL_S; healthy again if it ever answers.
        self.gone_after_s = max(5 * watchdog_s, 15.0)
        metrics.healthy.labels(role).set(n)

    # ---- routing ----------------------------------------------------------

    def pick(
        self, exclude: set[int] | frozenset = frozenset(), avoid: set[int] | frozenset = frozenset()
    ) -> int | None:
        """Least-loaded healthy replica not in `exclude` (None when there is none),
        preferring replicas that answer their polls and are not in `avoid`.

        Prefill: fewest queued prompt tokens (the worker's last report plus what
        this router sent since it answered). Decode: most free KV blocks (last
        report), ties broken by fewer open streams from this router."""
        ok = [i for i in range(len(self.handles)) if self.healthy[i] and i not in exclude]
        if not ok:
            return None
        answering = [i for i in ok if not self.suspect(i)]
        ok = [i for i in answering if i not in avoid] or answering or ok
        if self.role == "prefill":
            return min(ok, key=lambda i: (self.load[i] + self._engine(i, "queued_tokens"), i))
        return min(ok, key=lambda i: (-self._engine(i, "free_blocks"), self.load[i], i))

    def suspect(self, i: int) -> bool:
        """Replica i has left a stats() call unanswered for suspect_after_s."""
        sent = self._sent_at[i]
        return self._inflight[i] is not None and time.monotonic() - sent > self.suspect_after_s

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

    def incarnation(self, i: int) -> str | None:
        """Which process replica i was when it last answered, `node:pid:start` (a restart
        changes it); None when it has not answered this router, or not yet said when it
        started."""
        s, ident = self.stats[i], self._ident[i]
        if s is None or ident is None or ident[:2] != (s.node_id, s.pid) or ident[2] is None:
            return None
        return f"{s.node_id}:{s.pid}:{ident[2]}"

    def _identify(self, i: int, s: WorkerStats) -> None:
        """Ask the process that just answered for replica i when it started, once (again
        only if that failed): a kill names pid and start time, never just the actor."""
        ident = self._ident[i]
        asking = self._identifying[i]
        if ident is not None and ident[:2] == (s.node_id, s.pid):
            if ident[2] is not None or (asking is not None and not asking.done()):
                return
        self._ident[i] = (s.node_id, s.pid, None)

        async def ask():
            pid, start = await self.handles[i].__ray_call__.remote(identify)
            if self._ident[i] == (s.node_id, pid, None):  # still the process that answered
                self._ident[i] = (s.node_id, pid, start)

        task = self._identifying[i] = asyncio.ensure_future(
            asyncio.wait_for(ask(), IDENTIFY_TIMEOUT_S)
        )
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _restart(self, i: int, reason: str) -> None:
        """Unhealthy at once (its calls fail over), then killed so Ray restarts it,
        unless another router replica already killed this incarnation."""
        self._mark(i, False, reason)
        name, incarnation = f"{self.role}-{i}", self.incarnation(i)
        killed = None  # None: not done through the peers, this router kills it
        if self.restart_hook is not None:
            try:
                killed = await self.restart_hook(name, self.handles[i], incarnation)
            except (asyncio.TimeoutError, TimeoutError):
                # Late, not lost: the peers actor will still run the request. A named
                # process is killed here too (the same kill twice is harmless); an unnamed
                # one is left to it, or it would kill the fresh process after this one.
                log.warning("%s: the router peers answer late (%s)", name, incarnation)
                if incarnation is None:
                    return
            except Exception:  # noqa: BLE001 - unreachable: killed here rather than never
                log.exception("could not have %s restarted through the router peers", name)
        if killed is False:
            log.warning("%s: already restarted by another router replica", name)
            return
        self.metrics.restarts.labels(self.role).inc()
        if killed is None:
            kill = kill_worker(self.handles[i], incarnation)
            if kill is not None:  # read, so that a kill whose node died is not reported
                asyncio.ensure_future(asyncio.wait_for(kill, KILL_WAIT_S)).add_done_callback(
                    lambda t: t.cancelled() or t.exception()
                )

    def gone(self, i: int) -> bool:
        return time.monotonic() - self._last_answer[i] > self.gone_after_s

    def lost(self) -> list[str]:
        return [f"{self.role}-{i}" for i in range(len(self.handles)) if self.gone(i)]

    def _stats_call(self, i: int) -> asyncio.Future:
        """Replica i's stats() call: the one in flight (or answered late, after its
        poll gave up waiting: that answer is still read), or a new one."""
        fut = self._inflight[i]
        if fut is None:

            async def call():
                return await self.handles[i].stats.remote()

            fut = self._inflight[i] = asyncio.ensure_future(call())
            self._sent_at[i] = time.monotonic()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # always retrieved
            self.polls[i] += 1
        return fut

    def _back_off(self, i: int, now: float) -> None:
        """Poll a silent replica at the normal rate until the watchdog has had its say,
        then every SILENT_POLL_S, and every GONE_POLL_S once it is taken to be gone."""
        silent = now - self._last_answer[i]
        if silent > self.gone_after_s:
            self._next_poll[i] = now + GONE_POLL_S
        elif silent > self.watchdog_s:
            self._next_poll[i] = now + SILENT_POLL_S

    async def _find_again(self, i: int) -> None:
        """Replica i's actor is dead for good: the launcher started it again under the
        same name when its node was lost (cluster/launcher.py Keeper). Calls go to the
        new actor from now on; they wait until it has started."""
        name = f"pdcluster-{self.role}-{i}-rank0"
        try:
            h = await asyncio.wait_for(asyncio.to_thread(ray.get_actor, name, NAMESPACE), 5)
        except Exception:  # noqa: BLE001 - not started again (yet): looked up at the next poll
            return
        if h != self.handles[i]:
            log.warning("%s-%d: found again under its name (a new actor)", self.role, i)
            self.handles[i] = h
            self._next_poll[i] = 0.0

    async def _poll_one(self, i: int) -> None:
        now = time.monotonic()
        answered = self._inflight[i] is not None and self._inflight[i].done()
        if now < self._next_poll[i] and not answered:  # an answer that came is read at once
            return
        try:
            call = self._stats_call(i)
            # Waits no later than the watchdog's deadline: a silent replica is found
            # at watchdog_s, not a whole wait after it.
            until_deadline = self._last_answer[i] + self.watchdog_s - now + 0.05
            s = await asyncio.wait_for(
                asyncio.shield(call), timeout=min(5.0, max(0.2, until_deadline))
            )
            self._inflight[i] = None  # answered and read
        except (asyncio.TimeoutError, TimeoutError):
            now = time.monotonic()  # the wait itself took time
            if self.healthy[i] and now - self._last_answer[i] > self.watchdog_s:
                await self._restart(i, f"no answer for {now - self._last_answer[i]:.1f}s")
            self._back_off(i, now)
            return
        except Exception as e:  # noqa: BLE001 - dead or restarting: unhealthy until it answers
            self._inflight[i] = None
            self._mark(i, False, f"unreachable: {type(e).__name__}")
            self.stats[i] = None
            self._back_off(i, now)
            if isinstance(e, ray.exceptions.ActorDiedError):
                await self._find_again(i)
            return
        now = time.monotonic()  # when the answer came (the wait may have been long)
        self._next_poll[i] = 0.0
        self.stats[i] = s
        self._last_answer[i] = now
        self._identify(i, s)
        self._publish()
        # Busy means work that can run: a worker waiting for KV blocks is not stalled.
        steps = s.engine.steps
        if steps != self._steps[i] or not s.busy:
            self._last_progress[i] = now
        self._steps[i] = steps
        if self.healthy[i] and s.engine.fault:  # the worker itself says it cannot serve
            await self._restart(i, s.engine.fault)
        elif self.healthy[i] and now - self._last_progress[i] > self.watchdog_s:
            await self._restart(i, f"busy without a step for {now - self._last_progress[i]:.1f}s")
        elif (
            not self.healthy[i]
            and not s.engine.fault
            and now - self._last_progress[i] <= self.watchdog_s
        ):
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
        """Poll every replica not still being polled, waiting at most one health
        period: a silent replica's poll runs on (up to its watchdog deadline) without
        holding up the others'."""
        for i, task in enumerate(self._polling):
            if task is None or task.done():
                task = self._polling[i] = asyncio.ensure_future(self._poll_one(i))
                task.add_done_callback(_log_failure)
        await asyncio.wait(self._polling, timeout=self.health_period_s)

    async def fresh_stats(self) -> list[WorkerStats | None]:
        """Stats read now (for /debug/state); None for a worker that does not answer."""

        async def one(i):
            if self.gone(i):
                return None
            call = self._stats_call(i)
            try:
                s = await asyncio.wait_for(asyncio.shield(call), timeout=5)
            except (asyncio.TimeoutError, TimeoutError):
                return None
            except Exception:  # noqa: BLE001 - dead or restarting
                s = None
            if self._inflight[i] is call:
                self._inflight[i] = None
            return s

        return list(await asyncio.gather(*[one(i) for i in range(len(self.handles))]))

    def describe(self, i: int, stats: WorkerStats | None) -> dict:
        return {
            "role": self.role,
            "replica": i,
            "healthy": self.healthy[i],
            "lost": self.gone(i),
            "polls": self.polls[i],
            "reason": self.reason[i],
            "load": self.load[i],
            "stats": msgspec.to_builtins(stats) if stats is not None else None,
        }
