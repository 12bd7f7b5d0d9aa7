"""What the router replicas (`router.replicas`) share, held by one small actor, and how a
stalled worker is killed.

- **A kill names one process.** A router finds a worker stalled by its incarnation:
  node, pid and start time of the process that last answered (`identify`, asked once of
  each new process). `kill_worker` sends SIGKILL to that process alone, from a task on
  its node, through a pidfd and only while the pid still has that start time; Ray then
  restarts the actor. A kill that comes late (a replica gave up waiting for this actor
  and killed the worker itself, and this actor runs the queued request afterwards)
  reaches nothing: never the fresh process Ray started meanwhile, nor one that got the
  pid since.
- **One restart per stalled worker.** Every replica runs its own watchdog over every
  worker. It asks this actor to restart a worker it found stalled; the first ask for an
  incarnation kills it and later ones are answered False, so the restart is counted
  once, and a replica that dies after asking cannot leave the worker unkilled.
- **A view across replicas.** Each replica reports its request table's counts and
  its own request metrics every health period, and gets the others' back; its
  `/debug/state` and `/metrics` show every live replica, whichever one Serve's
  proxy sent the scrape to. A report older than `report_ttl` (its replica died) is
  dropped.

A replica that cannot reach this actor in time kills the incarnation on its own (the
same kill: doing it twice is harmless). A worker that never answered a replica has no
incarnation to name: only this actor kills it, through its handle, and only if it has
not killed that worker within `unknown_grace_s` (a fresh process may still be loading).
If this actor dies it restarts empty.
"""

from __future__ import annotations

import os
import signal
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

KILLED_KEPT = 16  # incarnations remembered per worker
KILLS_KEPT = 64  # kill tasks whose outcome this actor has not read yet


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat field 22);
    None if there is no such process. Pids are reused; a pid and its start time name one
    process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def identify(_worker=None) -> tuple[int, int | None]:
    """(pid, start time) of the process this runs in: a worker's, through `__ray_call__`."""
    return os.getpid(), process_start(os.getpid())


@ray.remote(num_cpus=0, max_retries=0)
def _kill_process(pid: int, start: int) -> bool:
    """SIGKILL `pid` if it is still the process that started at `start`; False if that
    process is gone (the pid may name another by now)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # The pidfd holds the process the pid named when it was opened: if that one has
        # the start time, it is the one to kill, whatever the pid names afterwards.
        if process_start(pid) != start:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)  # works on a SIGSTOPped process too
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def kill_worker(handle, incarnation: str | None):
    """Kill a worker so that Ray restarts it: the process `incarnation` names
    (`node:pid:start`), by a task on its node (its ObjectRef is returned: True if it
    killed); or, for None, whatever process the actor has now (ray.kill)."""
    if incarnation is None:
        ray.kill(handle, no_restart=False)
        return None
    node, pid, start = incarnation.split(":")
    strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    return _kill_process.options(scheduling_strategy=strategy).remote(int(pid), int(start))


def report_ttl(health_period_s: float) -> float:
    """How long a router replica's report counts after it was sent."""
    return max(2.0, 5 * health_period_s)


class Peers:
    def __init__(self, watchdog_s: float, health_period_s: float) -> None:
        # A replica that never heard from a worker cannot name its incarnation: it may
        # be a fresh process still loading, so it is killed only this long after the last.
        self.unknown_grace_s = max(60.0, 3 * watchdog_s)
        self.ttl_s = report_ttl(health_period_s)
        self._killed: dict[str, list[str]] = {}  # worker -> incarnations killed
        self._killed_at: dict[str, float] = {}
        self._kills: list = []  # kill tasks sent (cluster/peers.py `kill_worker`)
        self._reports: dict[str, tuple[float, dict, list]] = {}

    def restart(self, worker: str, handle, incarnation: str | None) -> bool:
        """Kill `worker` (Ray restarts it) unless this incarnation was killed already, or,
        when the asking replica cannot name one, unless any was within `unknown_grace_s`.
        True if this call killed it."""
        self._reap()
        since = time.monotonic() - self._killed_at.get(worker, float("-inf"))
        killed = self._killed.setdefault(worker, [])
        if incarnation in killed or (incarnation is None and since < self.unknown_grace_s):
            return False
        kill = kill_worker(handle, incarnation)
        if kill is not None:
            self._kills = [*self._kills[-KILLS_KEPT:], kill]
        if incarnation is not None:
            killed.append(incarnation)
            del killed[:-KILLED_KEPT]
        self._killed_at[worker] = time.monotonic()
        return True

    def _reap(self) -> None:
        """Read the kill tasks that have ended (one whose node is gone fails): never
        waited for, so that a slow node does not hold up the replicas' calls."""
        if self._kills:
            done, self._kills = ray.wait(self._kills, num_returns=len(self._kills), timeout=0)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - its node died: nothing left to kill
                    pass

    def report(self, router: str, state: dict, metrics: list) -> dict[str, tuple[dict, list]]:
        """Store this replica's report; return every other live replica's."""
        now = time.monotonic()
        self._reports[router] = (now, state, metrics)
        for r in [r for r, (t, _, _) in self._reports.items() if now - t > self.ttl_s]:
            del self._reports[r]
        return {r: (s, m) for r, (_, s, m) in self._reports.items() if r != router}


RouterPeers = ray.remote(num_cpus=0, max_restarts=-1)(Peers)
