"""A decode output channel is replaced once it has carried `router.channel_max_messages`
messages (Ray keeps state for every item of a streaming call until the call ends, so a
channel kept for a replica's lifetime grows the router and the decode worker with every
step). Streams that cross a replacement finish on their own channel with Hugging Face's
greedy tokens, none migrated, and a replaced channel closes once its last request ends."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support import (
    assert_idle,
    greedy_completion,
    hf_greedy,
    load_test_config,
    metric,
    running_cluster,
    sse_events,
)

CHANNEL_MAX = 20  # messages: one per decode step
N_TOKENS = 60
PROMPTS = [f"stream {i} crosses channel replacements" for i in range(6)]


@pytest.fixture(scope="module")
def cluster():
    cfg = load_test_config("tiny.yaml", router={"port": 8027, "channel_max_messages": CHANNEL_MAX})
    with running_cluster(cfg) as rc:
        yield rc


async def _stream(client: httpx.AsyncClient, url: str, ids: list[int], delay: float) -> list:
    await asyncio.sleep(delay)  # staggered: replacements fall mid-stream
    body = greedy_completion(ids, N_TOKENS, stream=True)
    texts = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for chunk in sse_events(r):
            assert "error" not in chunk, chunk
            texts += [c["text"] for c in chunk["choices"]]
    return "".join(texts)


def test_streams_cross_channel_replacements(cluster, hf):
    _, tok = hf
    ids = [tok.encode(p) for p in PROMPTS]
    want = [tok.decode(hf_greedy(hf, i, N_TOKENS), skip_special_tokens=False) for i in ids]
    url = cluster.url
    opened = httpx.get(f"{url}/debug/state", timeout=10).json()["router_channels_opened"]
    migrations = metric(url, "pdcluster_migrations_total")

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *[_stream(client, url, i, 0.4 * k) for k, i in enumerate(ids)]
            )

    assert asyncio.run(run()) == want
    assert metric(url, "pdcluster_migrations_total") == migrations
    state = assert_idle(url)
    # At least one decode step per token, every CHANNEL_MAX steps a new channel.
    assert state["router_channels_opened"] - opened >= N_TOKENS // CHANNEL_MAX
    deadline = time.monotonic() + 10
    while True:  # the replaced channels close once their last request ended
        state = httpx.get(f"{url}/debug/state", timeout=10).json()
        decode = [w["stats"] for w in state["workers"] if w["role"] == "decode"]
        if [s["channels"] for s in decode] == [1] and state["router_channel_queues"] == 0:
            break
        assert time.monotonic() < deadline, (state["router_channel_queues"], decode)
        time.sleep(0.2)
