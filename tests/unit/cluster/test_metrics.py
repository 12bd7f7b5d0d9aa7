"""The router's /metrics with several router replicas (cluster/metrics.py): every
replica's request series under its own `router` label, the others' stamped with
the time of their report, the workers' gauges once and unlabelled."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import RouterMetrics


def test_render_merges_router_replicas_and_keeps_worker_gauges_once():
    a, b = RouterMetrics(), RouterMetrics()
    a.requests.labels("ok").inc(3)
    b.requests.labels("ok").inc(5)
    b.ttft.observe(0.2)
    a.healthy.labels("decode").set(2)
    text = a.render({"ra": (None, a.own_families()), "rb": (1700000000.5, b.own_families())})
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    ok = {s.labels["router"]: s for s in families["pdcluster_requests"].samples}
    assert {r: s.value for r, s in ok.items()} == {"ra": 3.0, "rb": 5.0}
    assert ok["ra"].timestamp is None and float(ok["rb"].timestamp) == 1700000000.5
    ttft = families["pdcluster_time_to_first_token_seconds"].samples
    count = {s.labels["router"]: s.value for s in ttft if s.name.endswith("_count")}
    assert count == {"ra": 0.0, "rb": 1.0}
    (healthy,) = families["pdcluster_workers_healthy"].samples
    assert healthy.labels == {"role": "decode"} and healthy.value == 2
    assert text.decode().count("# TYPE pdcluster_requests_total counter") == 1
