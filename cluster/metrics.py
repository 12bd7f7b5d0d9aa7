"""Router-side Prometheus metrics (prefix `pdcluster_`), one registry per router.

Request metrics are observed in the router as requests pass; worker-side counts
(KV blocks, transfers, leases) are read from the workers' `stats()` by the
health poller and published here as gauges, so one scrape of the router's
`/metrics` sees the whole cluster.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("pdcluster_time_to_first_token_seconds",
                              "Arrival to first token", buckets=_LATENCY, registry=r)
        self.tpot = Histogram("pdcluster_time_per_output_token_seconds",
                              "Mean time per output token after the first",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                              registry=r)
        self.e2e = Histogram("pdcluster_e2e_request_latency_seconds", "Arrival to last byte",
                             buckets=_LATENCY, registry=r)
        self.requests = Counter("pdcluster_requests", "Requests by outcome", ["outcome"],
                                registry=r)
        self.retries = Counter("pdcluster_retries", "Prefill retries and re-prefills",
                               ["reason"], registry=r)
        self.migrations = Counter("pdcluster_migrations", "Streams moved to another decode",
                                  registry=r)
        self.restarts = Counter("pdcluster_worker_restarts",
                                "Workers restarted by the watchdog or found restarted",
                                ["role"], registry=r)
        self.in_flight = Gauge("pdcluster_requests_in_flight", "Requests by stage", ["stage"],
                               registry=r)
        self.blocks_used = Gauge("pdcluster_kv_blocks_used", "KV blocks in use",
                                 ["role", "replica"], registry=r)
        self.transfer_pending = Gauge("pdcluster_kv_transfer_pending",
                                      "KV pulls in flight on decode workers", registry=r)
        self.leases = Gauge("pdcluster_kv_leases", "Prefill leases held", registry=r)
        self.healthy = Gauge("pdcluster_workers_healthy", "Healthy workers", ["role"],
                             registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
