"""Who owns worker state, and what that guarantees, through real prefill and
decode actors (tiny model) on two Ray nodes: every release answers its caller,
a full KV pool is waited on asleep, blocks under a READ are never freed early,
channel ids never repeat, and a worker whose raylet is gone exits."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import ray

from tests.integration.test_transfer_leases import SP, _pair, _tables, _wait_empty
from transfer import FaultConfig
from wire.api import RequestReleased
from wire.channel import OutputChannel
from workers.prefill_worker import PrefillWorker

PROMPT = list(range(3, 3 + 240))  # 15 blocks of 16: four leases fill most of a 64-block pool


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_release_answers_a_queued_prefill_and_a_full_pool_is_waited_on_asleep(
    ray_nodes, tiny_model_dir
):
    """Four unpulled leases hold 60 of 64 blocks, so a fifth prompt waits for
    blocks. The worker sleeps meanwhile (it used to spin a core, which the watchdog
    read as busy without progress) and says it is blocked, not busy; releasing the
    queued request answers its caller at once (it used to wait forever, counted
    against max_pending) and nothing is left pending."""
    p, d = _pair(tiny_model_dir, "queued")
    pid = ray.get(p.ready.remote())["pid"]

    async def run():
        held = [await p.prefill.remote(f"h{i}", PROMPT, SP) for i in range(4)]
        queued = p.prefill.remote("queued", PROMPT, SP)
        await asyncio.sleep(1.0)
        st = await p.stats.remote()
        assert (st.pending, st.engine.waiting, st.engine.blocked, st.busy) == (1, 1, True, False)
        cpu = _cpu_s(pid)
        await asyncio.sleep(2.0)
        assert _cpu_s(pid) - cpu < 0.5
        await p.release.remote("queued")
        with pytest.raises(RequestReleased):
            await asyncio.wait_for(queued, 5)
        assert (await p.stats.remote()).pending == 0
        for h in held:
            await p.release.remote(h.request_id)

    asyncio.run(run())
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)


def test_a_cancelled_pull_keeps_its_blocks_until_the_read_has_ended(ray_nodes, tiny_model_dir):
    """Each pull is delayed 0.8 s before its READ. The decode call is cancelled
    mid-pull: its blocks stay allocated while the transfer may still write them,
    and are freed once it has ended (they used to be freed at once, free for
    another request while the READ went on)."""
    p, d = _pair(tiny_model_dir, "cancel", faults=FaultConfig(delay_rate=1.0, delay_s=0.8))
    prompt = list(range(3, 60))  # 4 blocks

    async def run():
        res = await p.prefill.remote("c", prompt, SP)
        chan = OutputChannel(d, "cancel")
        try:
            await asyncio.wait_for(chan._open.wait(), 30)
            ref = d.generate.remote("c", chan.id, prompt, res.first_token, SP, res.handle, 30.0, p)
            await asyncio.sleep(0.4)
            ray.cancel(ref)
            with pytest.raises((ray.exceptions.TaskCancelledError, asyncio.CancelledError)):
                await ref
            st = await d.stats.remote()
            assert (st.transfers_pending, st.engine.used_blocks) == (1, 4)
        finally:
            chan.shutdown()

    asyncio.run(run())
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)


def test_output_channel_ids_never_repeat(ray_nodes, tiny_model_dir):
    _, d = _pair(tiny_model_dir, "chan-ids")

    async def run():
        ids = []
        for i in range(30):
            chan = OutputChannel(d, "router")
            ids.append(chan.id)
            chan.shutdown()
            del chan
        return ids

    ids = asyncio.run(run())
    assert len(set(ids)) == len(ids)


def test_a_worker_whose_raylet_is_gone_exits(ray_nodes, tiny_model_dir):
    node = ray_nodes.add_node(
        num_cpus=1, resources={"orphan_node": 1}, object_store_memory=128 * 1024**2
    )
    w = PrefillWorker.options(
        name="orphan", num_cpus=0, max_restarts=0, resources={"orphan_node": 0.01}
    ).remote(_spec(tiny_model_dir))
    pid = ray.get(w.ready.remote(), timeout=120)["pid"]
    ray_nodes.remove_node(node, allow_graceful=False)  # raylet and its daemons, not workers
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
        assert time.monotonic() < deadline, "worker still running 10 s after its raylet died"
        time.sleep(0.2)


def _spec(model_dir):
    from cluster.config import parse_config, worker_spec

    cfg = parse_config(
        {
            "model": {"source": "tiny", "max_model_len": 256},
            "cluster": {"address": "auto"},
            "prefill": {"kv_blocks": 16, "prefix_caching": False},
        }
    )
    return worker_spec(cfg, "prefill", 9, str(model_dir))


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"
