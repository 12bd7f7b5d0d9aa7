"""Router-side Prometheus metrics (prefix `pdcluster_`).

Request metrics are observed in each router replica as requests pass, and carry a
`router` label (the replica's id): a scrape of any replica shows every live
replica's series (cluster/peers.py carries them), so counters stay monotonic per
series whichever replica Serve's proxy picks. Worker-side counts (KV blocks,
transfers, leases, health) are read from the workers' `stats()` by the health
poller and published as gauges without that label, so one scrape of `/metrics`
sees the whole cluster.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self) -> None:
        # This replica's request metrics; the workers' counts are in `workers`.
        r = self.own = CollectorRegistry()
        self.ttft = Histogram(
            "pdcluster_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "pdcluster_time_per_output_token_seconds",
            "Mean time per output token after the first",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.e2e = Histogram(
            "pdcluster_e2e_request_latency_seconds",
            "Arrival to last byte",
            buckets=_LATENCY,
            registry=r,
        )
        self.requests = Counter(
            "pdcluster_requests", "Requests by outcome", ["outcome"], registry=r
        )
        self.retries = Counter(
            "pdcluster_retries", "Prefill retries and re-prefills", ["reason"], registry=r
        )
        self.local_prefills = Counter(
            "pdcluster_local_prefills",
            "Prompts within router.max_local_prefill_tokens, prefilled on decode",
            registry=r,
        )
        self.migrations = Counter(
            "pdcluster_migrations", "Streams moved to another decode", registry=r
        )
        self.restarts = Counter(
            "pdcluster_worker_restarts",
            "Workers restarted by the watchdog or found restarted",
            ["role"],
            registry=r,
        )
        self.in_flight = Gauge(
            "pdcluster_requests_in_flight", "Requests by stage", ["stage"], registry=r
        )
        r = self.workers = CollectorRegistry()
        self.blocks_used = Gauge(
            "pdcluster_kv_blocks_used", "KV blocks in use", ["role", "replica"], registry=r
        )
        self.transfer_pending = Gauge(
            "pdcluster_kv_transfer_pending", "KV pulls in flight on decode workers", registry=r
        )
        self.leases = Gauge("pdcluster_kv_leases", "Prefill leases held", registry=r)
        self.healthy = Gauge("pdcluster_workers_healthy", "Healthy workers", ["role"], registry=r)

    def watch_workers(
        self, prefill: Callable[[], list], decode: Callable[[], list], buckets: tuple[float, ...]
    ) -> None:
        """Publish the workers' own transfer/lease counters (from their last
        `stats()`), one series per replica so a restart is a counter reset."""
        self.workers.register(_WorkerCounters(prefill, decode, buckets))

    def own_families(self) -> list[Metric]:
        """This replica's request metrics, as sent to the other replicas."""
        return list(self.own.collect())

    def render(self, routers: dict[str, tuple[float | None, list[Metric]]]) -> bytes:
        """The exposition: every replica's request metrics (by replica id, this
        one's included; with the time they were read, or None for now), then the
        workers' counts."""
        merged: dict[str, Metric] = {}
        for rid, (at, families) in routers.items():
            for f in families:
                m = merged.get(f.name)
                if m is None:
                    m = merged[f.name] = Metric(f.name, f.documentation, f.type, f.unit)
                m.samples += [
                    s._replace(labels={**s.labels, "router": rid}, timestamp=at) for s in f.samples
                ]
        return generate_latest(_Families(merged.values())) + generate_latest(self.workers)


class _Families:
    """Metric families already built, for `generate_latest`."""

    def __init__(self, families) -> None:
        self.families = list(families)

    def collect(self):
        return self.families


class _WorkerCounters:
    def __init__(self, prefill, decode, buckets):
        self.prefill, self.decode, self.buckets = prefill, decode, buckets

    def collect(self):
        secs = HistogramMetricFamily(
            "pdcluster_kv_transfer_seconds",
            "KV pull time on decode (claim + READ)",
            labels=["replica"],
        )
        nbytes = CounterMetricFamily(
            "pdcluster_kv_transfer_bytes", "KV bytes pulled", labels=["replica"]
        )
        timeouts = CounterMetricFamily(
            "pdcluster_kv_transfer_timeouts",
            "KV pulls that missed transfer.timeout_s",
            labels=["replica"],
        )
        failures = CounterMetricFamily(
            "pdcluster_kv_transfer_failures",
            "KV pulls that failed (peer gone, lease expired, error)",
            labels=["replica"],
        )
        renewals = CounterMetricFamily(
            "pdcluster_kv_lease_renewals",
            "Prefill leases renewed by decode while waiting for free KV blocks",
            labels=["replica"],
        )
        expired = CounterMetricFamily(
            "pdcluster_kv_leases_expired",
            "Prefill leases expired unclaimed or abandoned",
            labels=["replica"],
        )
        for i, s in enumerate(self.decode()):
            if s is None:
                continue
            x, r = s.transfers, str(i)
            cum, acc = [], 0
            for bound, n in zip([*map(str, self.buckets), "+Inf"], x.buckets):
                acc += n
                cum.append((bound, acc))
            secs.add_metric([r], cum, x.seconds)
            nbytes.add_metric([r], x.bytes)
            timeouts.add_metric([r], x.timeouts)
            failures.add_metric([r], x.failures)
            renewals.add_metric([r], x.renewals)
        for i, s in enumerate(self.prefill()):
            if s is not None:
                expired.add_metric([str(i)], s.engine.leases_expired)
        yield from (secs, nbytes, timeouts, failures, renewals, expired)
