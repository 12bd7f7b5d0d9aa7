"""The sending side (prefill): leases own their blocks, free them exactly once,
and the table has one bound. Fault delays never wait past a deadline."""

from __future__ import annotations

import time

import pytest
import torch

from transfer import FaultConfig, FaultInjector, LeaseExpired, TransferBackpressure
from transfer.backend import RayObjectBackend
from transfer.handle import TransferTimeout
from transfer.sender import KVSender


class Pool:
    """Blocks handed out and freed, with double frees refused."""

    def __init__(self):
        self.used: set[int] = set()
        self.freed: list[int] = []

    def take(self, ids: list[int]) -> list[int]:
        assert not self.used & set(ids)
        self.used |= set(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        assert set(ids) <= self.used, f"double free of {ids}"
        self.used -= set(ids)
        self.freed += ids


def sender(pool: Pool, **kw) -> KVSender:
    backend = RayObjectBackend("t", torch.zeros(8, 4))
    backend.rank_kv = lambda ids: None  # no Ray here: the handle's shard is not under test
    args = dict(max_pending=2, lease_ttl_s=30.0, claim_s=5.0)
    return KVSender(backend, pool.free, **(args | kw))


def test_every_exit_frees_each_block_once():
    pool = Pool()
    s = sender(pool)
    h = s.register("a", pool.take([0, 1]), num_tokens=20)
    assert s.claim("a", h.epoch) == [0, 1] and s.pinned_blocks == 2
    assert s.release("a", h.epoch) and not s.release("a", h.epoch)
    h = s.register("b", pool.take([2]), num_tokens=3)
    assert not s.release("b", h.epoch + 1)  # another epoch's release touches nothing
    s.register("b", pool.take([3]), num_tokens=3)  # same id again: the older lease goes first
    assert pool.freed == [0, 1, 2] and len(s) == 1
    s.release_all()
    assert not pool.used and len(s) == 0


def test_the_bound_refuses_and_frees_what_it_was_given():
    pool = Pool()
    s = sender(pool)
    s.register("a", pool.take([0]), 1)
    s.register("b", pool.take([1]), 1)
    with pytest.raises(TransferBackpressure):
        s.register("c", pool.take([2]), 1)
    assert 2 not in pool.used and len(s) == 2


def test_expired_leases_are_swept_and_their_handles_fail_typed():
    pool = Pool()
    s = sender(pool, lease_ttl_s=0.05)
    h = s.register("a", pool.take([4, 5]), 20)
    assert 0 < h.ttl_s <= 0.05
    time.sleep(0.1)
    s.tick()
    assert not pool.used and s.expired_total == 1
    with pytest.raises(LeaseExpired):
        s.claim("a", h.epoch)


def test_fault_delays_never_sleep_past_the_deadline():
    """A pull that has no time left (or less than the injected delay) times out,
    typed, instead of sleeping a negative or a too-long time."""
    stall = FaultInjector(FaultConfig(stall_rate=1.0))
    delay = FaultInjector(FaultConfig(delay_rate=1.0, delay_s=5.0))
    for inj in (stall, delay):
        t = time.monotonic()
        with pytest.raises(TransferTimeout):
            inj.before_pull(-0.5)
        with pytest.raises(TransferTimeout):
            inj.before_pull(0.05)
        assert time.monotonic() - t < 0.5
