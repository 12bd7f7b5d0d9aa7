"""The lease registry: epochs, claims, expiry, and a hard bound."""

from __future__ import annotations

import tracemalloc

import pytest

from transfer import LeaseExpired, LeaseRegistry, TransferBackpressure


def test_claim_then_release_frees_once():
    reg = LeaseRegistry(max_leases=4, ttl_s=30, claim_s=5)
    lease = reg.register("r1", [3, 4])
    assert reg.claim("r1", lease.epoch) == [3, 4]
    assert reg.release("r1", lease.epoch) == [3, 4]
    assert reg.release("r1", lease.epoch) is None  # second release frees nothing
    assert len(reg) == 0


def test_expiry_frees_and_late_claim_is_typed_error():
    reg = LeaseRegistry(max_leases=4, ttl_s=1.0, claim_s=5)
    lease = reg.register("r1", [7])
    t = lease.expires
    assert [x.blocks for x in reg.sweep(now=t + 0.01)] == [[7]]
    assert reg.expired_total == 1
    with pytest.raises(LeaseExpired):
        reg.claim("r1", lease.epoch, now=t + 0.02)


def test_claim_of_expired_but_unswept_lease_fails():
    reg = LeaseRegistry(max_leases=4, ttl_s=1.0, claim_s=5)
    lease = reg.register("r1", [7])
    with pytest.raises(LeaseExpired, match="expired"):
        reg.claim("r1", lease.epoch, now=lease.expires + 0.001)


def test_reused_id_with_old_epoch_cannot_claim_new_blocks():
    """The vLLM #21570 race: a stale handle must never read a newer request's blocks."""
    reg = LeaseRegistry(max_leases=4, ttl_s=30, claim_s=5)
    old = reg.register("r1", [1])
    reg.release("r1", old.epoch)
    new = reg.register("r1", [1])  # same id, same block reused
    assert new.epoch != old.epoch
    with pytest.raises(LeaseExpired):
        reg.claim("r1", old.epoch)
    assert reg.release("r1", old.epoch) is None  # a stale release does not free the new one
    assert reg.claim("r1", new.epoch) == [1]


def test_claim_holds_lease_for_the_read_and_only_once():
    reg = LeaseRegistry(max_leases=4, ttl_s=1.0, claim_s=10)
    lease = reg.register("r1", [2])
    ttl_end = lease.expires
    reg.claim("r1", lease.epoch, now=ttl_end - 0.5)
    assert reg.sweep(now=ttl_end + 1) == []  # past the TTL, but the read may be in flight
    with pytest.raises(LeaseExpired, match="already claimed"):
        reg.claim("r1", lease.epoch, now=ttl_end - 0.4)
    assert len(reg.sweep(now=ttl_end + 10)) == 1  # the claim window is bounded too


def test_renewal_keeps_a_waited_for_lease_and_only_while_it_is_renewed():
    reg = LeaseRegistry(max_leases=4, ttl_s=1.0, claim_s=5)
    lease = reg.register("r1", [5])
    t = lease.expires - 1.0  # registration time
    assert reg.renew("r1", lease.epoch, now=t + 0.6) == pytest.approx(1.0)
    assert reg.sweep(now=t + 1.5) == []  # past the first TTL: renewed at 0.6
    assert reg.renew("r1", lease.epoch, now=t + 1.5) == pytest.approx(1.0)
    assert reg.claim("r1", lease.epoch, now=t + 2.4) == [5]
    with pytest.raises(LeaseExpired, match="already claimed"):
        reg.renew("r1", lease.epoch, now=t + 2.5)  # a claimed lease is the read's now
    # Not renewed any more (its decode side died): it expires one TTL after the last.
    other = reg.register("r2", [6])
    u = other.expires - 1.0
    reg.renew("r2", other.epoch, now=u + 0.5)
    assert [x.request_id for x in reg.sweep(now=u + 1.6)] == ["r2"]
    with pytest.raises(LeaseExpired):
        reg.renew("r2", other.epoch, now=u + 1.7)
    stale = reg.register("r2", [6])
    with pytest.raises(LeaseExpired):
        reg.renew("r2", other.epoch, now=stale.expires - 0.5)  # an old epoch renews nothing


def test_10000_unclaimed_leases_stay_bounded_and_memory_flat():
    reg = LeaseRegistry(max_leases=64, ttl_s=0.0, claim_s=1)
    refused = 0
    tracemalloc.start()
    base = None
    for i in range(10_000):
        try:
            reg.register(f"req-{i}", [i % 512, (i + 1) % 512], ttl_s=0.0 if i % 2 else 60.0)
        except TransferBackpressure:
            refused += 1
        assert len(reg) <= 64
        if i % 100 == 99:
            reg.sweep(now=float("inf") if i % 1000 == 999 else None)
        if i == 1_000:
            base = tracemalloc.get_traced_memory()[0]
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    reg.sweep(now=float("inf"))
    assert len(reg) == 0 and reg.pinned_blocks == 0
    assert refused > 0  # the bound was hit and refused, not exceeded
    assert grown < 64 * 1024, f"registry memory grew by {grown} bytes over 9,000 leases"
