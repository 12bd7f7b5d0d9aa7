"""Leases, deadlines and injected faults through real prefill and decode
workers (tiny model) on two Ray nodes: every transfer ends, typed, on time,
and every table ends empty."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import types

import msgspec
import pytest
import ray

from cluster.config import parse_config, worker_spec
from transfer import FaultConfig, LeaseExpired, TransferError, TransferFailed, TransferTimeout
from wire.channel import OutputChannel
from wire.sampling_params import SamplingParams
from workers.decode_worker import DecodeWorker
from workers.prefill_worker import PrefillWorker

TIMEOUT_S = 1.0
SP = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

# Ray workers cannot import this test module by name; ship its actor classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _AheadDecode(DecodeWorker.__ray_actor_class__):
    """A decode worker on a node whose wall clock runs CLOCK_AHEAD_S ahead of the rest
    of the cluster's (its `time.time()` only: each node's monotonic clock is its own)."""

    def __init__(self, spec):
        import time as real

        import workers.decode_worker as dw

        ahead = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if k[0] != "_"})
        ahead.time = lambda: real.time() + CLOCK_AHEAD_S
        dw.time = ahead
        super().__init__(spec)


CLOCK_AHEAD_S = 90.0
AheadDecode = ray.remote(_AheadDecode)


def pair_config(
    max_model_len=256,
    kv_blocks=64,
    lease_ttl_s=30.0,
    faults=None,
    max_pending=64,
    backend="nixl",
    decode_max_running=32,
):
    """The config of a prefill + decode pair started by hand (workers built from it as
    the launcher builds them). Prefix caching off: the tests count every block."""
    groups = {"kv_blocks": kv_blocks, "block_size": 16, "prefix_caching": False}
    return parse_config(
        {
            "model": {"source": "tiny", "max_model_len": max_model_len},
            "cluster": {"address": "auto"},
            "prefill": groups,
            "decode": {**groups, "max_running": decode_max_running},
            "transfer": {
                "backend": backend,
                "timeout_s": TIMEOUT_S,
                "lease_ttl_s": lease_ttl_s,
                "max_pending": max_pending,
                "faults": None if faults is None else msgspec.to_builtins(faults),
            },
        }
    )


def _pair(
    model_dir,
    name: str,
    lease_ttl_s=30.0,
    faults=None,
    max_pending=64,
    backend="nixl",
    kv_blocks=64,
    max_model_len=256,
    decode_max_running=32,
    decode_cls=DecodeWorker,
):
    cfg = pair_config(
        max_model_len=max_model_len,
        kv_blocks=kv_blocks,
        lease_ttl_s=lease_ttl_s,
        faults=faults,
        max_pending=max_pending,
        backend=backend,
        decode_max_running=decode_max_running,
    )
    p = PrefillWorker.options(
        name=f"p-{name}", max_restarts=-1, num_cpus=0, resources={"prefill_node": 0.01}
    ).remote(worker_spec(cfg, "prefill", 0, str(model_dir)))
    d = decode_cls.options(name=f"d-{name}", num_cpus=0, resources={"decode_node": 0.01}).remote(
        worker_spec(cfg, "decode", 0, str(model_dir))
    )
    ray.get([p.ready.remote(), d.ready.remote()], timeout=120)
    return p, d


async def _transfer(
    p,
    d,
    rid: str,
    prompt: list[int],
    deadline_s: float = 30.0,
    after_prefill=None,
    sp: SamplingParams = SP,
    before: list[int] | None = None,
) -> list[int]:
    """Prefill on `p`, pull and decode on `d`: the tokens produced. `before`: tokens the
    request produced earlier (a migration continues after them)."""
    res = await p.prefill.remote(rid, prompt, sp, before)
    if after_prefill is not None:
        await asyncio.to_thread(after_prefill)
    return [res.first_token] + await _stream(
        d,
        rid,
        lambda chan: d.generate.remote(
            rid, chan.id, prompt, res.first_token, sp, res.handle, deadline_s, p, before
        ),
    )


async def _stream(d, rid: str, submit) -> list[int]:
    out = []
    chan = OutputChannel(d, f"test-{rid}")
    try:
        async for delta in chan.stream(rid, lambda: submit(chan), lambda fn: fn()):
            out += delta.tokens
    finally:
        chan.shutdown()
    return out


def _tables(p, d) -> dict:
    ps, ds = ray.get([p.stats.remote(), d.stats.remote()], timeout=30)
    return {
        "leases": ps.engine.leases,
        "pinned": ps.pinned_blocks,
        "pending": ps.pending,
        "decode_used": ds.engine.used_blocks,
        "transfers": ds.transfers_pending,
        "waiting_for_blocks": ds.engine.waiting_for_blocks,
        "streams": ds.streams,
        "channels": ds.channels,
    }


def _wait_empty(p, d, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        t = _tables(p, d)
        if not any(t.values()) or time.monotonic() > deadline:
            return t
        time.sleep(0.1)


def test_lease_expiry_frees_blocks_and_late_claim_fails_typed(ray_nodes, tiny_model_dir):
    p, d = _pair(tiny_model_dir, "expiry", lease_ttl_s=0.5)
    with pytest.raises(LeaseExpired):
        # Decode arrives after the lease ran out: the claim fails before any read.
        asyncio.run(
            _transfer(p, d, "late", list(range(3, 40)), after_prefill=lambda: time.sleep(1.0))
        )
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)
    assert ray.get(p.stats.remote()).engine.leases_expired == 1
    # The same pair still serves a prompt pulled in time.
    assert len(asyncio.run(_transfer(p, d, "on-time", list(range(3, 40))))) == 2


def test_a_request_queued_in_decode_keeps_its_lease_past_the_ttl(ray_nodes, tiny_model_dir):
    """Decode runs one sequence at a time; the second request's KV waits there for
    blocks for far longer than the lease's TTL (the first decodes 900 tokens). Its
    lease is renewed while it waits, so it is pulled and served, not expired into
    a LeaseExpired (which, through the router, meant re-prefills and a 503)."""
    p, d = _pair(
        tiny_model_dir, "queued", lease_ttl_s=0.3, max_model_len=1024, decode_max_running=1
    )
    long_sp = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 40))

    async def both():
        first = asyncio.ensure_future(_transfer(p, d, "long", prompt, sp=long_sp))
        while not (await d.stats.remote()).engine.running:  # "long" holds the one place
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        second = await _transfer(p, d, "queued", prompt, sp=SP)
        return await first, second, time.monotonic() - t0

    long_out, queued_out, waited = asyncio.run(both())
    assert len(long_out) == 900 and len(queued_out) == 2
    assert waited > 0.6, waited  # it did wait in decode's queue for more than 2 TTLs
    ds = ray.get(d.stats.remote())
    assert ds.transfers.renewals >= 2 and ds.transfers.failures == 0
    assert ray.get(p.stats.remote()).engine.leases_expired == 0
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)


def test_prefill_gone_while_a_request_waits_in_decode_is_a_transfer_failure(
    ray_nodes, tiny_model_dir
):
    """The prefill actor holding a queued request's lease dies: the renewal fails as a
    TransferFailed (the router re-prefills elsewhere), not as an actor error the
    router would take for a lost decode; decode ends with nothing held."""
    p, d = _pair(tiny_model_dir, "gone", lease_ttl_s=0.5, max_model_len=1024, decode_max_running=1)
    long_sp = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 40))

    async def both():
        first = asyncio.ensure_future(_transfer(p, d, "long", prompt, sp=long_sp))
        while not (await d.stats.remote()).engine.running:
            await asyncio.sleep(0.02)
        try:
            await _transfer(p, d, "orphan", prompt, after_prefill=lambda: ray.kill(p))
        except Exception as e:  # noqa: BLE001 - the type is the point
            return await first, e
        return await first, None

    long_out, err = asyncio.run(both())
    assert len(long_out) == 600
    assert isinstance(err, TransferFailed), repr(err)
    assert not isinstance(err, ray.exceptions.RayActorError), repr(err)
    ds = ray.get(d.stats.remote())
    assert (ds.engine.used_blocks, ds.transfers_pending, ds.streams) == (0, 0, 0)


def test_pull_that_never_completes_ends_at_timeout_and_frees_both_sides(ray_nodes, tiny_model_dir):
    """Prefill frozen (SIGSTOP) after prefilling: the claim is never answered."""
    p, d = _pair(tiny_model_dir, "stall", lease_ttl_s=2.0)
    pid = ray.get(p.ready.remote())["pid"]
    t0 = []
    try:
        with pytest.raises(TransferTimeout):
            asyncio.run(
                _transfer(
                    p,
                    d,
                    "stalled",
                    list(range(3, 40)),
                    after_prefill=lambda: (
                        os.kill(pid, signal.SIGSTOP),
                        t0.append(time.monotonic()),
                    ),
                )
            )
        elapsed = time.monotonic() - t0[0]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert TIMEOUT_S * 0.9 < elapsed < TIMEOUT_S + 2.0
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)


def test_1000_transfers_with_random_faults_all_end_on_time(ray_nodes, tiny_model_dir):
    faults = FaultConfig(
        delay_rate=0.1, delay_s=0.05, stall_rate=0.02, fail_rate=0.1, expire_rate=0.05, seed=7
    )
    p, d = _pair(tiny_model_dir, "faults", faults=faults, max_pending=32)

    async def run():
        sem = asyncio.Semaphore(16)

        async def one(i):
            async with sem:
                t = time.monotonic()
                try:
                    await _transfer(p, d, f"f{i}", [3 + i % 200, 4, 5, 6, 7])
                    outcome = "ok"
                except TransferError as e:  # Ray wraps it; name the transfer error class
                    outcome = next(
                        c.__name__ for c in type(e).__mro__ if c.__module__ == "transfer.handle"
                    )
                return outcome, time.monotonic() - t

        return await asyncio.gather(*[one(i) for i in range(1000)])

    results = asyncio.run(run())
    outcomes = {o for o, _ in results}
    assert outcomes <= {
        "ok",
        "TransferTimeout",
        "TransferFailed",
        "LeaseExpired",
        "TransferBackpressure",
    }, outcomes
    assert {"ok", "TransferTimeout", "TransferFailed", "LeaseExpired"} <= outcomes
    # Each ends within its transfer deadline plus the prefill and one decode step.
    assert max(t for _, t in results) < TIMEOUT_S + 3.0
    assert _wait_empty(p, d, timeout=40) == dict.fromkeys(_tables(p, d), 0)
    assert ray.get(p.stats.remote()).engine.leases == 0


def test_restarted_prefill_worker_serves_transfers_again(ray_nodes, tiny_model_dir):
    p, d = _pair(tiny_model_dir, "restart")
    before = ray.get(p.ready.remote())["agent"]
    assert len(asyncio.run(_transfer(p, d, "r0", list(range(3, 30))))) == 2
    ray.kill(p, no_restart=False)
    deadline = time.monotonic() + 60
    after = before
    while after == before:  # ray.kill is asynchronous: wait for the new incarnation
        assert time.monotonic() < deadline, "prefill worker did not come back"
        try:
            after = ray.get(p.ready.remote(), timeout=10)["agent"]
        except Exception:  # noqa: BLE001 - dying or restarting
            pass
        time.sleep(0.2)
    # `after` differs: a new NIXL agent, so decode must handshake again.
    for i in range(3):
        assert len(asyncio.run(_transfer(p, d, f"r{i + 1}", list(range(3, 30))))) == 2
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)


def test_ray_object_store_backend_gives_the_same_tokens(ray_nodes, tiny_model_dir):
    """transfer.backend: ray — same leases and deadlines, bytes through the object store."""
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 70))  # five blocks
    pn, dn = _pair(tiny_model_dir, "cmp-nixl")
    pr, dr = _pair(tiny_model_dir, "cmp-ray", backend="ray")
    want = asyncio.run(_transfer(pn, dn, "n0", prompt, sp=sp))
    got = asyncio.run(_transfer(pr, dr, "r0", prompt, sp=sp))
    assert got == want and len(got) == 12
    assert ray.get(dr.stats.remote()).transfers.bytes > 0
    for p, d in ((pn, dn), (pr, dr)):
        assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)


def test_a_pull_that_outlives_its_deadline_is_given_up_and_its_blocks_held(
    ray_nodes, tiny_model_dir
):
    """The pull's thread ignores its deadline (as a handshake blocked on a peer that
    drops packets would): decode gives up on it a grace period after the deadline
    (the request fails over, typed), and holds the request's blocks out of its pool,
    counted, until the thread has ended; then every table is back at zero."""
    from workers.pull import PULL_GRACE_S

    p, d = _pair(tiny_model_dir, "hang", faults=FaultConfig(hang_rate=1.0, hang_s=6.0))
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="still running"):
        asyncio.run(_transfer(p, d, "hung", list(range(3, 40))))
    assert time.monotonic() - t0 < TIMEOUT_S + PULL_GRACE_S + 2.0
    st = ray.get(d.stats.remote())
    assert st.engine.held_blocks == 3 and st.engine.used_blocks == 3, st.engine
    assert _wait_empty(p, d, timeout=20) == dict.fromkeys(_tables(p, d), 0)
    assert ray.get(d.stats.remote()).engine.held_blocks == 0


def test_a_decode_clock_ahead_of_the_cluster_changes_nothing(ray_nodes, tiny_model_dir):
    """Decode's wall clock runs 90 s ahead (more than the lease TTL and the request's
    deadline). Deadlines and lease expiry cross processes as time left, never as time
    stamps, so a request queued in decode still has its lease renewed, is pulled and
    served (it used to fail at once: the deadline and every renewal read as past)."""
    p, d = _pair(
        tiny_model_dir,
        "ahead",
        lease_ttl_s=0.3,
        max_model_len=1024,
        decode_max_running=1,
        decode_cls=AheadDecode,
    )
    long_sp = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 40))

    async def both():
        first = asyncio.ensure_future(_transfer(p, d, "long", prompt, sp=long_sp))
        while not (await d.stats.remote()).engine.running:
            if first.done():  # failed before it ran: its error is the test's
                await first
            await asyncio.sleep(0.02)
        second = await _transfer(p, d, "queued", prompt, sp=SP)
        return await first, second

    long_out, queued_out = asyncio.run(both())
    assert len(long_out) == 600 and len(queued_out) == 2
    ds = ray.get(d.stats.remote())
    assert ds.transfers.renewals >= 1 and ds.transfers.failures == 0
    assert ray.get(p.stats.remote()).engine.leases_expired == 0
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)


def test_a_seeded_request_gives_the_same_text_on_every_path(ray_nodes, tiny_model_dir):
    """One seeded, sampled request: prefill + NIXL pull + decode; prefilled on decode
    itself (local prefill and the decode-only fallback run this path); and continued
    after 4 tokens as a migration does (prompt + tokens so far re-prefilled, then
    pulled), by another attempt id: the same tokens each time."""
    p, d = _pair(tiny_model_dir, "seeded")
    prompt = list(range(3, 60))
    sp = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=77, ignore_eos=True)

    async def paths():
        pulled = await _transfer(p, d, "s-pulled", prompt, sp=sp)
        local = await _stream(
            d, "s-local", lambda c: d.generate_local.remote("s-local", c.id, prompt, sp, 30.0)
        )
        rest = await _transfer(p, d, "s-migrated", prompt, sp=sp, before=pulled[:4])
        local_rest = await _stream(
            d,
            "s-local-migrated",
            lambda c: d.generate_local.remote(
                "s-local-migrated", c.id, prompt, sp, 30.0, pulled[:4]
            ),
        )
        return pulled, local, pulled[:4] + rest, pulled[:4] + local_rest

    pulled, local, migrated, local_migrated = asyncio.run(paths())
    assert len(pulled) == 16 and len(set(pulled)) > 4  # sampled
    assert local == pulled and migrated == pulled and local_migrated == pulled
    assert _wait_empty(p, d) == dict.fromkeys(_tables(p, d), 0)
