"""The router's pool of worker replicas and its watchdog (cluster/pool.py), with stand-in actor
handles whose stats() answer or go silent on cue."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from cluster import pool as worker_pool
from cluster.metrics import RouterMetrics
from cluster.peers import Peers
from wire.api import DecodeStats, EngineStats, TransferStats


def _stats(free_blocks: int, steps: int = 0) -> DecodeStats:
    engine = EngineStats(
        steps=steps,
        running=0,
        waiting=0,
        waiting_for_blocks=0,
        queued_tokens=0,
        blocked=False,
        used_blocks=128 - free_blocks,
        free_blocks=free_blocks,
    )
    xfer = TransferStats(count=0, bytes=0, seconds=0.0, timeouts=0, failures=0, buckets=[])
    return DecodeStats(
        role="decode",
        replica=0,
        engine=engine,
        omp_threads=None,
        streams=0,
        channels=0,
        transfers_pending=0,
        transfers=xfer,
    )


class Replica:
    """Answers stats() with `free_blocks`, or never once `frozen` (a SIGSTOPped worker),
    and says when its process started (`__ray_call__(identify)`)."""

    def __init__(self, free_blocks: int, delay: float = 0.0, pid: int = 100):
        self.free_blocks, self.frozen, self.delay, self.pid = free_blocks, False, delay, pid
        self.stats = self
        self.__ray_call__ = _Identify(self)

    def remote(self):
        async def answer():
            await asyncio.sleep(self.delay)
            while self.frozen:
                await asyncio.sleep(0.05)
            return msgspec.structs.replace(_stats(self.free_blocks), pid=self.pid)

        return answer()


class _Identify:
    def __init__(self, replica: Replica):
        self.replica = replica

    def remote(self, fn):
        async def answer():
            while self.replica.frozen:
                await asyncio.sleep(0.05)
            return self.replica.pid, 1000 + self.replica.pid  # (pid, start time)

        return answer()


def _healthy(pool) -> list[bool]:
    return [r.healthy for r in pool.replicas]


async def _poll_forever(pool, period: float = 0.25):
    """The router's health loop."""
    while True:
        await pool.poll()
        await asyncio.sleep(period)


@pytest.fixture
def killed(monkeypatch):
    out = []

    def kill(handle, incarnation):
        out.append(handle)

    monkeypatch.setattr(worker_pool, "kill_worker", kill)
    monkeypatch.setattr("cluster.peers.kill_worker", kill)
    return out


def test_a_silent_replica_gets_no_new_work_while_another_answers(killed):
    """A frozen decode's last stats show many free blocks; it must not attract every
    new stream until the watchdog fires (it did: chaos stall-decode-node sent all
    clients to the frozen replica and goodput fell to zero)."""

    async def run():
        frozen, busy = Replica(free_blocks=100), Replica(free_blocks=10)
        pool = worker_pool.WorkerPool("decode", [frozen, busy], 5.0, RouterMetrics(), 0.25)
        await pool.poll()
        assert pool.pick() == 0  # most free blocks
        poller = asyncio.create_task(_poll_forever(pool))
        frozen.frozen = True
        await asyncio.sleep(pool.suspect_after_s + 0.3)
        assert _healthy(pool) == [True, True]  # not yet the watchdog's call
        assert pool.pick() == 1
        frozen.frozen = False  # its queued call answers (SIGCONT): picked again
        await asyncio.sleep(0.5)
        poller.cancel()
        assert pool.pick() == 0

    asyncio.run(run())
    assert killed == []


def test_a_silent_replica_is_found_at_watchdog_s_not_a_wait_later(killed):
    async def run():
        r = Replica(free_blocks=100)
        pool = worker_pool.WorkerPool("decode", [r, Replica(50)], 1.0, RouterMetrics(), 0.25)
        await pool.poll()
        r.frozen = True
        t0 = time.monotonic()
        poller = asyncio.create_task(_poll_forever(pool))
        while _healthy(pool)[0]:
            await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < 5
        poller.cancel()
        return time.monotonic() - t0

    took = asyncio.run(run())
    assert 1.0 <= took < 1.6, took  # the old poll waited a full timeout past the deadline
    assert len(killed) == 1


class Dead:
    """A replica whose actor is dead for good (its group was removed with its node)."""

    def __init__(self):
        self.stats = self

    def remote(self):
        async def fail():
            raise worker_pool.ray.exceptions.ActorDiedError()

        return fail()


def test_a_replica_dead_for_good_is_found_again_under_its_name(killed, monkeypatch):
    """The launcher starts a replica lost with its node again under the same name, as a
    new actor that answers once a node has room for it: the router calls the new one and
    takes it back as healthy as soon as its first answer comes, not a poll period later."""
    named: dict[str, Replica] = {}

    def get_actor(name, namespace):
        assert namespace == "pdcluster"
        if name not in named:
            raise ValueError(f"no actor {name}")
        return named[name]

    monkeypatch.setattr(worker_pool.ray, "get_actor", get_actor)

    async def run():
        pool = worker_pool.WorkerPool("decode", [Replica(100), Dead()], 1.0, RouterMetrics(), 0.25)
        poller = asyncio.create_task(_poll_forever(pool))
        await asyncio.sleep(0.5)
        assert _healthy(pool) == [True, False]  # not started again yet: looked up, not found
        fresh = named["pdcluster-decode-1-rank0"] = Replica(50, pid=200)
        fresh.frozen = True  # placed when a node with room joins
        t0 = time.monotonic()
        while pool.handle(1) is not fresh:
            await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < 5
        await asyncio.sleep(3.0)  # gone by now (silent past the watchdog): polled rarely
        assert not _healthy(pool)[1]
        fresh.frozen = False
        t0 = time.monotonic()
        while not _healthy(pool)[1]:
            await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < 1.0  # polled every 2 s by now
        poller.cancel()
        return pool

    pool = asyncio.run(run())
    assert pool.replicas[1].stats.pid == 200 and killed == []


def test_a_slow_but_answering_replica_is_neither_suspect_nor_killed(killed):
    """Stats that take 1.2 s each (a loaded worker on a busy machine): the replica keeps
    getting work and the watchdog (3 s) leaves it alone, whose silence is counted from
    each answer's arrival, not from when the poll that got it began."""

    async def run():
        slow = Replica(free_blocks=100, delay=1.2)
        pool = worker_pool.WorkerPool("decode", [slow, Replica(10)], 3.0, RouterMetrics(), 0.25)
        poller = asyncio.create_task(_poll_forever(pool))
        picks = []
        for _ in range(40):
            await asyncio.sleep(0.2)
            picks.append(pool.pick())
        poller.cancel()
        return pool, picks

    pool, picks = asyncio.run(run())
    assert killed == [] and _healthy(pool) == [True, True]
    assert picks[-30:] == [0] * 30  # most free blocks, never passed over


def test_router_replicas_restart_a_stalled_worker_once_per_incarnation(killed):
    """Three router replicas watch the same workers. A frozen worker is killed once,
    not three times (a second kill would hit the fresh process Ray just started);
    the fresh incarnation, frozen in turn, is killed once again."""
    peers = Peers(watchdog_s=1.0, health_period_s=0.25)

    async def restart(worker, handle, incarnation):
        await asyncio.sleep(0)  # an actor call
        return peers.restart(worker, handle, incarnation)

    async def run():
        r = Replica(free_blocks=100, pid=100)
        pools = [
            worker_pool.WorkerPool("decode", [r], 1.0, RouterMetrics(), 0.25, restart)
            for _ in range(3)
        ]
        for pool in pools:
            await pool.poll()
        pollers = [asyncio.create_task(_poll_forever(pool)) for pool in pools]
        r.frozen = True
        await asyncio.sleep(2.0)
        assert [_healthy(p) for p in pools] == [[False]] * 3
        assert len(killed) == 1
        r.pid, r.frozen = 101, False  # Ray restarted it (polled every SILENT_POLL_S)
        await asyncio.sleep(worker_pool.SILENT_POLL_S + 0.5)
        assert [_healthy(p) for p in pools] == [[True]] * 3
        r.frozen = True
        await asyncio.sleep(2.0)
        for t in pollers:
            t.cancel()
        return [p.metrics.restarts.labels("decode")._value.get() for p in pools]

    restarts = asyncio.run(run())
    assert len(killed) == 2
    assert sum(restarts) == 2  # counted by the replica that killed


def test_peers_kill_each_incarnation_once_and_a_never_heard_one_after_a_grace(killed, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("cluster.peers.time.monotonic", lambda: clock[0])
    peers = Peers(watchdog_s=3.0, health_period_s=0.5)
    assert peers.restart("decode-0", "h", "n:100:7")
    clock[0] += 0.5
    # Another replica, with the same stale stats, or with none (it never heard from the
    # worker: a replica Serve just started): the fresh process is left alone.
    assert not peers.restart("decode-0", "h", "n:100:7")
    assert not peers.restart("decode-0", "h", None)
    clock[0] += 10
    assert not peers.restart("decode-0", "h", "n:100:7")  # that process is gone already
    assert peers.restart("decode-0", "h", "n:101:9")  # the new one stalled in turn
    assert peers.restart("prefill-0", "p", None)  # never killed: no grace to wait
    clock[0] += peers.unknown_grace_s
    assert peers.restart("decode-0", "h", None)
    assert killed == ["h", "h", "p", "h"]


def test_router_peers_report_each_other_and_drop_a_silent_one():
    peers = Peers(watchdog_s=3.0, health_period_s=0.01)
    peers.ttl_s = 0.2
    assert peers.report("a", {"n": 1}, []) == {}
    assert peers.report("b", {"n": 2}, []) == {"a": ({"n": 1}, [])}
    time.sleep(0.3)
    assert peers.report("b", {"n": 3}, []) == {}  # a stopped reporting: dropped


def test_a_router_started_after_a_worker_was_replaced_calls_the_new_actor_first(
    killed, monkeypatch
):
    """The deployment's handles are of the actors that ran when it was made; after the
    launcher started a lost worker again under its name, a router replica Serve starts
    later (kill-router after a lost node in `pdcluster chaos`) must not mark that worker
    unhealthy and refuse requests ("no healthy decode worker") until a poll finds the
    new actor: it takes every worker by its name when it starts."""
    fresh = Replica(100, pid=300)
    named = {"pdcluster-decode-0-rank0": fresh}

    def get_actor(name, namespace):
        if name not in named:
            raise ValueError(f"no actor {name}")
        return named[name]

    monkeypatch.setattr(worker_pool.ray, "get_actor", get_actor)

    async def run():
        pool = worker_pool.WorkerPool("decode", [Dead(), Replica(10)], 1.0, RouterMetrics(), 0.25)
        pool.find_by_name()
        await pool.poll()
        return pool

    pool = asyncio.run(run())
    assert pool.handle(0) is fresh and _healthy(pool) == [True, True] and pool.pick() == 0


def test_a_prefill_replica_decode_cannot_pull_from_is_avoided_for_a_bounded_time():
    """One failed pull may be chance; two in a row and new work avoids the replica for
    5 s. Pulls that were in flight when the avoidance began do not lengthen it; repeated
    avoidances double it up to 60 s (never beyond, however many); a request's own
    `avoid` set weighs first; a pull that succeeds ends it, and so does a restart."""
    pool = worker_pool.WorkerPool("prefill", [object(), object()], 5.0, RouterMetrics(), 0.25)
    r = pool.replicas[0]
    pool.transfer_failed(0)
    assert pool.pick() == 0 and r.transfer_avoid_until == 0.0
    pool.transfer_failed(0)
    left = r.transfer_avoid_until - time.monotonic()
    assert pool.pick() == 1 and 4.5 < left <= 5.0
    until = r.transfer_avoid_until
    pool.transfer_failed(0)  # in flight when it began
    assert r.transfer_avoid_until == until and r.transfer_fails == 2
    assert pool.pick(avoid={1}) == 0  # the request's own retry goes elsewhere than 1
    waits = []
    for _ in range(2000):  # a replica that never serves a pull again
        r.transfer_avoid_until = 0.0  # the avoidance has passed
        pool.transfer_failed(0)
        waits.append(round(r.transfer_avoid_until - time.monotonic()))
    assert waits[:5] == [10, 20, 40, 60, 60] and max(waits) == 60
    pool.transfer_ok(0)
    assert pool.pick() == 0 and r.transfer_fails == 0
    pool.transfer_failed(0), pool.transfer_failed(0)
    pool._mark(0, False, "restarting")
    pool._mark(0, True)  # back: a new process, maybe on another node
    assert r.transfer_avoid_until == 0.0 and r.transfer_fails == 0
