"""KV blocks move from a prefill actor to a decode actor on another Ray node by NIXL READ.

Real Ray (three local nodes) and real NIXL; one cluster for the module because
Ray is slow to start on two cores.
"""

from __future__ import annotations

import sys
import time

import msgspec
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from transfer import (
    KVHandle,
    ReadLate,
    ReadStuck,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from transfer.nixl_backend import NixlTransferAgent, late_write_s

# Ray workers cannot import this test module by name; ship its actor classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Shaped like a KV pool: [blocks, layers, k/v, kv_heads, block_size, head_dim] (4 KiB blocks).
POOL_SHAPE = (32, 2, 2, 2, 16, 8)
TIMEOUT_S = 5.0


def block_data(block_ids: list[int]) -> torch.Tensor:
    """Distinct deterministic contents for the given prefill blocks."""
    per_block = torch.arange(1, 1 + torch.Size(POOL_SHAPE[1:]).numel(), dtype=torch.float32)
    rows = [per_block * 0.5 + 1000.0 * b for b in block_ids]
    return torch.stack(rows).view(len(block_ids), *POOL_SHAPE[1:])


@ray.remote(num_cpus=0, resources={"prefill_node": 0.01})
class Prefill:
    def __init__(self):
        torch.set_num_threads(1)
        self.pool = block_data(list(range(POOL_SHAPE[0])))
        self.agent = NixlTransferAgent("prefill-test", self.pool)

    def handle(self, request_id: str, block_ids: list[int]) -> KVHandle:
        return KVHandle(
            request_id=request_id,
            backend="nixl",
            num_tokens=len(block_ids) * 16,
            ranks=[self.agent.rank_kv(block_ids)],
        )

    def wait_notif(self, timeout_s: float) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if msgs := self.agent.poll_notifs():
                return msgs
            time.sleep(0.01)
        return []


@ray.remote(num_cpus=0, resources={"decode_node": 0.01})
class Decode:
    def __init__(self):
        torch.set_num_threads(1)
        self.pool = torch.full(POOL_SHAPE, -1.0)
        self.agent = NixlTransferAgent("decode-test", self.pool)

    def pull(self, handle: KVHandle, local_ids: list[int], timeout_s: float = TIMEOUT_S):
        """Returns (bytes moved, pulled blocks equal expected, untouched blocks intact, seconds)."""
        before = self.pool.clone()
        t0 = time.monotonic()
        n = self.agent.pull(
            handle.ranks[0], local_ids, timeout_s=timeout_s, notif=handle.request_id.encode()
        )
        elapsed = time.monotonic() - t0
        expected = block_data(handle.ranks[0].block_ids)
        untouched = [i for i in range(POOL_SHAPE[0]) if i not in local_ids]
        return (
            n,
            torch.equal(self.pool[local_ids], expected),
            torch.equal(self.pool[untouched], before[untouched]),
            elapsed,
        )

    def pull_error(self, handle: KVHandle, local_ids: list[int], timeout_s: float):
        """Returns (exception type name, message, seconds) of a pull expected to fail."""
        t0 = time.monotonic()
        try:
            self.agent.pull(handle.ranks[0], local_ids, timeout_s=timeout_s)
        except TransferError as e:
            return type(e).__name__, str(e), time.monotonic() - t0
        return None, "pull succeeded", time.monotonic() - t0


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1, resources={"prefill_node": 1})
    c.add_node(num_cpus=1, resources={"decode_node": 1})
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def actors(cluster):
    """(prefill, decode, doomed): doomed is a second prefill for the dead-peer test,
    started here so the three actors start in parallel."""
    prefill, decode, doomed = Prefill.remote(), Decode.remote(), Prefill.remote()
    ray.get([a.__ray_ready__.remote() for a in (prefill, decode, doomed)])
    return prefill, decode, doomed


def test_pull_moves_noncontiguous_blocks_and_notifies_prefill(actors):
    prefill, decode, _ = actors
    remote_ids, local_ids = [7, 3, 4, 20, 31], [0, 9, 10, 2, 30]
    handle = ray.get(prefill.handle.remote("req-1", remote_ids))
    assert handle.ranks[0].block_bytes == 4096 and handle.ranks[0].mem_type == "DRAM"

    moved, equal, untouched_ok, _ = ray.get(decode.pull.remote(handle, local_ids))

    assert moved == len(remote_ids) * 4096
    assert equal, "pulled blocks differ from the prefill blocks"
    assert untouched_ok, "a local block outside the pull changed"
    assert ray.get(prefill.wait_notif.remote(10.0)) == [b"req-1"]


def test_second_pull_reuses_the_connection(actors):
    prefill, decode, _ = actors
    handle = ray.get(prefill.handle.remote("req-2", [1, 2, 3]))
    moved, equal, untouched_ok, elapsed = ray.get(decode.pull.remote(handle, [5, 6, 7]))
    assert (moved, equal, untouched_ok) == (3 * 4096, True, True)
    assert elapsed < 1.0
    assert ray.get(prefill.wait_notif.remote(10.0)) == [b"req-2"]


def test_pull_from_dead_prefill_fails_within_timeout(actors):
    prefill, decode, doomed = actors
    handle = ray.get(doomed.handle.remote("req-dead", [0, 1]))
    ray.kill(doomed)
    time.sleep(0.5)  # let the process go

    kind, msg, elapsed = ray.get(decode.pull_error.remote(handle, [0, 1], 3.0))

    assert kind in ("TransferFailed", "TransferTimeout"), msg
    assert elapsed < 3.0 + 1.0
    # Decode's agent is unharmed: a pull from a live prefill still works.
    good = ray.get(prefill.handle.remote("req-after", [9]))
    assert ray.get(decode.pull.remote(good, [9]))[1]
    assert ray.get(prefill.wait_notif.remote(10.0)) == [b"req-after"]


def test_pull_with_garbage_metadata_fails(actors):
    prefill, decode, _ = actors
    good = ray.get(prefill.handle.remote("req-bad", [0]))
    # A name decode has not cached, so it must handshake with the garbage.
    rank = msgspec.structs.replace(
        good.ranks[0], agent_name="prefill-unknown", agent_metadata=b"not nixl metadata"
    )
    bad = msgspec.structs.replace(good, ranks=[rank])

    kind, msg, elapsed = ray.get(decode.pull_error.remote(bad, [0], 3.0))

    assert kind == TransferFailed.__name__, msg
    assert elapsed < 3.0


def test_peer_cache_is_bounded_and_evicted_peers_reconnect():
    # In one process (NIXL's TCP loopback path); no Ray needed.
    srcs = [NixlTransferAgent(f"src{i}", torch.full((4, 256), float(i))) for i in range(3)]
    dst = NixlTransferAgent("dst", torch.zeros(4, 256), max_peers=2)
    try:
        for i in [0, 1, 2, 0]:  # the 3rd peer evicts src0; pulling src0 again re-handshakes
            assert dst.pull(srcs[i].rank_kv([1]), [3], timeout_s=TIMEOUT_S) == 1024
            assert dst.num_peers() <= 2
            assert bool((dst._pool[3] == i).all()) and bool((dst._pool[:3] == 0).all())
    finally:
        for a in [dst, *srcs]:
            a.close()


def test_mismatched_block_counts_and_layouts_are_rejected_locally():
    pool = torch.zeros(4, 8)
    agent = NixlTransferAgent("local-test", pool)
    try:
        with pytest.raises(ValueError):
            agent.pull(agent.rank_kv([0, 1]), [2], timeout_s=1.0)
        with pytest.raises(ValueError):
            agent.rank_kv([4])
        # Blocks of our size but another layout (or none named: an older peer).
        for shape in ([2, 4], []):
            src = msgspec.structs.replace(agent.rank_kv([0]), block_shape=shape)
            with pytest.raises(TransferFailed, match="pdcluster version"):
                agent.pull(src, [2], timeout_s=1.0)
    finally:
        agent.close()
        agent.close()  # idempotent


def test_a_blocked_handshake_holds_up_only_pulls_from_its_own_peer():
    """A prefill host that drops packets (here: its handshake blocks until released)
    must not hold up pulls from other peers: handshakes run outside the lock pulls
    share. A second pull from the blocked peer ends at its own deadline, and the pull
    whose handshake returns past its deadline starts no READ."""
    import threading

    srcs = [NixlTransferAgent(f"src{i}", torch.full((4, 256), float(i + 1))) for i in range(2)]
    dst = NixlTransferAgent("dst", torch.zeros(4, 256))
    blocked, entered = threading.Event(), threading.Event()
    handshake = dst._agent.add_remote_agent

    def add_remote_agent(metadata):
        if metadata == srcs[0]._metadata:
            entered.set()
            blocked.wait(30)
        return handshake(metadata)

    dst._agent.add_remote_agent = add_remote_agent
    outcome: dict[str, object] = {}

    def pull(key, i, local, timeout_s):
        t0 = time.monotonic()
        try:
            outcome[key] = dst.pull(srcs[i].rank_kv([1]), [local], timeout_s=timeout_s)
        except TransferError as e:
            outcome[key] = e
        outcome[key + "_s"] = time.monotonic() - t0

    try:
        first = threading.Thread(target=pull, args=("a", 0, 0, 0.3), daemon=True)
        first.start()
        assert entered.wait(5)
        other = threading.Thread(target=pull, args=("b", 1, 1, 5.0), daemon=True)
        other.start()
        other.join(2.0)
        assert outcome.get("b") == 1024, outcome  # the other peer's pull went on
        assert bool((dst._pool[1] == 2.0).all())
        again = threading.Thread(target=pull, args=("a2", 0, 2, 0.5), daemon=True)
        again.start()
        again.join(3.0)
        assert isinstance(outcome.get("a2"), TransferTimeout), outcome
        assert outcome["a2_s"] < 1.5
        blocked.set()  # the handshake returns, after the first pull's deadline
        first.join(10)
        assert isinstance(outcome.get("a"), TransferTimeout), outcome
        assert bool((dst._pool[0] == 0).all()) and bool((dst._pool[2] == 0).all())
        # The peer is usable afterwards.
        assert dst.pull(srcs[0].rank_kv([2]), [3], timeout_s=TIMEOUT_S) == 1024
    finally:
        blocked.set()
        for a in [dst, *srcs]:
            a.close()


def test_a_read_nixl_will_not_release_is_reported_stuck_until_it_lets_go():
    """A READ that never finishes and whose release NIXL refuses, before and after the
    peer is torn down, raises ReadStuck (its blocks must not be reused), and
    `release_stuck` returns its tag only once NIXL lets it go, and not before its data
    could no longer land (`late_write_s`, short here)."""
    src = NixlTransferAgent("src", torch.full((4, 256), 5.0))
    dst = NixlTransferAgent("dst", torch.zeros(4, 256))
    dst.late_write_s = 0.5
    refuse = [True]

    class Refusing:  # the binding, whose release of a transfer request fails on cue
        def __init__(self, binding):
            self._binding = binding

        def releaseXferReq(self, handle):
            if refuse[0]:
                raise RuntimeError("NIXL_ERR_REPOST_ACTIVE")
            return self._binding.releaseXferReq(handle)

        def __getattr__(self, name):
            return getattr(self._binding, name)

    make = dst._agent.make_prepped_xfer

    def make_prepped_xfer(*args, **kw):
        xfer = make(*args, **kw)
        xfer._agent = Refusing(xfer._agent)
        return xfer

    try:
        assert dst.pull(src.rank_kv([0]), [0], timeout_s=TIMEOUT_S) == 1024  # handshaken
        dst._agent.make_prepped_xfer = make_prepped_xfer
        transfer = dst._agent.transfer
        dst._agent.transfer = lambda xfer, *a: transfer(xfer, *a) and "PROC"  # never finishes
        dst._agent.check_xfer_state = lambda xfer: "PROC"
        with pytest.raises(ReadStuck):
            dst.pull(src.rank_kv([1]), [1], timeout_s=0.2, tag="r1")
        time.sleep(0.5)
        assert dst.stuck_reads == 1 and dst.release_stuck() == []  # NIXL still refuses
        refuse[0] = False
        assert dst.release_stuck() == ["r1"] and dst.stuck_reads == 0
    finally:
        refuse[0] = False
        for a in [dst, src]:
            a.close()


def test_a_read_given_up_in_flight_holds_its_blocks_until_no_write_can_land():
    """A READ still in flight at its deadline is released, but raises ReadLate (a
    TransferTimeout): `release_stuck` hands its tag back only `late_write_s` after it was
    posted, by when a reply retransmitted after a partition can no longer land
    (tests/integration/test_network_deadlines.py: blocks written anew after the hand-back
    keep what was written)."""
    src = NixlTransferAgent("src", torch.full((4, 256), 5.0))
    dst = NixlTransferAgent("dst", torch.zeros(4, 256))
    assert dst.late_write_s == late_write_s() > 0  # from UCX's settings (unit/transfer)
    dst.late_write_s = 2.0
    try:
        assert dst.pull(src.rank_kv([0]), [0], timeout_s=TIMEOUT_S) == 1024  # handshaken
        transfer = dst._agent.transfer
        dst._agent.transfer = lambda xfer, *a: transfer(xfer, *a) and "PROC"  # never finishes
        dst._agent.check_xfer_state = lambda xfer: "PROC"
        start = time.monotonic()
        with pytest.raises(ReadLate):
            dst.pull(src.rank_kv([1]), [1], timeout_s=0.2, tag="r2")
        assert dst.stuck_reads == 1 and dst.release_stuck() == []
        while not (released := dst.release_stuck()):
            time.sleep(0.02)
        assert released == ["r2"] and dst.stuck_reads == 0
        assert time.monotonic() - start >= 2.0
    finally:
        for a in [dst, src]:
            a.close()


def test_a_slow_disconnect_does_not_undo_a_new_connection_to_the_same_peer():
    """A failed pull's teardown disconnects its peer after the agent's lock is released
    (here slowly). A pull from the same peer meanwhile waits for that disconnect, then
    connects anew: the old disconnect must not remove the new connection (before the
    review's fix, every later pull from that peer failed with NIXL_ERR_NOT_FOUND)."""
    import threading

    src = NixlTransferAgent("src", torch.full((4, 256), 5.0))
    dst = NixlTransferAgent("dst", torch.zeros(4, 256))
    agent = dst._agent
    remove, transfer = agent.remove_remote_agent, agent.transfer

    def slow_remove(name):
        time.sleep(0.3)
        return remove(name)

    def failing_transfer(*_):
        raise RuntimeError("NIXL_ERR_BACKEND (injected)")

    try:
        assert dst.pull(src.rank_kv([0]), [0], timeout_s=TIMEOUT_S) == 1024
        agent.remove_remote_agent = slow_remove
        agent.transfer = failing_transfer
        failed = threading.Thread(
            target=lambda: pytest.raises(
                TransferFailed, dst.pull, src.rank_kv([1]), [1], timeout_s=TIMEOUT_S
            )
        )
        failed.start()
        time.sleep(0.1)  # its teardown is in flight
        agent.transfer = transfer
        assert dst.pull(src.rank_kv([2]), [2], timeout_s=TIMEOUT_S) == 1024
        failed.join(5)
        for local in (3, 1):
            assert dst.pull(src.rank_kv([local]), [local], timeout_s=TIMEOUT_S) == 1024
        assert bool((dst._pool == 5.0).all())
    finally:
        for a in [dst, src]:
            a.close()
