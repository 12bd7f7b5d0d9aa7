"""Tensor-parallel rank groups: rendezvous and lockstep.

A worker group is `tensor_parallel_size` processes (Ray actors in one STRICT_PACK
placement group). Rank 0, the leader, runs the engine: it schedules, samples and
talks to the router. Before each forward it broadcasts the step's `StepPlan`;
every other rank (a follower) runs the same forward on its shard of the weights
and of the KV cache, and the collectives inside the model (all-reduce after
row-parallel linears, all-gather of the vocab-parallel logits) keep them in step.

Failure semantics: the group lives and dies as a unit. Any collective error or
timeout ends the process that sees it (`os._exit`), Ray restarts it
(`max_restarts`), and the restarted ranks rendezvous again with a fresh
generation; a rank whose peers vanished finds out at its next collective (the
leader broadcasts a keep-alive when idle), so a lost rank takes the others down
within `KEEPALIVE_S` plus gloo's connection teardown.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid
from typing import NoReturn

import msgspec
import torch
import torch.distributed as dist

log = logging.getLogger("pdcluster.tp")

KEEPALIVE_S = 2.0  # leader sends an empty plan when idle this long
COLLECTIVE_TIMEOUT_S = 30.0  # a collective that waits longer ends the process
RENDEZVOUS_TIMEOUT_S = 60.0  # one attempt to form the group
STORE_CONNECT_S = 3.0  # a follower reaching the leader's store (gone: a stale address)


class StepPlan(msgspec.Struct, array_like=True):
    """One forward, as plain lists: per sequence the step's new token ids, the
    number of tokens already cached before them, and the block table prefix; `every`:
    the sequences whose logits are wanted at every new position (prompt logprobs),
    not only at the last; `copies`: KV blocks every rank copies before the forward (a
    forked sequence's own copy of its parent's block)."""

    tokens: list[list[int]]
    starts: list[int]
    tables: list[list[int]]
    every: list[int] = []
    copies: list[tuple[int, int]] = []  # KV blocks (source, destination) copied first


_enc, _dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(StepPlan | None)


def exit_for_restart(what: str, e: BaseException) -> NoReturn:
    """End this worker process so that Ray restarts it (`max_restarts`): for a
    failure that leaves the process unable to serve (a broken TP group, a model
    thread that could not start), where an exception would only kill a thread."""
    log.critical("%s failed (%r): ending this process so that Ray restarts it", what, e, exc_info=e)
    logging.shutdown()
    os._exit(1)


def _formed(address: tuple[str, int, str]) -> str:
    return f"pdcluster/{address[2]}/formed"


class TPGroup:
    """This process's place in its group's torch.distributed world."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size = rank, size
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._store: dist.TCPStore | None = None
        self._plans = None  # the process group plans travel on (gloo, CPU tensors)
        self._last_send = time.monotonic()

    # ---- rendezvous ---------------------------------------------------------

    def open(self, host: str) -> tuple[str, int, str]:
        """Leader: start the group's store on `host` (this node's address);
        returns (host, port, generation) for the followers. The store listens on
        `host` only: given a host, TCPStore itself would still listen on every
        interface, so it gets a socket bound here."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, 0))
        sock.listen()
        self._store = dist.TCPStore(
            host,
            sock.getsockname()[1],
            None,
            True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
            master_listen_fd=sock.detach(),
        )
        self.address = (host, self._store.port, uuid.uuid4().hex)
        return self.address

    def connect(self, address: tuple[str, int, str]) -> None:
        """Follower: reach the leader's store at `address` within STORE_CONNECT_S. It
        fails when that store is gone: the address came from a leader that has ended
        since (a group restarting as a unit), and the follower asks again."""
        host, port, _ = address
        self._store = dist.TCPStore(
            host, port, None, False, timeout=datetime.timedelta(seconds=STORE_CONNECT_S)
        )
        self._store.set_timeout(datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
        if self._store.check([_formed(address)]):
            # That leader formed its group already, with the process this one replaces:
            # it is about to end (its next collective fails), and joining it would wait
            # out a peer that never answers.
            self._store = None
            raise RuntimeError(f"the group at {host}:{port} was formed already")

    def join(self, address: tuple[str, int, str]) -> None:
        """Form the group (every rank calls this; blocks until all have). A follower
        has connected to the leader's store first (`connect`)."""
        host, port, gen = address
        store = self._store or dist.TCPStore(
            host, port, None, False, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
        )
        dist.init_process_group(
            self.backend,
            store=dist.PrefixStore(gen, store),
            rank=self.rank,
            world_size=self.size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        self._plans = dist.new_group(backend="gloo") if self.backend != "gloo" else None
        if self.rank == 0:  # a follower that finds this has a stale address (`connect`)
            store.set(_formed(address), "1")
        log.info(
            "tensor-parallel rank %d/%d joined %s:%d (%s)",
            self.rank,
            self.size,
            host,
            port,
            self.backend,
        )

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank (used once, at start)."""
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj, group=self._plans)
        return out

    # ---- lockstep -----------------------------------------------------------

    def _bcast(self, payload: bytes | None) -> bytes:
        n = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long)
        dist.broadcast(n, 0, group=self._plans)
        buf = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            if payload is not None
            else torch.empty(int(n), dtype=torch.uint8)
        )
        if int(n):
            dist.broadcast(buf, 0, group=self._plans)
        return buf.numpy().tobytes()

    def send(self, plan: StepPlan | None) -> None:
        """Leader: announce the next forward (None: keep-alive)."""
        try:
            self._bcast(_enc.encode(plan))
        except Exception as e:  # noqa: BLE001 - a broken group cannot be repaired in place
            exit_for_restart("tensor-parallel plan broadcast", e)
        self._last_send = time.monotonic()

    def keepalive(self) -> None:
        if time.monotonic() - self._last_send > KEEPALIVE_S:
            self.send(None)

    def recv(self) -> StepPlan | None:
        """Follower: the next plan, or None for a keep-alive."""
        try:
            payload = self._bcast(None)
        except Exception as e:  # noqa: BLE001
            exit_for_restart("tensor-parallel plan receive", e)
        return _dec.decode(payload)

    def failed(self, e: BaseException) -> NoReturn:
        exit_for_restart("tensor-parallel forward", e)
