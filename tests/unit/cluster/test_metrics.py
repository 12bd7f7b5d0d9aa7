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


def _stats(role: str, used: int, free: int, **engine):
    from wire.api import DecodeStats, EngineStats, PrefillStats, TransferStats

    e = EngineStats(
        steps=1,
        running=engine.pop("running", 0),
        waiting=engine.pop("waiting", 0),
        waiting_for_blocks=engine.pop("waiting_for_blocks", 0),
        queued_tokens=0,
        blocked=False,
        used_blocks=used,
        free_blocks=free,
        **engine,
    )
    if role == "prefill":
        return PrefillStats(role=role, replica=0, engine=e, omp_threads=None, pending=0)
    xfer = TransferStats(count=0, bytes=0, seconds=0.0, timeouts=0, failures=0, buckets=[0] * 14)
    return DecodeStats(
        role=role,
        replica=0,
        engine=e,
        omp_threads=None,
        streams=0,
        channels=0,
        transfers_pending=0,
        transfers=xfer,
    )


def test_vllm_metric_names_labels_and_bucket_edges_beside_pdclusters():
    """What vLLM's Grafana dashboards and schedulers read: `vllm:` names with a
    `model_name` label and vLLM's bucket edges, engine series per worker (role,
    replica), finished requests by reason."""
    from cluster.metrics import VLLM_ITL, VLLM_REQUEST, VLLM_TTFT
    from wire.api import XFER_BUCKETS

    m = RouterMetrics("smol")
    m.first_token(0.3, prompt_tokens=12)
    m.tokens(1, None)
    m.tokens(3, 0.06)  # three tokens in one chunk, 60 ms after the last: 20 ms apart
    m.queued(0.05)
    m.ended("ok", "length", 1.2, 4, 0.9)
    m.ended("cancelled", None, 0.4, 0, None)
    decode = [_stats("decode", 30, 70, running=3, waiting=1, waiting_for_blocks=2, preemptions=4)]
    prefill = [_stats("prefill", 10, 90, prefix_queried_tokens=64, prefix_hit_tokens=32)]
    m.watch_workers(lambda: prefill, lambda: decode, XFER_BUCKETS)
    text = m.render({"ra": (None, m.own_families())}).decode()
    fam = {f.name: f for f in text_string_to_metric_families(text)}

    def buckets(name):
        return [float(s.labels["le"]) for s in fam[name].samples if s.name.endswith("_bucket")][:-1]

    assert buckets("vllm:time_to_first_token_seconds") == list(VLLM_TTFT)
    assert buckets("vllm:inter_token_latency_seconds") == list(VLLM_ITL)
    assert buckets("vllm:e2e_request_latency_seconds") == list(VLLM_REQUEST)
    assert buckets("vllm:request_queue_time_seconds") == list(VLLM_REQUEST)
    itl = {s.name: s.value for s in fam["vllm:inter_token_latency_seconds"].samples}
    assert itl["vllm:inter_token_latency_seconds_count"] == 3
    assert abs(itl["vllm:inter_token_latency_seconds_sum"] - 0.06) < 1e-9
    (prompt,) = fam["vllm:prompt_tokens"].samples
    assert prompt.labels == {"model_name": "smol", "router": "ra"} and prompt.value == 12
    assert fam["vllm:generation_tokens"].samples[0].value == 4
    done = {s.labels["finished_reason"]: s.value for s in fam["vllm:request_success"].samples}
    assert done == {"length": 1.0, "abort": 1.0}

    def engine(name):
        return {(s.labels["role"], s.labels["model_name"]): s.value for s in fam[name].samples}

    assert engine("vllm:num_requests_running")[("decode", "smol")] == 3
    assert engine("vllm:num_requests_waiting")[("decode", "smol")] == 3  # queued + for blocks
    assert engine("vllm:kv_cache_usage_perc") == {("prefill", "smol"): 0.1, ("decode", "smol"): 0.3}
    assert engine("vllm:prefix_cache_queries")[("prefill", "smol")] == 64
    assert engine("vllm:prefix_cache_hits")[("prefill", "smol")] == 32
    assert engine("vllm:num_preemptions")[("decode", "smol")] == 4
