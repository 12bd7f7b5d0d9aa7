"""Every wait of a KV pull that crosses the network ends by its deadline across a real
network boundary, and a peer that drops packets holds up no other peer's traffic.

Three NIXL agents, each a process in its own network namespace of the testbed
(chaos/testbed.py), UCX held to TCP on the namespace's `eth0` as on the Ray testbed:
decode pulls from prefill `a` and prefill `b`. Packets to and from `a` are dropped
silently (nothing refuses, nothing answers: `Testbed.drop`), during the first handshake
with it, then on a connection already made, then one way only. Each pull from `a` must end
with TransferTimeout or TransferFailed by its deadline (plus a little slack), while a
pull from `b` started at the same moment completes with `b`'s bytes before `a`'s ends,
and `a`'s own agent still answers at once; after each heal a pull from `a` brings its
bytes again. A READ given up in flight keeps its blocks until its data can no longer
land (`late_write_s`): once the agent hands them back, blocks written anew keep what was
written, though the cut healed while the READ's reply was still being retransmitted.
The Ray calls around a pull (claim, renewal, release; the router's) are bounded by
`asyncio.wait_for` in workers/pull.py and the router; tests/chaos/test_network.py cuts
them on a Ray testbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chaos import testbed
from chaos.testbed import Host, Testbed
from tests.integration.nixl_peer import HALF
from tests.support import needs_netns
from transfer.nixl_backend import UCX_DEFAULTS
from transfer.nixl_backend import late_write_s as backend_late_write_s

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0  # each pull's deadline
SLACK_S = 0.5  # what a deadline may overrun: a poll's last sleep, a thread's turn on 2 cores
FAILED = ("ReadLate", "TransferTimeout", "TransferFailed")
# UCX's TCP settings here (an operator's, which the backend follows): a connect gives up
# after 1 + 2 s, a connection after 1 s unacknowledged, so a READ given up in flight holds
# its blocks 3 + 2 x 1 + 2 s (late_write_s), not the 7 + 2 x 8 + 2 s of the backend's own.
USER_TIMEOUT_S = 1.0
UCX_HERE = {"UCX_TCP_USER_TIMEOUT": f"{USER_TIMEOUT_S:g}s", "UCX_TCP_SYN_CNT": "1"}


class Peer:
    """A tests/integration/nixl_peer.py process in `host`'s namespace."""

    def __init__(self, tb: Testbed, host: Host, seed: int):
        # UCX's settings are the backend's own (UCX_DEFAULTS), not any this process has.
        env = {k: v for k, v in os.environ.items() if k not in UCX_DEFAULTS}
        env |= {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "eth0", "PYTHONPATH": str(ROOT)}
        env |= UCX_HERE
        argv = [sys.executable, "-m", "tests.integration.nixl_peer", host.node, str(seed)]
        self.proc = tb.run(
            host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self._replies: dict[int, dict] = {}
        self._arrived = threading.Condition()
        self._next = 0

    def ready(self) -> Peer:
        """Its blocks' RankKV and digest, once its agent is up."""
        first = json.loads(self.proc.stdout.readline())
        self.kv, self.digest = first["kv"], first["digest"]
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self._arrived:
                self._replies[reply["id"]] = reply
                self._arrived.notify_all()

    def send(self, op: str, **args) -> int:
        self._next += 1
        self.proc.stdin.write(json.dumps({"op": op, "id": self._next, **args}) + "\n")
        self.proc.stdin.flush()
        return self._next

    def reply(self, call: int, timeout: float = 30.0) -> dict:
        with self._arrived:
            assert self._arrived.wait_for(lambda: call in self._replies, timeout), call
            return self._replies.pop(call)

    def pull(self, src: Peer, at: int, timeout: float = TIMEOUT_S) -> int:
        return self.send("pull", kv=src.kv, at=at, timeout=timeout)


def cut_off(tb: Testbed, host: Host, others: list[Host], on: bool, both: bool = True) -> None:
    for other in others:
        tb.drop(host, other, on)
        if both:
            tb.drop(other, host, on)


@needs_netns
def test_every_pull_ends_by_its_deadline_and_an_unreachable_peer_holds_up_no_other(
    state_dir, monkeypatch
):
    tb = Testbed("nd", ["decode", "a", "b"], "10.231.10.0/29")
    try:
        hd, ha, hb = tb.up()
        decode, a, b = [p.ready() for p in [Peer(tb, h, seed) for seed, h in enumerate(tb.hosts)]]
        for key, value in UCX_HERE.items():
            monkeypatch.setenv(key, value)
        late_write_s = backend_late_write_s()  # as the peers reckon it
        assert len({decode.digest, a.digest, b.digest}) == 3

        def cut_pull(what: str) -> None:
            """A pull from `a` (cut off) and one from `b`, started together."""
            from_a, from_b = decode.pull(a, 0), decode.pull(b, HALF)
            prefill_side = a.reply(a.send("notifs"))
            rb, ra = decode.reply(from_b), decode.reply(from_a)
            assert ra["ok"] is False and ra["error"] in FAILED, (what, ra)
            assert ra["elapsed"] <= TIMEOUT_S + SLACK_S, (what, ra)
            assert rb["ok"] and rb["digest"] == b.digest, (what, rb)
            assert rb["elapsed"] < ra["elapsed"], (what, rb, ra)  # not queued behind `a`
            assert prefill_side["elapsed"] < SLACK_S, (what, prefill_side)

        def healed_pull(what: str) -> None:
            r = decode.reply(decode.pull(a, 0))
            assert r["ok"] and r["digest"] == a.digest, (what, r)

        # 1. The first handshake with `a` happens while it is cut off.
        cut_off(tb, hd, [ha], True)
        cut_pull("handshake")
        cut_off(tb, hd, [ha], False)
        healed_pull("after the handshake's cut")

        # 2. A connection already made, then cut both ways.
        cut_off(tb, hd, [ha], True)
        cut_pull("connected")
        cut_off(tb, hd, [ha], False)
        healed_pull("after the cut")

        # 3. One way: decode's requests reach `a`, nothing `a` sends comes back.
        cut_off(tb, ha, [hd], True, both=False)
        cut_pull("one way")
        cut_off(tb, ha, [hd], False, both=False)
        healed_pull("after the one-way loss")

        # 4. A READ given up in flight, its reply to come once the cut heals: its blocks
        # come back only once nothing can land in them; written anew, they keep it.
        cut_off(tb, ha, [hd], True, both=False)
        start = time.monotonic()
        r = decode.reply(decode.pull(a, 0, timeout=USER_TIMEOUT_S / 2))  # before TCP gives up
        assert r["error"] == "ReadLate", r
        cut_off(tb, ha, [hd], False, both=False)  # what `a` retransmits gets through now
        released = decode.reply(decode.send("release"))["released"]
        while str(r["id"]) not in released:
            assert time.monotonic() - start < late_write_s + 5, released
            time.sleep(0.1)
            released = decode.reply(decode.send("release"))["released"]
        assert time.monotonic() - start >= late_write_s - SLACK_S
        zeros = decode.reply(decode.send("fill", at=0, value=0.0))["digest"]
        time.sleep(2.0)
        assert decode.reply(decode.send("digest", at=0))["digest"] == zeros
        healed_pull("after the late reply")

        # Every READ given up on was let go, and `a` heard of the four that completed.
        deadline = time.monotonic() + late_write_s + 5
        while (st := decode.reply(decode.send("release")))["stuck"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while (n := a.reply(a.send("notifs"))["n"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert n == 4
    finally:
        tb.down()
    assert not [n for n in testbed.leftovers() if n.startswith(tb.prefix)]
