"""Load above what the KV pools hold, sustained: it queues and is served, it never
turns into watchdog kills. One prefill and one decode replica with small pools
(prefill 16 blocks, decode 24 of 16 tokens). A request is ~40 prompt + 64 output
tokens: 3 decode requests fit (~7 blocks each, with headroom) and 5 prompts' leases
fill prefill while they wait for decode, 8 in all; 16 clients each keep one
streaming request in flight for DURATION_S (30 s; 60 s for the figures in
benchmarks/README.md), twice that."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from tests.support import assert_idle, load_test_config, running_cluster, sse_events

CLIENTS = 16
DURATION_S = 30.0  # ten watchdog periods
WATCHDOG_S = 3.0


@pytest.fixture(scope="module")
def cluster():
    cfg = load_test_config(
        "tiny.yaml",
        model={"max_model_len": 256},
        prefill={"kv_blocks": 16},
        decode={"kv_blocks": 24},
        router={
            "port": 8016,
            "watchdog_s": WATCHDOG_S,
            "health_period_s": 0.25,
            "request_timeout_s": 60,
        },
    )
    with running_cluster(cfg) as rc:
        yield rc


async def _client(url: str, c: int, until: float, out: list) -> None:
    async with httpx.AsyncClient(timeout=90) as client:
        i = 0
        while time.monotonic() < until:
            body = {
                "model": "tiny-llama",
                "stream": True,
                "max_tokens": 64,
                "temperature": 0,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": f"client {c} request {i} " * 2}],
            }
            t0, ttft, status, err = time.monotonic(), None, None, None
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                status = r.status_code
                async for chunk in sse_events(r):
                    if "error" in chunk:
                        err = chunk["error"]
                    elif ttft is None and chunk["choices"][0]["delta"].get("content"):
                        ttft = time.monotonic() - t0
            out.append((status, err, ttft, time.monotonic() - t0))
            i += 1


def _restarts(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(ln.rpartition(" ")[2])
        for ln in text.splitlines()
        if ln.startswith("pdcluster_worker_restarts_total")
    )


def test_twice_the_kv_pools_for_30_s_queues_without_restarts(cluster):
    url = cluster.url
    before = _restarts(url)

    peak = {"decode_waiting_for_blocks": 0, "prefill_pending": 0}

    async def watch(until: float) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while time.monotonic() < until:
                state = (await client.get(f"{url}/debug/state")).json()
                for k in peak:
                    peak[k] = max(peak[k], state[k])
                await asyncio.sleep(0.5)

    async def load():
        out: list = []
        until = time.monotonic() + DURATION_S
        await asyncio.gather(watch(until), *[_client(url, c, until, out) for c in range(CLIENTS)])
        return out

    results = asyncio.run(load())
    # The pools really were full: pulled KV waited for decode blocks, prompts for prefill's.
    assert peak["decode_waiting_for_blocks"] > 0 and peak["prefill_pending"] > 0, peak
    ok = [r for r in results if r[0] == 200 and r[1] is None]
    clean = [
        r
        for r in results
        if r[0] in (429, 503) or (r[1] is not None and r[1].get("code") == "worker_unavailable")
    ]
    assert len(ok) + len(clean) == len(results), [r for r in results if r not in ok + clean][:3]
    assert len(ok) >= len(results) * 0.9 and len(ok) > 2 * CLIENTS
    ttfts, e2es = sorted(r[2] for r in ok), sorted(r[3] for r in ok)

    def p99(xs):
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))]

    print(
        f"\noverload: {len(results)} requests in {DURATION_S:.0f}s, {len(ok)} ok, "
        f"{len(clean)} refused, peak {peak}; TTFT (prefill queue) p50 "
        f"{statistics.median(ttfts):.2f}s p99 {p99(ttfts):.2f}s; end to end (with the decode "
        f"queue) p50 {statistics.median(e2es):.2f}s p99 {p99(e2es):.2f}s"
    )
    assert _restarts(url) == before
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["prefill_healthy"] == 1 and health["decode_healthy"] == 1, health
    assert_idle(url)
