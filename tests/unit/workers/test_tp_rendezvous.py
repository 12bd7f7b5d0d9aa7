"""A follower that asked a leader which then ended (the group restarts as a unit, and the
follower came back first) asks again and forms the group with the restarted leader, well
inside the leader's wait for it (30 s). Before, it waited out the gone store for 60 s,
the new leader gave up first, and the two kept restarting out of step (seen once in
tests/e2e/test_tensor_parallel_cluster.py: four leader restarts in two minutes).

Real TPGroups (TCPStore and gloo): the leader in a process of its own, the follower here;
the leader's actor is a stand-in that answers the old address once, then the new one. A
follower given the address of a leader whose group is already formed (that leader ends at
its next collective) is refused at once instead of waiting out a peer that never comes."""

from __future__ import annotations

import multiprocessing
import socket
import time

import pytest
import torch

from workers import rank_worker
from workers.tp import TPGroup

pytestmark = pytest.mark.unit


def _lead(out) -> None:
    group = TPGroup(0, 2, torch.device("cpu"))
    out.put(group.open("127.0.0.1"))
    try:
        group.join(group.address)
        out.put(group.gather("leader"))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(repr(e))


class _Call:
    def __init__(self, answers: list):
        self.answers = answers

    def remote(self):
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class _Leader:
    def __init__(self, answers: list):
        self.tp_address = _Call(answers)


def test_a_follower_given_a_gone_leaders_address_asks_again(monkeypatch):
    monkeypatch.setattr(rank_worker.ray, "get", lambda ref, timeout: ref)
    with socket.socket() as s:  # a port nobody listens on: the ended leader's store
        s.bind(("127.0.0.1", 0))
        gone = ("127.0.0.1", s.getsockname()[1], "old-generation")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    lead = ctx.Process(target=_lead, args=(out,), daemon=True)
    lead.start()
    try:
        address = tuple(out.get(timeout=60))
        t0 = time.monotonic()
        follower = TPGroup(1, 2, torch.device("cpu"))
        assert rank_worker.leader_store(_Leader([gone, address]), follower) == address
        follower.join(address)
        assert follower.gather("follower") == ["leader", "follower"]
        assert out.get(timeout=30) == ["leader", "follower"]
        took = time.monotonic() - t0
        print(f"group formed {took:.1f} s after the stale answer")
        assert took < 25.0, took  # the leader waits 30 s for its followers
        # A follower restarted while this leader still lives (it ends at its next
        # collective) is told at once that the group is formed, and asks again.
        late = TPGroup(1, 2, torch.device("cpu"))
        t1 = time.monotonic()
        with pytest.raises(RuntimeError, match="formed already"):
            late.connect(address)
        assert time.monotonic() - t1 < 2.0
    finally:
        lead.kill()
