"""TP=2 prefill and TP=2 decode groups on two Ray nodes, through HTTP: the
same greedy text as TP=1 (Hugging Face generate, float32), each rank's KV
shard moved over NIXL to the same rank, and a group that loses a rank restarts
as a unit and serves again. Decode here streams in items of 4 tokens
(`decode.stream_interval`), which must not change the text."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray

from tests.e2e.test_tiny_cluster import PROMPTS
from tests.support import (
    assert_idle,
    greedy_completion,
    hf_greedy,
    listening_sockets,
    load_test_config,
    running_cluster,
)

N_TOKENS = 24


@pytest.fixture(scope="module")
def cluster():
    cfg = load_test_config(
        "tiny.yaml",
        prefill={"tensor_parallel_size": 2},
        decode={"tensor_parallel_size": 2, "stream_interval": 4},
        router={"port": 8014, "watchdog_s": 20},
    )
    with running_cluster(cfg) as rc:
        yield rc


def _greedy_text(cluster, hf, prompt: str) -> tuple[str, str]:
    """(text over HTTP at TP=2, Hugging Face's greedy text at TP=1)."""
    _, tok = hf
    ids = tok.encode(prompt)
    r = httpx.post(
        f"{cluster.url}/v1/completions",
        timeout=60,
        json=greedy_completion(ids, N_TOKENS),
    )
    if r.status_code != 200:
        return r.text, None
    return r.json()["choices"][0]["text"], tok.decode(
        hf_greedy(hf, ids, N_TOKENS), skip_special_tokens=False
    )


def test_groups_have_two_ranks_on_their_node(cluster):
    for g in cluster.prefill + cluster.decode:
        infos = ray.get([a.ready.remote() for a in g.ranks], timeout=60)
        assert len(infos) == 2 and len({i["node_id"] for i in infos}) == 1
        assert len({i["pid"] for i in infos}) == 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tp2_greedy_equals_tp1(cluster, hf, prompt):
    got, want = _greedy_text(cluster, hf, prompt)
    assert got == want


def test_stream_interval_sends_fewer_larger_chunks(cluster, hf):
    _, tok = hf
    ids = tok.encode(PROMPTS[1])
    with httpx.stream(
        "POST",
        f"{cluster.url}/v1/completions",
        timeout=60,
        json=greedy_completion(ids, N_TOKENS, stream=True),
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == tok.decode(hf_greedy(hf, ids, N_TOKENS), skip_special_tokens=False)
    # The first token comes from prefill alone; the other 23 in items of 4 (a byte
    # the detokenizer holds back can add one more chunk).
    assert len([c for c in chunks if c["choices"][0]["text"]]) <= 1 + 6 + 1


def test_every_rank_stepped_and_nothing_is_held(cluster):
    assert_idle(cluster.url)
    for g in cluster.prefill + cluster.decode:
        leader = ray.get(g.leader.stats.remote(), timeout=30)
        follower = ray.get(g.ranks[1].stats.remote(), timeout=30)
        assert follower.steps >= leader.engine.steps > 0
    transfers = ray.get(cluster.decode[0].leader.stats.remote(), timeout=30).transfers
    assert transfers.count >= len(PROMPTS) and transfers.failures == 0


def test_lost_rank_restarts_the_group(cluster, hf):
    """Kill decode rank 1: the leader's next collective fails, it exits, Ray
    restarts both, they rendezvous again, and the same greedy text comes back."""
    before = ray.get(cluster.decode[0].leader.ready.remote(), timeout=30)["pid"]
    ray.kill(cluster.decode[0].ranks[1], no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            pid = ray.get(cluster.decode[0].leader.ready.remote(), timeout=5)["pid"]
            if pid != before:
                break
        except (ray.exceptions.RayError, TimeoutError):
            pass
        assert time.monotonic() < deadline, "decode group did not restart"
        time.sleep(0.5)
    deadline = time.monotonic() + 120
    while True:  # the router sees the restarted leader healthy again, then serves
        got, want = _greedy_text(cluster, hf, PROMPTS[2])
        if want is not None:
            break
        assert time.monotonic() < deadline, got
        time.sleep(1)
    assert got == want
    assert_idle(cluster.url)


def test_every_process_of_the_local_cluster_listens_on_loopback_only(cluster):
    """With `cluster.address: local`, nothing on the LAN can reach the cluster: Ray's
    GCS, raylets, object managers, agents and workers, the Serve proxy, NIXL's UCX and
    the tensor-parallel store and collectives (this module runs TP=2) listen on
    127.0.0.1 (or ::1) only."""
    import os

    from cluster.reaper import _ray_descendants

    pids = [os.getpid(), *_ray_descendants(os.getpid())]
    socks = listening_sockets(pids)
    assert len(socks) > 10
    exposed = [
        (p, a) for p, a in socks if not a.startswith(("127.0.0.1:", "::1:", "::ffff:127.0.0.1:"))
    ]
    names = {p: open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:60] for p, _ in exposed}
    assert not exposed, [(p, a, names[p]) for p, a in exposed]


def test_chaos_kill_tp_rank_under_load(cluster):
    """`pdcluster chaos`'s kill-tp-rank scenario against this TP=2 cluster, under
    streaming load: no request hangs or differs from the fault-free text, nothing is
    left held, and goodput recovers. With one decode group and no spare, requests fail
    (cleanly, 503) while the group restarts, and clients retrying at once make many of
    them: instead of a success rate, every failure must have been in flight in that window."""
    import msgspec

    from chaos import harness
    from chaos.config import ChaosConfig, ChaosRunConfig
    from chaos.scenarios import SCENARIOS
    from chaos.target import HealthMonitor, Target

    chaos = ChaosConfig(
        concurrency=4,
        max_tokens=16,
        prompts=8,
        baseline_s=6,
        warmup_s=3,
        scenarios={"kill-tp-rank": {"min_success_rate": 0.0, "max_recovery_s": 60}},
    )
    cfg = ChaosRunConfig(**msgspec.structs.asdict(cluster.config), chaos=chaos)
    target = Target(cfg, cluster.url, cluster)
    try:
        h = harness.Harness(target, seed=2, progress=print)
        with HealthMonitor(target) as monitor:
            h.run_baseline()
            res = h.run_scenario(SCENARIOS["kill-tp-rank"], monitor)
    finally:
        target.close()
    assert res.skipped is None and "rank 1" in res.target
    assert res.passed, (res.failures, res.errors)
    assert res.hung == 0 and res.corrupted == 0 and not res.leaked
    assert res.detect_s is not None and res.healthy_again_s is not None
    back = res.fault_start + res.healthy_again_s + 2
    failed = [r for r in res.records if not r.completed]
    # Every failure was in flight at the fault or started before the group was back
    # (a request in flight at the kill may have started well before it on 2 cores).
    outside = [r for r in failed if r.end < res.fault_start or r.start > back]
    assert not outside, [
        (round(r.start - res.fault_start, 1), round(r.end - res.fault_start, 1), r.error)
        for r in outside
    ][:5]
    assert all("worker_unavailable" in r.error or "503" in r.error for r in failed), {
        r.error for r in failed
    }
