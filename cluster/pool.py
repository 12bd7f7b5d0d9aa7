"""The router's pool of one role's worker replicas: which one gets new work, and the
watchdog that decides which are healthy.

A progress watchdog: every poll reads each worker's `stats()` under a timeout.
A worker that has work but whose step counter has not moved for `watchdog_s`,
or that has not answered for `watchdog_s`, is marked unhealthy, gets no new
work, its in-flight calls fail over (`call` raises `WorkerStalled`), and it is
killed so Ray restarts it (`max_restarts`). A worker that answers again with
progress is healthy again: workers re-register simply by answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import ray

from cluster.peers import identify, kill_worker
from wire.api import DecodeStats, PrefillStats, WorkerStats

log = logging.getLogger("pdcluster.pool")


SILENT_POLL_S = 2.0  # poll period of a replica silent for longer than the watchdog
IDENTIFY_TIMEOUT_S = 10.0  # asking a new worker process for its start time
KILL_WAIT_S = 60.0  # a kill task on the worker's node (its start there, a stalled node)
GONE_POLL_S = 10.0  # and of one taken to be gone for good
TRANSFER_AVOID_S = 5.0  # new work avoids a prefill replica this long after 2 failed pulls
TRANSFER_AVOID_MAX_S = 60.0  # in a row, doubling with each further failure, up to this
NAMESPACE = "pdcluster"  # of the workers' named actors, `pdcluster-<role>-<i>-rank<r>`


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("health poll failed", exc_info=task.exception())


class WorkerStalled(Exception):
    """The worker serving this call was marked unhealthy while we waited."""


@dataclass
class Replica:
    """What the router knows of one worker replica (its group's leader actor)."""

    handle: object  # the leader's actor handle; replaced when the actor is started again
    healthy: bool = True
    reason: str = ""  # why it is unhealthy
    load: int = 0  # work this router sent that has not ended (held through WorkerPool.hold)
    stats: WorkerStats | None = None  # its last answer
    last_answer: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    steps: int = -1  # its engine's step counter at the last answer
    # (node, pid, start time) of the process that last answered, once it has said when
    # it started (asked once per new process): what a kill of it names.
    ident: tuple[str, int, int | None] | None = None
    # Prefill: KV transfers from it that failed in a row, and until when new work avoids
    # it for that (decode may not reach it: a partition the router's own polls miss).
    transfer_fails: int = 0
    transfer_avoid_until: float = 0.0
    identifying: asyncio.Future | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set when it goes unhealthy
    # At most one stats() call in flight (a dead node's calls would otherwise pile up in
    # Ray's queue), and a silent replica is polled less often.
    polls: int = 0  # stats() calls sent
    inflight: asyncio.Future | None = None
    sent_at: float = 0.0  # when the stats() call in flight was sent
    next_poll: float = 0.0
    polling: asyncio.Future | None = None  # its _poll_one task

    def engine(self, key: str) -> int:
        return getattr(self.stats.engine, key) if self.stats else 0


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
        self.replicas = [Replica(h) for h in handles]
        self.watchdog_s = watchdog_s
        # A stats() call unanswered this long (several polls, before the watchdog
        # decides): suspect. Its last stats are stale (a frozen decode still shows the
        # free blocks it had), so new work goes to replicas that answer while any do.
        self.suspect_after_s = min(watchdog_s / 2, max(2.0, 4 * health_period_s))
        self.health_period_s = health_period_s
        self.metrics = metrics
        # Silent this long: taken to be gone for good (its node died), reported as
        # lost and polled every GONE_POLL_S; healthy again if it ever answers.
        self.gone_after_s = max(5 * watchdog_s, 15.0)
        metrics.healthy.labels(role).set(len(handles))

    def __len__(self) -> int:
        return len(self.replicas)

    def handle(self, i: int):
        return self.replicas[i].handle

    def healthy_count(self) -> int:
        return sum(r.healthy for r in self.replicas)

    def stats(self) -> list[WorkerStats | None]:
        return [r.stats for r in self.replicas]

    # ---- routing ----------------------------------------------------------

    def pick(
        self, exclude: set[int] | frozenset = frozenset(), avoid: set[int] | frozenset = frozenset()
    ) -> int | None:
        """Least-loaded healthy replica not in `exclude` (None when there is none),
        preferring replicas that answer their polls and are not in `avoid`.

        Prefill: fewest queued prompt tokens (the worker's last report plus what
        this router sent since it answered). Decode: most free KV blocks (last
        report), ties broken by fewer open streams from this router."""
        reps = self.replicas
        ok = [i for i, r in enumerate(reps) if r.healthy and i not in exclude]
        if not ok:
            return None
        answering = [i for i in ok if not self.suspect(i)]
        now = time.monotonic()
        ok = (
            [i for i in answering if i not in avoid and reps[i].transfer_avoid_until <= now]
            or [i for i in answering if i not in avoid]  # the request's own avoid comes first
            or answering
            or ok
        )
        if self.role == "prefill":
            return min(ok, key=lambda i: (reps[i].load + reps[i].engine("queued_tokens"), i))
        return min(ok, key=lambda i: (-reps[i].engine("free_blocks"), reps[i].load, i))

    def transfer_failed(self, i: int) -> None:
        """A KV transfer from prefill replica i failed or timed out (not an expired
        lease or a full decode pool: those say nothing of the path). From the second failure in a
        row (one alone may be chance), new work avoids it while another replica is
        healthy, for TRANSFER_AVOID_S, doubling with each further failure in a row up
        to TRANSFER_AVOID_MAX_S. A transfer that succeeds ends it (transfer_ok)."""
        r, now = self.replicas[i], time.monotonic()
        if r.transfer_avoid_until > now:
            return  # pulls already in flight when it began: no more evidence, no longer wait
        r.transfer_fails += 1
        if r.transfer_fails >= 2:
            doublings = min(r.transfer_fails - 2, 4)  # 5, 10, 20, 40, then 60 s
            wait = min(TRANSFER_AVOID_MAX_S, TRANSFER_AVOID_S * 2**doublings)
            r.transfer_avoid_until = now + wait

    def transfer_ok(self, i: int) -> None:
        r = self.replicas[i]
        r.transfer_fails, r.transfer_avoid_until = 0, 0.0

    @contextlib.contextmanager
    def hold(self, i: int, amount: int = 1) -> Iterator[None]:
        """Count `amount` of this router's work on replica i (what `pick` weighs) for
        the time the block runs."""
        r = self.replicas[i]
        r.load += amount
        try:
            yield
        finally:
            r.load -= amount

    def suspect(self, i: int) -> bool:
        """Replica i has left a stats() call unanswered for suspect_after_s."""
        r = self.replicas[i]
        return r.inflight is not None and time.monotonic() - r.sent_at > self.suspect_after_s

    async def call(self, i: int, awaitable, timeout: float):
        """Await a call to replica i, bounded by `timeout`, abandoned (WorkerStalled)
        as soon as the watchdog marks the replica unhealthy."""
        task = asyncio.ensure_future(awaitable)
        # Abandoned calls may still fail later (Ray cancels a cancelled request's child
        # tasks): their errors are retrieved here, not logged as never retrieved.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        lost = asyncio.ensure_future(self.replicas[i].lost.wait())
        try:
            done, _ = await asyncio.wait(
                {task, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                return task.result()
            task.cancel()
            if lost in done:
                raise WorkerStalled(f"{self.role}-{i} unhealthy: {self.replicas[i].reason}")
            raise TimeoutError(f"{self.role}-{i} did not answer within {timeout:.1f}s")
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()

    # ---- the watchdog -----------------------------------------------------

    def _mark(self, i: int, healthy: bool, reason: str = "") -> None:
        r = self.replicas[i]
        if r.healthy == healthy:
            return
        r.healthy, r.reason = healthy, reason
        if healthy:
            r.lost = asyncio.Event()
            r.transfer_fails, r.transfer_avoid_until = 0, 0.0  # a new start, maybe elsewhere
            log.warning("%s-%d healthy again", self.role, i)
        else:
            r.lost.set()
            log.warning("%s-%d unhealthy: %s", self.role, i, reason)
        self.metrics.healthy.labels(self.role).set(self.healthy_count())

    def incarnation(self, i: int) -> str | None:
        """Which process replica i was when it last answered, `node:pid:start` (a restart
        changes it); None when it has not answered this router, or not yet said when it
        started."""
        s, ident = self.replicas[i].stats, self.replicas[i].ident
        if s is None or ident is None or ident[:2] != (s.node_id, s.pid) or ident[2] is None:
            return None
        return f"{s.node_id}:{s.pid}:{ident[2]}"

    def _identify(self, i: int, s: WorkerStats) -> None:
        """Ask the process that just answered for replica i when it started, once (again
        only if that failed): a kill names pid and start time, never just the actor."""
        r = self.replicas[i]
        if r.ident is not None and r.ident[:2] == (s.node_id, s.pid):
            if r.ident[2] is not None or (r.identifying is not None and not r.identifying.done()):
                return
        r.ident = (s.node_id, s.pid, None)

        async def ask():
            pid, start = await r.handle.__ray_call__.remote(identify)
            if r.ident == (s.node_id, pid, None):  # still the process that answered
                r.ident = (s.node_id, pid, start)

        task = r.identifying = asyncio.ensure_future(asyncio.wait_for(ask(), IDENTIFY_TIMEOUT_S))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _restart(self, i: int, reason: str) -> None:
        """Unhealthy at once (its calls fail over), then killed so Ray restarts it,
        unless another router replica already killed this incarnation."""
        self._mark(i, False, reason)
        name, incarnation, handle = f"{self.role}-{i}", self.incarnation(i), self.handle(i)
        killed = None  # None: not done through the peers, this router kills it
        if self.restart_hook is not None:
            try:
                killed = await self.restart_hook(name, handle, incarnation)
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
            kill = kill_worker(handle, incarnation)
            if kill is not None:  # read, so that a kill whose node died is not reported
                asyncio.ensure_future(asyncio.wait_for(kill, KILL_WAIT_S)).add_done_callback(
                    lambda t: t.cancelled() or t.exception()
                )

    def gone(self, i: int) -> bool:
        return time.monotonic() - self.replicas[i].last_answer > self.gone_after_s

    def lost(self) -> list[str]:
        return [f"{self.role}-{i}" for i in range(len(self.replicas)) if self.gone(i)]

    def _stats_call(self, i: int) -> asyncio.Future:
        """Replica i's stats() call: the one in flight (or answered late, after its
        poll gave up waiting: that answer is still read), or a new one."""
        r = self.replicas[i]
        if r.inflight is None:
            handle = r.handle

            async def call():
                return await handle.stats.remote()

            r.inflight = asyncio.ensure_future(call())
            r.sent_at = time.monotonic()
            r.inflight.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            r.polls += 1
        return r.inflight

    def _back_off(self, i: int, now: float) -> None:
        """Poll a silent replica at the normal rate until the watchdog has had its say,
        then every SILENT_POLL_S, and every GONE_POLL_S once it is taken to be gone."""
        r = self.replicas[i]
        silent = now - r.last_answer
        if silent > self.gone_after_s:
            r.next_poll = now + GONE_POLL_S
        elif silent > self.watchdog_s:
            r.next_poll = now + SILENT_POLL_S

    def find_by_name(self) -> None:
        """Take each replica's actor by its name: the handles a router replica is given
        when its deployment is made go stale once the launcher starts a lost worker again
        (cluster/launcher.py Keeper), and a router replica that Serve starts later (after
        a crash) would otherwise send its first requests to the dead actor until its
        first poll found the new one. Blocking: at the router's start only."""
        for i, r in enumerate(self.replicas):
            try:
                r.handle = ray.get_actor(f"pdcluster-{self.role}-{i}-rank0", NAMESPACE)
            except Exception:  # noqa: BLE001 - not running now: the poller looks again
                pass

    async def _find_again(self, i: int) -> None:
        """Replica i's actor is dead for good: the launcher started it again under the
        same name when its node was lost (cluster/launcher.py Keeper). Calls go to the
        new actor from now on; they wait until it has started."""
        name = f"pdcluster-{self.role}-{i}-rank0"
        try:
            h = await asyncio.wait_for(asyncio.to_thread(ray.get_actor, name, NAMESPACE), 5)
        except Exception:  # noqa: BLE001 - not started again (yet): looked up at the next poll
            return
        r = self.replicas[i]
        if h != r.handle:
            log.warning("%s-%d: found again under its name (a new actor)", self.role, i)
            r.handle = h
            r.next_poll = 0.0

    async def _poll_one(self, i: int) -> None:
        r = self.replicas[i]
        now = time.monotonic()
        answered = r.inflight is not None and r.inflight.done()
        if now < r.next_poll and not answered:  # an answer that came is read at once
            return
        try:
            call = self._stats_call(i)
            # Waits no later than the watchdog's deadline: a silent replica is found
            # at watchdog_s, not a whole wait after it.
            until_deadline = r.last_answer + self.watchdog_s - now + 0.05
            s = await asyncio.wait_for(
                asyncio.shield(call), timeout=min(5.0, max(0.2, until_deadline))
            )
            r.inflight = None  # answered and read
        except (asyncio.TimeoutError, TimeoutError):
            now = time.monotonic()  # the wait itself took time
            if r.healthy and now - r.last_answer > self.watchdog_s:
                await self._restart(i, f"no answer for {now - r.last_answer:.1f}s")
            self._back_off(i, now)
            return
        except Exception as e:  # noqa: BLE001 - dead or restarting: unhealthy until it answers
            r.inflight = None
            self._mark(i, False, f"unreachable: {type(e).__name__}")
            r.stats = None
            self._back_off(i, now)
            if isinstance(e, ray.exceptions.ActorDiedError):
                await self._find_again(i)
            return
        now = time.monotonic()  # when the answer came (the wait may have been long)
        r.next_poll = 0.0
        r.stats = s
        r.last_answer = now
        self._identify(i, s)
        self._publish()
        # Busy means work that can run: a worker waiting for KV blocks is not stalled.
        steps = s.engine.steps
        if steps != r.steps or not s.busy:
            r.last_progress = now
        r.steps = steps
        if r.healthy and s.engine.fault:  # the worker itself says it cannot serve
            await self._restart(i, s.engine.fault)
        elif r.healthy and now - r.last_progress > self.watchdog_s:
            await self._restart(i, f"busy without a step for {now - r.last_progress:.1f}s")
        elif not r.healthy and not s.engine.fault and now - r.last_progress <= self.watchdog_s:
            self._mark(i, True)

    def _publish(self) -> None:
        """Worker-side counts as router gauges, so one scrape sees the cluster."""
        m = self.metrics
        live = [s for s in self.stats() if s]
        for i, s in enumerate(self.stats()):
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
        for i, r in enumerate(self.replicas):
            if r.polling is None or r.polling.done():
                r.polling = asyncio.ensure_future(self._poll_one(i))
                r.polling.add_done_callback(_log_failure)
        await asyncio.wait([r.polling for r in self.replicas], timeout=self.health_period_s)

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
            if self.replicas[i].inflight is call:
                self.replicas[i].inflight = None
            return s

        return list(await asyncio.gather(*[one(i) for i in range(len(self.replicas))]))

    def describe(self, i: int, stats: WorkerStats | None) -> dict:
        r = self.replicas[i]
        return {
            "role": self.role,
            "replica": i,
            "healthy": r.healthy,
            "lost": self.gone(i),
            "polls": r.polls,
            "reason": r.reason,
            "load": r.load,
            # Prefill: seconds new work still avoids it after failed pulls (0: not avoided).
            "transfer_avoided_s": round(max(0.0, r.transfer_avoid_until - time.monotonic()), 1),
            "stats": msgspec.to_builtins(stats) if stats is not None else None,
        }
