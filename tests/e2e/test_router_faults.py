"""Router lifecycle under bad input, disconnects and worker loss, on 2 prefill +
2 decode replicas of the tiny model. After every load, /debug/state is all zero."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time

import httpx
import jsonschema
import pytest
import ray

from tests.support import (
    assert_idle,
    dashboard_metrics,
    load_test_config,
    metric,
    metric_above,
    running_cluster,
    sse_events,
)

WATCHDOG_S = 3.0


@pytest.fixture(scope="module")
def cluster():
    # A 1,024-token context: the tiny tokenizer spells a tool list byte by byte.
    cfg = load_test_config(
        "tiny.yaml",
        model={"max_model_len": 1024},
        prefill={"replicas": 2},
        decode={"replicas": 2},
        router={
            "port": 8013,
            "watchdog_s": WATCHDOG_S,
            "health_period_s": 0.25,
            "request_timeout_s": 30,
            "max_queued": 256,
            "replicas": 2,
        },
    )
    with running_cluster(cfg) as rc:
        yield rc


def wait_healthy(url: str, timeout: float = 60) -> None:
    """Every live router replica sees 2 + 2 healthy workers: each replica polls the
    workers on its own, so one replica's view says nothing of the others'."""
    deadline = time.monotonic() + timeout
    views: dict[str, bool] = {}  # router replica id -> all healthy in its last answer
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/debug/state", timeout=10).json()
        healthy = [w for w in st["workers"] if w["healthy"]]
        views[st["router_id"]] = len(healthy) == 4
        live = {r["router_id"] for r in st["routers"]}
        if live <= set(views) and all(views[r] for r in live):
            return
        time.sleep(0.25)
    raise AssertionError(f"cluster not healthy again in every router replica: {views}")


def chat(content: str, **kw) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], **kw}


BAD = [
    ("over-long prompt", chat("x" * 1100, max_tokens=2)),
    ("negative max_tokens", chat("hi", max_tokens=-1)),
    ("wrong type", chat("hi", max_tokens="two")),
    ("a field not implemented", chat("hi", max_tokens=2, use_beam_search=True)),
    ("empty messages", {"model": "tiny-llama", "messages": [], "max_tokens": 2}),
    ("bad role", {"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]}),
    # Sampling parameters that used to reach a worker and fail its whole engine step.
    (
        "stop id outside the vocabulary",
        chat("hi", max_tokens=2, min_tokens=1, stop_token_ids=[99_999_999]),
    ),
    ("huge stop id list", chat("hi", max_tokens=2, stop_token_ids=list(range(5000)))),
    (
        "whole vocabulary banned, sampled",
        chat("hi", max_tokens=2, min_tokens=2, temperature=0.9, stop_token_ids=list(range(320))),
    ),
]


def _valid(i: int) -> dict:
    """Greedy, sampled and seeded requests, some with stop ids inside the vocabulary."""
    kind = i % 3
    if kind == 0:
        return chat(f"request {i}", max_tokens=2, temperature=0)
    if kind == 1:
        return chat(f"request {i}", max_tokens=2, temperature=0.8, top_p=0.9, seed=i)
    return chat(
        f"request {i}",
        max_tokens=2,
        temperature=1.2,
        top_k=20,
        min_tokens=1,
        stop_token_ids=[5, 6, 7],
    )


async def _run_mixed(url: str, n: int, concurrency: int) -> list[tuple[bool, int, dict]]:
    rng = random.Random(0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, client: httpx.AsyncClient):
        bad = i % 3 == 0
        body = rng.choice(BAD)[1] if bad else _valid(i)
        async with sem:
            r = await client.post(f"{url}/v1/chat/completions", json=body)
        return bad, r.status_code, r.json()

    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*[one(i, client) for i in range(n)])


def test_2000_requests_a_third_bad(cluster):
    """A storm of valid requests (greedy and sampled) and invalid ones (bad JSON
    types, over-long prompts, out-of-vocabulary stop ids, huge stop lists, a
    whole-vocabulary ban): every invalid one is a 4xx before any worker sees it,
    every valid one a 200, no worker restarts, and nothing is left held."""
    restarts = metric(cluster.url, "pdcluster_worker_restarts_total")
    results = asyncio.run(_run_mixed(cluster.url, 2000, 32))
    for bad, status, body in results:
        if bad:
            assert 400 <= status < 500, body
            assert body["error"]["message"] and body["error"]["type"], body
        else:
            assert status == 200, body
            assert body["usage"]["completion_tokens"] >= 1
    assert metric(cluster.url, "pdcluster_worker_restarts_total") == restarts
    assert_idle(cluster.url)


async def _disconnecting_streams(url: str, n: int) -> int:
    rng = random.Random(1)

    async def one(i: int, client: httpx.AsyncClient) -> int:
        body = chat(f"stream {i}", max_tokens=200, temperature=0, stream=True, ignore_eos=True)
        stop_after = rng.randint(0, 30)
        got = 0
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    got += 1
                if got >= stop_after:
                    break  # leaving the block closes the connection mid-stream
        return got

    async with httpx.AsyncClient(timeout=60) as client:
        return sum(await asyncio.gather(*[one(i, client) for i in range(n)]))


def test_64_streams_disconnect_at_random_points(cluster):
    asyncio.run(_disconnecting_streams(cluster.url, 64))
    r = httpx.post(
        f"{cluster.url}/v1/chat/completions",
        timeout=30,
        json=chat("still there?", max_tokens=4, temperature=0),
    )
    assert r.status_code == 200
    assert_idle(cluster.url)
    wait_healthy(cluster.url)


async def _streams(
    url: str,
    prompts: list[str],
    max_tokens: int,
    on_progress=None,
    logprobs: bool = False,
    extra=None,
) -> list:
    """Stream every prompt (greedy, and every other one sampled with a seed; prompts 2 and
    5 with n = 3: choices forked on decode); once all are sent, run `on_progress` (in a
    thread). Each stream's text (its choices' joined by NUL; a tool call's arguments
    count as text), or with `logprobs` (text, each token's logprob and top 2, choice by
    choice). `extra(i)`: fields for stream i (a format: then it ends where that ends)."""

    async def one(i: int, client: httpx.AsyncClient):
        # Every other stream is sampled with a seed: its text, too, must not depend on
        # which workers produced it (a migration continues the same random stream).
        sampling = {"temperature": 0.9, "seed": 100 + i} if i % 2 else {"temperature": 0}
        body = chat(
            prompts[i],
            max_tokens=max_tokens,
            stream=True,
            ignore_eos=True,
            skip_special_tokens=False,
            n=3 if i % 3 == 2 else 1,
            **sampling,
            **({"logprobs": True, "top_logprobs": 2} if logprobs else {}),
        )
        if extra is not None:
            del body["ignore_eos"], body["skip_special_tokens"]  # ends where its format ends
            body.update(extra(i))
        text: dict[int, list] = {}
        lps: dict[int, list] = {}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for chunk in sse_events(r):
                assert "error" not in chunk, chunk
                for ch in chunk["choices"]:
                    delta = ch["delta"]
                    args = [c["function"].get("arguments") for c in delta.get("tool_calls", [])]
                    piece = (delta.get("content") or "") + "".join(a or "" for a in args)
                    text.setdefault(ch["index"], []).append(piece)
                    for e in (ch["logprobs"] or {}).get("content", []):
                        lps.setdefault(ch["index"], []).append(
                            (e["logprob"], [t["logprob"] for t in e["top_logprobs"]])
                        )
        joined = "\0".join("".join(text[k]) for k in sorted(text))
        return (joined, [x for k in sorted(lps) for x in lps[k]]) if logprobs else joined

    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(one(i, client)) for i in range(len(prompts))]
        if on_progress is not None:
            await asyncio.to_thread(on_progress)
        return await asyncio.gather(*tasks)


PROMPTS = [f"migrate me {i}" for i in range(6)]


def _decoding_replica(cluster, steps: int = 5):
    """A decode replica in the middle of some streams (routing decides which hold
    them): seen with running sequences and `steps` steps further on. Judged by
    the replica itself, because decode runs far ahead of what clients have read."""
    first: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for i, g in enumerate(cluster.decode):
            s = ray.get(g.leader.stats.remote(), timeout=10)
            if s.engine.running > 0:
                first.setdefault(i, s.engine.steps)
                if s.engine.steps >= first[i] + steps:
                    return g
    raise AssertionError("no decode replica was seen decoding")


def _same_logprobs(got: list, want: list, tol: float = 1e-3) -> bool:
    """Each token's logprob and top logprobs alike within `tol`. Two runs batch their
    sequences differently (the GEMM path is chosen per batch size), and over 300 tokens
    each run is within about 5e-5 of HF's own values (tests/unit/workers/test_logprobs.py
    holds the engine to 1e-4 of HF), so two runs stay well within 1e-3 of each other."""
    assert len(got) == len(want), (len(got), len(want))
    worst = max(
        max(abs(a - b), *(abs(x - y) for x, y in zip(ta, tb)))
        for (a, ta), (b, tb) in zip(got, want)
    )
    assert all(len(ta) == len(tb) for (_, ta), (_, tb) in zip(got, want))
    assert worst < tol, f"logprobs differ by up to {worst:.2e}"
    return True


def _without_and_with_a_decode_killed(cluster, max_tokens: int, **kw) -> tuple[list, list]:
    """`_streams` once without a fault, then again with a decoding replica killed once
    every stream is sent; the migrations counter must move."""
    want = asyncio.run(_streams(cluster.url, PROMPTS, max_tokens, **kw))
    before = metric(cluster.url, "pdcluster_migrations_total")
    killed = []

    def kill():
        g = _decoding_replica(cluster)
        ray.kill(g.leader, no_restart=False)
        killed.append(g)

    got = asyncio.run(_streams(cluster.url, PROMPTS, max_tokens, on_progress=kill, **kw))
    assert killed
    metric_above(cluster.url, "pdcluster_migrations_total", before)
    return want, got


def test_decode_killed_mid_stream_streams_complete_with_same_text(cluster):
    """... and the same logprobs: token 1's from prefill, the rest from decode, those
    after the migration from the re-prefill and the new decode replica."""
    want, got = _without_and_with_a_decode_killed(cluster, 300, logprobs=True)
    assert [t for t, _ in got] == [t for t, _ in want]
    for i, ((_, g), (_, w)) in enumerate(zip(got, want)):
        assert len(g) == (900 if i % 3 == 2 else 300) and _same_logprobs(g, w)
    wait_healthy(cluster.url)
    assert_idle(cluster.url)


WAY = {"enum": ["north", "south", "east", "west"]}
ROUTE = {"type": "array", "items": WAY, "minItems": 30, "maxItems": 40}  # ~300 tokens
GO = {
    "type": "function",
    "function": {
        "name": "go",
        "parameters": {
            "type": "object",
            "properties": {"route": ROUTE},
            "required": ["route"],
            "additionalProperties": False,
        },
    },
}


def _format(i: int) -> dict:
    """Stream i's format: a JSON schema, a required call, or a named call."""
    if i % 3 == 0:
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": ROUTE},
            }
        }
    if i % 3 == 1:  # one call: a random model would go on calling within max_tokens
        return {"tools": [GO], "tool_choice": "required", "parallel_tool_calls": False}
    return {"tools": [GO], "tool_choice": {"type": "function", "function": {"name": "go"}}}


def test_structured_streams_killed_mid_stream_keep_the_same_valid_json(cluster):
    """A decode killed mid-stream: JSON-schema streams and required and named tool calls
    (greedy, seeded, n = 3) migrate with their grammar state replayed from the tokens so far:
    the same text as without the fault, and every answer validates against its schema."""
    want, got = _without_and_with_a_decode_killed(cluster, 500, extra=_format)
    assert got == want
    for i, text in enumerate(got):
        for answer in text.split("\0"):  # a call's text is its arguments
            value = json.loads(answer)
            jsonschema.validate(value["route"] if i % 3 else value, ROUTE)
    wait_healthy(cluster.url)
    assert_idle(cluster.url)


def test_the_first_client_on_a_replica_cannot_end_the_others_streams(cluster):
    """Output channels belong to the router, not to the request that first needs one:
    after the decode replicas restart, the first client on them disconnects mid-stream
    and the other streams complete with the fault-free text, none migrated."""
    want = asyncio.run(_streams(cluster.url, PROMPTS, 300))
    pids = [ray.get(g.leader.ready.remote(), timeout=30)["pid"] for g in cluster.decode]
    for g in cluster.decode:
        ray.kill(g.leader, no_restart=False)
    deadline = time.monotonic() + 120
    for g, pid in zip(cluster.decode, pids):  # ray.kill is asynchronous: wait for the new ones
        while True:
            try:
                if ray.get(g.leader.ready.remote(), timeout=5)["pid"] != pid:
                    break
            except (ray.exceptions.RayError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "decode replica did not restart"
            time.sleep(0.5)
    time.sleep(2)  # the health poller sees them answer again
    wait_healthy(cluster.url)
    migrations = metric(cluster.url, "pdcluster_migrations_total")

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            body = chat(
                "the first client", max_tokens=300, temperature=0, stream=True, ignore_eos=True
            )
            async with client.stream("POST", f"{cluster.url}/v1/chat/completions", json=body) as r:
                got = 0
                async for _ in sse_events(r):
                    got += 1
                    if got == 3:  # the others start while this one streams, then it leaves
                        others = asyncio.create_task(_streams(cluster.url, PROMPTS, 300))
                        await asyncio.sleep(0.5)
                        break
            return await others

    assert asyncio.run(run()) == want
    assert metric(cluster.url, "pdcluster_migrations_total") == migrations
    assert_idle(cluster.url)


def test_router_and_serve_run_on_the_head_and_workers_on_their_nodes(cluster):
    """A stalled worker node must not stop traffic: the router, the Serve controller and
    the proxy run on the head node; each worker on a node of its role."""
    from ray._private.state import actors

    head = cluster.local.head_node.node_id
    state = httpx.get(f"{cluster.url}/debug/state", timeout=10).json()
    assert state["router_node_id"] == head
    serve_actors = [
        a
        for a in actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"] in ("ServeController", "ProxyActor")
    ]
    assert {a["ActorClassName"] for a in serve_actors} == {"ServeController", "ProxyActor"}
    assert all(a["Address"]["NodeID"] == head for a in serve_actors), serve_actors
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    for role, groups in (("prefill", cluster.prefill), ("decode", cluster.decode)):
        for g in groups:
            node = ray.get(g.leader.ready.remote(), timeout=30)["node_id"]
            assert f"{role}_node" in resources[node], (role, node)


def test_prefill_killed_under_load_every_request_completes(cluster):
    async def load():
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i):
                return await client.post(
                    f"{cluster.url}/v1/chat/completions",
                    json=chat(f"load {i} " * 20, max_tokens=4, temperature=0),
                )

            tasks = [asyncio.create_task(one(i)) for i in range(60)]
            await asyncio.sleep(0.3)
            ray.kill(cluster.prefill[0].leader, no_restart=False)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * len(responses), [
        r.text for r in responses if r.status_code != 200
    ][:3]
    wait_healthy(cluster.url)
    # The restarted worker has a new NIXL agent: transfers from it work again.
    for i in range(6):
        r = httpx.post(
            f"{cluster.url}/v1/chat/completions",
            timeout=30,
            json=chat(f"after restart {i}", max_tokens=4, temperature=0),
        )
        assert r.status_code == 200, r.text
    assert_idle(cluster.url)


def test_frozen_decode_is_detected_and_its_streams_migrate(cluster):
    want = asyncio.run(_streams(cluster.url, PROMPTS, 300))
    frozen_at, pid = [], None

    def freeze():
        nonlocal pid
        pid = ray.get(_decoding_replica(cluster).leader.ready.remote(), timeout=10)["pid"]
        os.kill(pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    t0 = time.monotonic()
    try:
        got = asyncio.run(_streams(cluster.url, PROMPTS, 300, on_progress=freeze))
    finally:
        try:
            if pid is not None:
                os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # the watchdog killed it; Ray restarted it
    assert got == want
    # Detected and failed over well within the request deadline (30s).
    assert time.monotonic() - t0 < WATCHDOG_S + 15
    state = httpx.get(f"{cluster.url}/debug/state", timeout=10).json()
    metric_above(cluster.url, 'pdcluster_worker_restarts_total{role="decode"}', 0, state)
    wait_healthy(cluster.url)
    assert_idle(cluster.url)


def test_no_healthy_prefill_falls_back_to_decode_local_prefill(cluster):
    """Decode prefills itself when no prefill replica is healthy: the same text as the
    disaggregated path, greedy and seeded, with the penalties and min_p (computed there
    by decode alone from the same tokens)."""
    plain = chat(
        "fallback please", max_tokens=24, temperature=0, ignore_eos=True, skip_special_tokens=False
    )
    knobs = {"repetition_penalty": 1.3, "frequency_penalty": 0.8, "presence_penalty": 0.4}
    lps = {"logprobs": True, "top_logprobs": 3}
    bodies = [
        plain,
        plain | knobs,
        plain | knobs | {"temperature": 0.9, "seed": 7, "min_p": 0.05},
        plain | knobs | lps,  # the same logprobs, token 1's computed by decode here
        plain | {"n": 3, "temperature": 0.9, "seed": 11},  # choices prefilled each alone
        # A format: masked by decode alone, the same as masked by prefill then decode.
        chat("fallback please", max_tokens=400, temperature=0.9, seed=3) | _format(0),
        chat("fallback please", max_tokens=400, temperature=0) | _format(2),
    ]
    want = [
        httpx.post(f"{cluster.url}/v1/chat/completions", timeout=30, json=b).json() for b in bodies
    ]
    pids = [ray.get(g.leader.ready.remote(), timeout=30)["pid"] for g in cluster.prefill]
    before = metric(cluster.url, 'pdcluster_retries_total{reason="decode_local"}')
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + WATCHDOG_S + 10
        while httpx.get(f"{cluster.url}/health", timeout=5).json()["prefill_healthy"] > 0:
            assert time.monotonic() < deadline, "frozen prefill workers not detected"
            time.sleep(0.1)
        got = [httpx.post(f"{cluster.url}/v1/chat/completions", timeout=30, json=b) for b in bodies]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed by the watchdog and restarted by Ray
    for g, w in zip(got, want, strict=True):
        assert g.status_code == 200, g.text
        texts = [[c["message"]["content"] for c in r["choices"]] for r in (g.json(), w)]
        assert texts[0] == texts[1]
    route = got[5].json()["choices"][0]["message"]["content"]  # the last two: a format each
    jsonschema.validate(json.loads(route), ROUTE)
    calls = [r["choices"][0]["message"]["tool_calls"] for r in (got[-1].json(), want[-1])]
    assert [c["function"] for c in calls[0]] == [c["function"] for c in calls[1]]
    jsonschema.validate(json.loads(calls[0][0]["function"]["arguments"])["route"], ROUTE)
    texts = [[c["message"]["content"] for c in r["choices"]] for r in (got[4].json(), want[4])]
    assert len(texts[0]) == 3 and len(set(texts[0])) > 1
    lp = [
        [
            (e["logprob"], [t["logprob"] for t in e["top_logprobs"]])
            for e in r["logprobs"]["content"]
        ]
        for r in (got[3].json()["choices"][0], want[3]["choices"][0])
    ]
    assert len(lp[0]) == 24 and _same_logprobs(*lp)
    metric_above(cluster.url, 'pdcluster_retries_total{reason="decode_local"}', before)
    wait_healthy(cluster.url)
    assert_idle(cluster.url)


def test_metrics_endpoint_has_the_design_names(cluster):
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    for name in (
        "pdcluster_time_to_first_token_seconds",
        "pdcluster_e2e_request_latency_seconds",
        "pdcluster_time_per_output_token_seconds",
        "pdcluster_requests_total",
        "pdcluster_retries_total",
        "pdcluster_migrations_total",
        "pdcluster_worker_restarts_total",
        "pdcluster_requests_in_flight",
        "pdcluster_workers_healthy",
        "pdcluster_kv_transfer_seconds_bucket",
        "pdcluster_kv_transfer_bytes_total",
        "pdcluster_kv_transfer_timeouts_total",
        "pdcluster_kv_leases_expired_total",
        "pdcluster_kv_transfer_pending",
        "pdcluster_kv_blocks_used",
    ):
        assert name in text, name
    # One scrape, whichever replica answers, shows every router replica's own series.
    ok = re.findall(r'^pdcluster_requests_total\{outcome="ok",router="([^"]+)"\} ', text, re.M)
    assert sorted(ok) == sorted(_router_replicas(cluster.url)), ok
    assert metric(cluster.url, "pdcluster_kv_transfer_bytes_total") > 0


def test_every_metric_the_grafana_dashboard_queries_exists(cluster):
    """deploy/grafana/pdcluster.json against this live /metrics: each name a panel
    queries is a sample here, or a sample of a family declared here (a labelled
    counter shows only its # TYPE until it first counts)."""
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    samples = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln[:1] != "#"}
    families = {  # prometheus_client declares a counter as `<name>_total`, or not
        (f.removesuffix("_total") if kind == "counter" else f): kind
        for f, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    }
    suffix = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}

    def declared(name: str) -> bool:
        return any(name == fam + s for fam, kind in families.items() for s in suffix.get(kind, ()))

    missing = [m for m in sorted(dashboard_metrics()) if m not in samples and not declared(m)]
    assert not missing, missing


def test_status_summarizes_the_cluster(cluster):
    from cluster.status import render
    from pdcluster.cli import main

    routers = _router_replicas(cluster.url)
    text = render(cluster.url)
    assert text.splitlines()[0].endswith(": ok (prefill 2 healthy, decode 2 healthy)"), text
    nodes = {
        i["node_id"][:8]
        for g in cluster.prefill + cluster.decode
        for i in [ray.get(g.leader.ready.remote(), timeout=30)]
    }
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(name + " ")]
        assert "healthy" in line and "KV " in line and line.split("node ")[1][:8] in nodes
    assert "requests in flight" in text and "restarts" in text
    assert "routers: 2," in text
    stages = re.search(r"requests in flight \((.*)\)", text).group(1)
    assert {kv.split()[0] for kv in stages.split(", ")} <= {"admitted", "prefill", "decode"}, text
    for rid in routers:
        assert f"router {rid} pid " in text, text
    assert main(["status", cluster.url]) == 0


def _router_replicas(url: str, want: int = 2, gone: str = "", timeout: float = 120) -> dict:
    """router id -> pid of every live router replica, once `want` of them report and
    `gone` is not among them (a killed replica's last report lasts a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/debug/state", timeout=10)
        if r.status_code == 200:  # not a proxy still sending to a dead replica
            routers = {x["router_id"]: x["router_pid"] for x in r.json()["routers"]}
            if len(routers) == want and gone not in routers:
                return routers
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)


def test_one_router_replica_killed_under_load_fails_only_its_streams(cluster):
    """router.replicas: 2. SIGKILL one replica while 12 streams run on the two: the
    streams on the survivor all finish; those on the killed one end at once, without
    [DONE]; requests sent right after the kill are served; Serve replaces the
    replica, and nothing leaks on the workers or the routers."""
    routers = _router_replicas(cluster.url)
    victim, victim_pid = sorted(routers.items())[0]
    n = 12
    started = 0

    async def one(i: int, client: httpx.AsyncClient):
        nonlocal started
        body = chat(f"router {i}", max_tokens=300, temperature=0, stream=True, ignore_eos=True)
        router, tokens, done = None, 0, False
        try:
            async with client.stream("POST", f"{cluster.url}/v1/chat/completions", json=body) as r:
                router = r.headers["pdcluster-router"]
                started += 1
                async for ev in sse_events(r):
                    ch = ev["choices"][0] if ev.get("choices") else {}
                    tokens += bool(ch.get("delta", {}).get("content"))
                    done = done or ch.get("finish_reason") == "length"
            return router, tokens, done, None, time.monotonic()
        except httpx.HTTPError as e:
            return router, tokens, done, type(e).__name__, time.monotonic()

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(one(i, client)) for i in range(n)]
            while started < n:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            after = []
            for i in range(10):  # new requests, at once
                r = await client.post(
                    f"{cluster.url}/v1/chat/completions",
                    json=chat(f"after {i}", max_tokens=4, temperature=0),
                )
                after.append((r.status_code, time.monotonic() - killed_at))
            return await asyncio.gather(*tasks), killed_at, after

    results, killed_at, after = asyncio.run(run())
    on_victim = [x for x in results if x[0] == victim]
    on_survivor = [x for x in results if x[0] != victim]
    assert on_victim and on_survivor, [x[0] for x in results]  # both replicas had streams
    for router, tokens, done, error, ended in on_survivor:
        assert done and tokens > 0 and error is None, (router, tokens, done, error)
    for router, tokens, done, error, ended in on_victim:
        assert not done and ended - killed_at < 10, (tokens, done, error, ended - killed_at)
    assert all(status == 200 for status, _ in after), after
    assert after[0][1] < 5, after
    # Serve starts a new replica; the killed one's report is dropped; nothing leaks.
    _router_replicas(cluster.url, gone=victim)
    assert_idle(cluster.url)


def _actor(name: str) -> dict:
    """A live actor's entry in the GCS's table, by class or actor name."""
    from ray._private.state import actors

    return next(
        a
        for a in actors().values()
        if a["State"] != "DEAD" and name in (a["ActorClassName"], a["Name"])
    )


def test_a_stalled_worker_is_killed_once_when_the_router_peers_answer_late(cluster):
    """The router replicas' shared actor (cluster/peers.py) is frozen while a worker
    stalls: each router replica gives up waiting for it and kills the worker itself.
    When the peers actor runs the restarts queued meanwhile, they must not kill the
    fresh process Ray has started since: a kill names one process (pid and start time),
    never whatever process the worker has at that moment."""
    wait_healthy(cluster.url)
    g = cluster.prefill[1]
    name = "pdcluster-prefill-1-rank0"
    stalled = ray.get(g.leader.ready.remote(), timeout=10)["pid"]
    restarts = _actor(name)["NumRestarts"]
    peers = _actor("Peers")["Pid"]
    os.kill(peers, signal.SIGSTOP)
    try:
        os.kill(stalled, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while (fresh := _actor(name)).get("Pid") in (stalled, 0, None) or fresh["State"] != "ALIVE":
            assert time.monotonic() < deadline, f"never restarted: {fresh}"
            time.sleep(0.2)
        fresh = ray.get(g.leader.ready.remote(), timeout=60)["pid"]
    finally:
        os.kill(peers, signal.SIGCONT)  # the restarts it was asked for meanwhile now run
        try:
            os.kill(stalled, signal.SIGCONT)
        except ProcessLookupError:
            pass
    time.sleep(3)  # they have run: one call each, a few ms
    assert ray.get(g.leader.ready.remote(), timeout=30)["pid"] == fresh
    assert _actor(name)["NumRestarts"] == restarts + 1
    wait_healthy(cluster.url)


def test_a_replica_gone_for_good_is_reported_lost_and_polled_rarely(cluster):
    """Last in this module: decode-1 is killed for good. /health names it lost, the
    health poller backs off (one stats() call in flight at most, one every 10 s once
    lost, instead of one every 0.25 s), and decode-0 goes on serving."""
    ray.kill(cluster.decode[1].leader, no_restart=True)
    deadline = time.monotonic() + 60
    while "decode-1" not in httpx.get(f"{cluster.url}/health", timeout=10).json()["lost"]:
        assert time.monotonic() < deadline, "decode-1 never reported lost"
        time.sleep(0.5)

    def polls() -> tuple[int, int | None]:
        """(answering router replica's pid, its poll count of decode-1 once it holds
        decode-1 lost, else None). Each router replica polls on its own."""
        state = httpx.get(f"{cluster.url}/debug/state", timeout=10).json()
        w = next(w for w in state["workers"] if w["role"] == "decode" and w["replica"] == 1)
        return state["router_pid"], (w["polls"] if w["lost"] else None)

    def sample(want) -> dict[int, int]:
        """A lost-state poll count from every router replica in `want` (pids), or from
        as many as answer within 30 s when `want` is None."""
        got: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (want is None or set(got) != set(want)):
            pid, n = polls()
            if n is not None and (want is None or pid in want):
                got.setdefault(pid, n)
            if want is None and len(got) == cluster.config.router.replicas:
                break
        return got

    before = sample(None)
    assert before
    time.sleep(10)
    after = sample(before)
    assert after and all(after[p] - before[p] <= 2 for p in after), (before, after)  # 40 at 0.25 s
    r = httpx.post(
        f"{cluster.url}/v1/chat/completions",
        timeout=30,
        json=chat("still serving", max_tokens=4, temperature=0),
    )
    assert r.status_code == 200, r.text
    assert_idle(cluster.url)
