"""What one router replica reports: its own counts, the other replicas' last reports
(exchanged through the shared actor in cluster/peers.py, so any replica's /metrics
and /debug/state see them all), and /debug/state's counts read fresh from the
workers."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray

from cluster.peers import report_ttl
from wire.host import process_usage

log = logging.getLogger("pdcluster.router")

PEER_TIMEOUT_S = 2.0  # a call to the router replicas' shared actor (cluster/peers.py)


class Reports:
    def __init__(self, router) -> None:
        self.router = router  # the Router replica (cluster/router.py)
        self.period_s = router.cfg.router.health_period_s
        self._reports: dict[str, tuple[dict, list]] = {}
        self._ttl_s = report_ttl(self.period_s)
        self._failing = False

    def own_counts(self) -> dict:
        return {
            "router_id": self.router.replica_id,
            "router_pid": os.getpid(),
            "router_node_id": ray.get_runtime_context().get_node_id(),
            "router_requests_in_flight": len(self.router.lifecycle.requests),
            "router_admitting": self.router._admitting,
            "router_channels": len(self.router.channels.open),
            "router_channels_opened": self.router.channels.opened,
            "router_channel_queues": self.router.channels.queues(),
            **{f"router_{k}": v for k, v in process_usage().items()},
            "reported_at": time.time(),
        }

    def peers(self) -> dict[str, tuple[dict, list]]:
        """The other replicas' last reports, while recent (this replica may have failed
        to refresh them)."""
        now = time.time()
        return {
            rid: rep
            for rid, rep in self._reports.items()
            if now - rep[0]["reported_at"] <= self._ttl_s
        }

    def count_stages(self) -> None:
        """pdcluster_requests_in_flight{stage} from this replica's request table."""
        for stage in ("admitted", "prefill", "decode"):
            self.router.metrics.in_flight.labels(stage).set(
                sum(1 for q in self.router.lifecycle.requests.values() if q.stage == stage)
            )

    async def keep(self) -> None:
        """Every health period: this replica's counts and request metrics to the other
        router replicas (through cluster/peers.py), and theirs back."""
        while True:
            self.count_stages()
            try:
                self._reports = await asyncio.wait_for(
                    self.router.peers.report.remote(
                        self.router.replica_id,
                        self.own_counts(),
                        self.router.metrics.own_families(),
                    ),
                    PEER_TIMEOUT_S,
                )
                self._failing = False
            except Exception:  # noqa: BLE001 - reported again next period
                if not self._failing:  # once per outage, not every period
                    log.exception("router peers unreachable")
                self._failing = True
            await asyncio.sleep(self.period_s)

    async def state(self) -> dict:
        """Counts that must return to zero when load ends, read fresh from the workers."""
        pools = (self.router.prefill_pool, self.router.decode_pool)
        stats = await asyncio.gather(*[p.fresh_stats() for p in pools])
        p, d = ([s for s in ss if s] for ss in stats)
        own = self.own_counts()
        routers = [own, *(s for s, _ in self.peers().values())]
        return {
            # The replica that answered (router_*), and every live replica (routers).
            **own,
            "routers": sorted(routers, key=lambda r: r["router_id"]),
            "requests_in_flight": sum(r["router_requests_in_flight"] for r in routers),
            "prefill_pending": sum(s.pending for s in p),
            "prefill_leases": sum(s.engine.leases for s in p),
            "prefill_pinned_blocks": sum(s.pinned_blocks for s in p),
            # Held by requests and leases (a block shared by two leases counts once).
            "prefill_blocks_used": sum(s.engine.used_blocks for s in p),
            # Prefix cache: blocks no request holds (free for new work; not a leak).
            "prefill_cached_blocks": sum(s.engine.cached_blocks for s in p),
            "transfer_pending": sum(s.transfers_pending for s in d),
            "decode_waiting_for_blocks": sum(s.engine.waiting_for_blocks for s in d),
            "decode_streams": sum(s.streams for s in d),
            "decode_blocks_used": sum(s.engine.used_blocks for s in d),
            "decode_cached_blocks": sum(s.engine.cached_blocks for s in d),
            "workers": [
                pool.describe(i, st) for pool, ss in zip(pools, stats) for i, st in enumerate(ss)
            ],
        }
