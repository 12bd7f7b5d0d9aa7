"""Router-side Prometheus metrics: pdcluster's own (prefix `pdcluster_`) and, beside
them, vLLM's names, labels and bucket edges (prefix `vllm:`, label `model_name`), so
dashboards and schedulers built for vLLM read a pdcluster cluster unchanged.

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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# vLLM's bucket edges (vllm/v1/metrics/loggers.py).
VLLM_TTFT = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_REQUEST = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class RouterMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
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
        m = ["model_name"]
        v = self.vllm = _VllmRequests(
            ttft=Histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                m,
                buckets=VLLM_TTFT,
                registry=r,
            ),
            itl=Histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                m,
                buckets=VLLM_ITL,
                registry=r,
            ),
            e2e=Histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                m,
                buckets=VLLM_REQUEST,
                registry=r,
            ),
            queue=Histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request (prefill's queue).",
                m,
                buckets=VLLM_REQUEST,
                registry=r,
            ),
            prompt_tokens=Counter(
                "vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=r
            ),
            generation_tokens=Counter(
                "vllm:generation_tokens", "Number of generation tokens processed.", m, registry=r
            ),
            success=Counter(
                "vllm:request_success",
                "Count of successfully processed requests.",
                [*m, "finished_reason"],
                registry=r,
            ),
        )
        self.vllm_labels = v.labels = {"model_name": model_name}
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
        """Publish the workers' own counters and gauges (from their last `stats()`),
        one series per replica so a restart is a counter reset."""
        self.workers.register(_WorkerCounters(prefill, decode, buckets))
        self.workers.register(_VllmWorkers(prefill, decode, self.model_name))

    # ---- one request's observations (cluster/lifecycle.py) -----------------------

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        v = self.vllm
        v.ttft.labels(self.model_name).observe(seconds)
        v.prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def tokens(self, n: int, since_last: float | None) -> None:
        """`n` more output tokens; `since_last`: seconds since the previous ones (None
        for the first), spread over the `n` as inter-token latency."""
        v = self.vllm
        v.generation_tokens.labels(self.model_name).inc(n)
        if since_last is not None:
            for _ in range(n):
                v.itl.labels(self.model_name).observe(since_last / n)

    def queued(self, seconds: float) -> None:
        self.vllm.queue.labels(self.model_name).observe(seconds)

    def ended(
        self, outcome: str, reason: str | None, e2e_s: float, n_out: int, decode_s: float | None
    ) -> None:
        """`outcome`: ok, cancelled, timeout, slow_client or error; `reason`: the
        finish reason of an ok one; `decode_s`: first token to last (None before one)."""
        self.requests.labels(outcome).inc()
        self.e2e.observe(e2e_s)
        if n_out > 1 and decode_s is not None:
            self.tpot.observe(decode_s / (n_out - 1))
        v = self.vllm
        v.e2e.labels(self.model_name).observe(e2e_s)
        finished = reason if outcome == "ok" else "error" if outcome == "error" else "abort"
        v.success.labels(self.model_name, finished or "stop").inc()

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


class _VllmRequests:
    """vLLM's request metrics (a namespace)."""

    def __init__(self, **metrics) -> None:
        self.__dict__.update(metrics)


class _VllmWorkers:
    """vLLM's engine gauges and counters, one series per worker (role, replica)."""

    def __init__(self, prefill, decode, model_name: str):
        self.prefill, self.decode, self.model_name = prefill, decode, model_name

    def collect(self):
        labels = ["model_name", "role", "replica"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=labels,
        )
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            labels=labels,
        )
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels=labels,
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            labels=labels,
        )
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            labels=labels,
        )
        for role, stats in (("prefill", self.prefill()), ("decode", self.decode())):
            for i, s in enumerate(stats):
                if s is None:
                    continue
                e, key = s.engine, [self.model_name, role, str(i)]
                running.add_metric(key, e.running)
                waiting.add_metric(key, e.waiting + e.waiting_for_blocks)
                total = e.used_blocks + e.free_blocks
                usage.add_metric(key, e.used_blocks / total if total else 0.0)
                queries.add_metric(key, e.prefix_queried_tokens)
                hits.add_metric(key, e.prefix_hit_tokens)
                preemptions.add_metric(key, e.preemptions)
        yield from (running, waiting, usage, queries, hits, preemptions)
