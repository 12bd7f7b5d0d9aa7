"""What the router replicas (`router.replicas`) share, held by one small actor.

- **One restart per stalled worker.** Every replica runs its own watchdog over
  every worker. The kill itself is done here, once: a replica asks to restart a
  worker naming the incarnation it found stalled (node and pid from the worker's
  last stats), and an incarnation already killed is not killed again, so a second
  kill never hits the fresh process Ray just started, and a replica that dies
  after asking cannot leave the worker unkilled.
- **A view across replicas.** Each replica reports its request table's counts and
  its own request metrics every health period, and gets the others' back; its
  `/debug/state` and `/metrics` show every live replica, whichever one Serve's
  proxy sent the scrape to. A report older than `report_ttl` (its replica died) is
  dropped.

If this actor dies it restarts empty: for one watchdog period a replica whose stats
are stale could then kill a worker a second time. A replica that cannot reach it
kills on its own (a doubled restart is better than none).
"""

from __future__ import annotations

import time

import ray

KILLED_KEPT = 16  # incarnations remembered per worker


def report_ttl(health_period_s: float) -> float:
    """How long a router replica's report counts after it was sent."""
    return max(2.0, 5 * health_period_s)


class Peers:
    def __init__(self, watchdog_s: float, health_period_s: float) -> None:
        self.watchdog_s = watchdog_s
        # A replica that never heard from a worker cannot name its incarnation: it may
        # be a fresh process still loading, so it is killed only this long after the last.
        self.unknown_grace_s = max(60.0, 3 * watchdog_s)
        self.ttl_s = report_ttl(health_period_s)
        self._killed: dict[str, list[str]] = {}  # worker -> incarnations killed
        self._killed_at: dict[str, float] = {}
        self._reports: dict[str, tuple[float, dict, list]] = {}

    def restart(self, worker: str, handle, incarnation: str | None) -> bool:
        """Kill `worker` (Ray restarts it) unless this incarnation was killed already,
        or any was within `watchdog_s` (a new process must answer, then stall for a
        whole watchdog period, before it can be found stalled in turn). True if killed."""
        since = time.monotonic() - self._killed_at.get(worker, float("-inf"))
        killed = self._killed.setdefault(worker, [])
        if incarnation is None:
            if since < self.unknown_grace_s:
                return False
        elif incarnation in killed or since < self.watchdog_s:
            return False
        # SIGKILL works on a SIGSTOPped process too; Ray then restarts the actor.
        ray.kill(handle, no_restart=False)
        if incarnation is not None:
            killed.append(incarnation)
            del killed[:-KILLED_KEPT]
        self._killed_at[worker] = time.monotonic()
        return True

    def report(self, router: str, state: dict, metrics: list) -> dict[str, tuple[dict, list]]:
        """Store this replica's report; return every other live replica's."""
        now = time.monotonic()
        self._reports[router] = (now, state, metrics)
        for r in [r for r, (t, _, _) in self._reports.items() if now - t > self.ttl_s]:
            del self._reports[r]
        return {r: (s, m) for r, (_, s, m) in self._reports.items() if r != router}


RouterPeers = ray.remote(num_cpus=0, max_restarts=-1)(Peers)
