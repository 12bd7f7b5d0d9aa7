"""NIXL backend: decode pulls a request's KV blocks from prefill with one NIXL READ.

Each worker rank process owns one `NixlTransferAgent` over its block-major KV
pool, registered once. Prefill describes blocks with `rank_kv`; decode calls
`pull`, which handshakes with the prefill agent on first use (its metadata rides
in the handle), READs the blocks, and has NIXL notify prefill on completion.
Every wait is bounded by a deadline, and the peer cache is bounded (LESSONS 4-5).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import nixl._api as nixl_api
import numpy as np
import torch
from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

from transfer.backend import TransferBackend
from transfer.handle import (
    RankKV,
    ReadLate,
    ReadStuck,
    TransferError,
    TransferFailed,
    TransferTimeout,
    check_blocks_match,
)

log = logging.getLogger(__name__)

# NIXL's progress thread wakes on UCX events and at least every this many µs.
PROGRESS_DELAY_US = 10_000

# Poll sleeps on the hot path: start tiny (a small READ is done in µs), double up to a cap.
_FIRST_SLEEP_S = 20e-6
_MAX_SLEEP_S = 2e-3

_ctor_lock = threading.Lock()

# UCX's TCP transport, made safe to lose packets on (the testbed found both; each has a
# test in tests/integration/test_network_deadlines.py). An operator's own setting wins.
# - It connects to a new peer with a blocking connect() by default, inside NIXL's
#   handshake (`add_remote_agent`), under the agent's own mutex and UCX worker's lock: a
#   peer whose packets are dropped then held every pull of this process, from every
#   peer, for the kernel's SYN retries (about 2 min). Non-blocking, the handshake returns
#   at once and the READ ends by its deadline like any other.
# - A READ given up at its deadline is not over: once a partition heals, TCP delivers the
#   peer's reply, and UCX writes it into the blocks, which by then hold another request's
#   KV. The kernel gives up on a connect after TCP_SYN_CNT retries and closes a
#   connection whose data goes unacknowledged for TCP_USER_TIMEOUT_S, so no write comes
#   later than the connect's bound plus twice that after the READ was posted (the
#   request's retransmissions, then the reply's): `late_write_s` holds the blocks so long.
#   (A peer process that is paused, not cut off, acknowledges and answers when it
#   resumes: docs/architecture.md, Transfer layer.)
TCP_USER_TIMEOUT_S = 8.0
TCP_SYN_CNT = 2  # SYN retransmits: a connect gives up 1 + 2 + 4 = 7 s after it began
UCX_DEFAULTS = {
    "UCX_TCP_CONN_NB": "y",
    "UCX_TCP_USER_TIMEOUT": f"{TCP_USER_TIMEOUT_S:g}s",
    "UCX_TCP_SYN_CNT": str(TCP_SYN_CNT),
}
# How long the kernel retransmits unacknowledged data when no user timeout is set
# (tcp_retries2 = 15: about 924.6 s).
_KERNEL_RETRANSMIT_S = 925.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _ucx(key: str) -> str:
    return os.environ.get(key, UCX_DEFAULTS[key]).strip().lower()


def late_write_s() -> float:
    """How long after a READ was posted its data may still land in the local blocks,
    from UCX's TCP settings as this process has them: the connect's bound (SYN retries),
    then the request's retransmissions and the reply's (the user timeout each), + 2 s."""
    user, syn = _ucx("UCX_TCP_USER_TIMEOUT"), _ucx("UCX_TCP_SYN_CNT")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?", user)
    each = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else 0.0
    if not 0 < each < _KERNEL_RETRANSMIT_S:
        if user not in ("inf", "auto"):
            log.warning("UCX_TCP_USER_TIMEOUT=%r not understood: assuming none", user)
        each = _KERNEL_RETRANSMIT_S
    if not syn.isdigit():  # "auto": the kernel's own count
        try:
            syn = Path("/proc/sys/net/ipv4/tcp_syn_retries").read_text().strip()
        except OSError:
            syn = "6"
    connect = 2 ** (int(syn) + 1) - 1 if syn.isdigit() else 127  # UCX refuses 0
    return connect + 2 * each + 2.0


def _new_agent(name: str) -> nixl_agent:
    """A UCX nixl_agent whose progress thread polls every PROGRESS_DELAY_US.

    The target of a READ must make progress for the READ to complete (UCX
    wireup and completions ride on active messages, e.g. over TCP), so every
    agent needs a progress thread. nixl 1.5.1's Python wrapper hard-codes the
    thread's delay to 0, which busy-polls a whole core per process; we set the
    delay on the binding's config while the wrapper builds the agent.
    """
    conf = nixl_agent_config(
        enable_prog_thread=True,
        backends=["UCX"],
        # Pulls (transfer thread) and notification polling (engine thread) may
        # call the agent from different threads.
        sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
    )
    binding_agent = nixl_api.nixlBind.nixlAgent

    def with_delay(agent_name, agent_config):
        agent_config.pthrDelay = PROGRESS_DELAY_US
        return binding_agent(agent_name, agent_config)

    with _ctor_lock:
        nixl_api.nixlBind.nixlAgent = with_delay
        try:
            return nixl_agent(name, conf)
        finally:
            nixl_api.nixlBind.nixlAgent = binding_agent


class _Peer:
    """A remote agent: handshaken once (outside the agent's lock), then its prepared
    block dlist is reused by every pull from it. Torn down in two parts, each once:
    the agent is forgotten (disconnected) when no pull uses it (or at once, to make
    UCX fail a READ that will not end), its dlist released only when no pull uses it."""

    __slots__ = (
        "name",
        "layout",
        "dlist",
        "users",
        "gone",
        "forgotten",
        "retired",
        "ready",
        "error",
    )

    def __init__(self, name: str, layout: tuple):
        self.name, self.layout, self.dlist = name, layout, None
        self.users = 0  # pulls in flight against this peer
        self.gone = False  # torn down (evicted, failed or closed): no new pull uses it
        self.forgotten = False  # its disconnect is queued or done
        self.retired: threading.Event | None = None  # set once gone and disconnected
        self.ready = threading.Event()  # set when the handshake has ended, either way
        self.error: str | None = None  # why the handshake failed


def _block_dlist(base_addr: int, num_blocks: int, block_bytes: int, device_id: int) -> np.ndarray:
    """One (addr, len, dev) descriptor per block, so transfers select blocks by index."""
    descs = np.empty((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = base_addr + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    descs[:, 1] = block_bytes
    descs[:, 2] = device_id
    return descs


def _check_ids(ids: list[int], num_blocks: int, what: str) -> None:
    for b in ids:
        if not 0 <= b < num_blocks:
            raise ValueError(f"{what} block id {b} out of range [0, {num_blocks})")


class NixlTransferAgent(TransferBackend):
    """One per worker rank process. Owns a NIXL agent with the rank's KV pool registered once.

    `pool` is a contiguous, block-major tensor whose dim 0 is the block index
    (CPU -> DRAM, CUDA -> VRAM). Thread-safe: pulls may run concurrently.
    """

    notifies = True

    def __init__(self, name_prefix: str, pool: torch.Tensor, *, max_peers: int = 64):
        if pool.dim() < 1 or pool.shape[0] == 0 or not pool.is_contiguous():
            raise ValueError("pool must be a contiguous tensor with at least one block in dim 0")
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        # A new name per process incarnation: a restarted worker is a new peer,
        # never confused with the dead one's cached connection.
        self.name = f"{name_prefix}-{uuid.uuid4().hex}"
        self.num_blocks = pool.shape[0]
        self.block_bytes = pool[0].numel() * pool.element_size()
        self.block_shape = tuple(pool.shape[1:])
        self.mem_type = "VRAM" if pool.is_cuda else "DRAM"
        self.device_id = pool.get_device() if pool.is_cuda else 0
        self.base_addr = pool.data_ptr()
        self.max_peers = max_peers
        self._pool = pool  # keep the registered memory alive as long as we are
        # Guards the peer table only: no NIXL call that may wait on the network (a
        # handshake, a disconnect) runs under it, so one unreachable peer cannot hold
        # up pulls from the others.
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()  # LRU: oldest first
        self._pending: list = []  # NIXL calls decided under the lock, made after it
        # Agents being disconnected: a new handshake with one waits for it to end (an
        # old disconnect must not remove the new connection).
        self._forgetting: dict[str, threading.Event] = {}
        # READs that may still write their blocks: (xfer or None once NIXL let it go, tag,
        # not before), handed back by release_stuck (ReadStuck, ReadLate).
        self._stuck: list[tuple[object, str, float]] = []
        self._closed = False

        for key, value in UCX_DEFAULTS.items():  # read by UCX when the agent is made
            os.environ.setdefault(key, value)
        self.late_write_s = late_write_s()
        self._agent = _new_agent(self.name)
        self._reg = self._agent.register_memory(pool)
        self._local = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            _block_dlist(self.base_addr, self.num_blocks, self.block_bytes, self.device_id),
            self.mem_type,
        )
        # Taken after registration so it carries the pool's remote keys.
        self._metadata = self._agent.get_agent_metadata()

    # ---- prefill side -------------------------------------------------------

    def rank_kv(self, block_ids: list[int]) -> RankKV:
        """Describe local blocks for a KVHandle (prefill side)."""
        _check_ids(block_ids, self.num_blocks, "local")
        return RankKV(
            agent_name=self.name,
            agent_metadata=self._metadata,
            base_addr=self.base_addr,
            num_blocks=self.num_blocks,
            block_bytes=self.block_bytes,
            device_id=self.device_id,
            mem_type=self.mem_type,
            block_ids=list(block_ids),
            block_shape=list(self.block_shape),
        )

    def poll_notifs(self) -> list[bytes]:
        """New notification messages from any peer (prefill side: completed pulls)."""
        if self._closed:
            return []
        return [m for msgs in self._agent.get_new_notifs().values() for m in msgs]

    # ---- decode side --------------------------------------------------------

    def pull(
        self,
        src: RankKV,
        local_block_ids: list[int],
        *,
        timeout_s: float,
        notif: bytes = b"",
        tag: str = "",
    ) -> int:
        """READ `src.block_ids` of the remote pool into `local_block_ids` of ours.

        Bounded by `timeout_s` (TransferTimeout), the handshake with a new peer
        included: no READ starts after the deadline, even when the handshake itself
        returned late (the connection is kept for the next pull). Any NIXL/UCX error,
        an unreachable peer or bad metadata raise TransferFailed. A READ given up at
        the deadline raises ReadLate, one that cannot be released ReadStuck: either way
        its blocks stay unsafe until `release_stuck` returns `tag`. `notif` is
        delivered to the remote agent when the READ completes. Returns bytes moved.
        """
        check_blocks_match(src, local_block_ids, self.block_bytes, self.block_shape)
        _check_ids(local_block_ids, self.num_blocks, "local")
        _check_ids(src.block_ids, src.num_blocks, "remote")
        if timeout_s <= 0:
            raise TransferTimeout(f"no time left to READ from {src.agent_name}")
        deadline = time.monotonic() + timeout_s

        peer = self._checkout(src, deadline, timeout_s)
        failed = True
        try:
            if time.monotonic() >= deadline:
                failed = False  # connected, only late: the connection stays for the next
                raise TransferTimeout(
                    f"handshake with {src.agent_name} outlasted the pull's {timeout_s}s"
                )
            if not src.block_ids:
                # Nothing to move, but the peer still learns the request is done.
                if notif:
                    self._agent.send_notif(peer.name, notif)
                failed = False
                return 0
            self._read(peer, src, local_block_ids, deadline, timeout_s, notif, tag)
            failed = False
            return len(src.block_ids) * self.block_bytes
        except TransferError:
            raise
        except Exception as e:  # NIXL raises its own exception types; callers get ours
            raise TransferFailed(f"pull from {src.agent_name} failed: {e!r}") from None
        finally:
            self._checkin(peer, failed)

    def _read(
        self,
        peer: _Peer,
        src: RankKV,
        local_ids: list[int],
        deadline: float,
        timeout_s: float,
        notif: bytes,
        tag: str,
    ) -> None:
        if peer.gone:  # torn down by another pull's failure since this one checked it out
            raise TransferFailed(f"connection to {src.agent_name} was torn down")
        try:
            xfer = self._agent.make_prepped_xfer(
                "READ", self._local, local_ids, peer.dlist, src.block_ids, notif_msg=notif
            )
        except Exception as e:
            raise TransferFailed(f"cannot prepare READ from {src.agent_name}: {e!r}") from None
        state, error = "ERR", None
        posted = time.monotonic()
        try:
            state = self._agent.transfer(xfer)
            sleep = _FIRST_SLEEP_S
            while state == "PROC":
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(sleep, left))
                sleep = min(sleep * 2, _MAX_SLEEP_S)
                state = self._agent.check_xfer_state(xfer)
        except Exception as e:  # e.g. the endpoint reports the peer disconnected
            state, error = "ERR", e
        if state == "DONE":
            xfer.release()
            return
        until = posted + self.late_write_s
        self._abort(xfer, peer, tag, until)
        n = len(local_ids)
        if state == "PROC":  # still in flight: its reply may yet land (LATE_WRITE)
            with self._lock:
                self._stuck.append((None, tag, until))
            late = ReadLate(
                f"READ of {n} blocks from {src.agent_name} did not finish within {timeout_s}s"
                f"; its blocks are held {self.late_write_s:g}s from its start"
            )
            late.until = until
            raise late
        raise TransferFailed(
            f"READ of {n} blocks from {src.agent_name} failed"
            + (f": {error!r}" if error else " (NIXL state ERR)")
        )

    def _abort(self, xfer, peer: _Peer, tag: str, until: float) -> None:
        """Release an unfinished or failed xfer; ReadStuck when NIXL will not let it go
        (then held until it does, and not before `until`)."""
        try:
            xfer.release()
            return
        except Exception:
            pass
        # NIXL could not cancel it; dropping the peer's endpoint makes UCX fail
        # its outstanding requests, after which release succeeds.
        with self._lock:
            self._teardown(peer, now=True)
        self._run_pending()
        try:
            xfer.release()
            return
        except Exception as e:
            error = e
        with self._lock:
            self._stuck.append((xfer, tag, until))
        log.error("cannot release NIXL xfer to %s after disconnect: %r", peer.name, error)
        raise ReadStuck(
            f"READ from {peer.name} could not be released ({error!r}): its blocks stay "
            "out of use until NIXL lets it go"
        )

    def release_stuck(self) -> list[str]:
        """The tags of held READs whose blocks are safe now: past the time their data
        could still land, and let go by NIXL (retried here)."""
        now = time.monotonic()
        with self._lock:
            stuck, self._stuck = self._stuck, []
        released, left = [], []
        for xfer, tag, until in stuck:
            if now < until:
                left.append((xfer, tag, until))
                continue
            try:
                if xfer is not None:
                    xfer.release()
                released.append(tag)
            except Exception:  # noqa: BLE001 - still stuck: tried again next time
                left.append((xfer, tag, until))
        with self._lock:
            self._stuck = left + self._stuck
        return released

    @property
    def stuck_reads(self) -> int:
        return len(self._stuck)

    # ---- peer cache ---------------------------------------------------------

    def connecting(self, src: RankKV) -> threading.Event | None:
        """Set when a handshake with `src`'s agent in progress (or its disconnect)
        ends; None when a pull from it can start now. Callers wait for it off the
        pull threads, so one unreachable peer does not hold them all."""
        with self._lock:
            busy = self._forgetting.get(src.agent_name)
            if busy is not None:
                return busy
            peer = self._peers.get(src.agent_name)
            return peer.ready if peer is not None and not peer.ready.is_set() else None

    def _checkout(self, src: RankKV, deadline: float, timeout_s: float) -> _Peer:
        """The peer for `src`, marked in use. A new peer is handshaken by the first
        pull that needs it, outside the lock; pulls from the same peer meanwhile wait
        for that handshake until their own deadline, pulls from others go on."""
        layout = (src.base_addr, src.num_blocks, src.block_bytes, src.device_id, src.mem_type)
        name = src.agent_name
        while True:
            with self._lock:
                if self._closed:
                    raise TransferFailed("transfer agent is closed")
                busy = self._forgetting.get(name)
                if busy is None:
                    peer = self._peers.get(name)
                    if peer is not None and peer.layout != layout:
                        # Same agent, different pool: our prepared dlist is stale.
                        self._teardown(peer)
                        peer = None
                        busy = self._forgetting.get(name)
                if busy is None:
                    first = peer is None
                    if first:
                        peer = self._peers[name] = _Peer(name, layout)
                    self._peers.move_to_end(name)
                    peer.users += 1
                    self._evict()
                    break
            self._run_pending()
            if not busy.wait(max(0.0, deadline - time.monotonic())):
                raise TransferTimeout(f"disconnect from {name} did not end within {timeout_s}s")
        self._run_pending()
        try:
            if first:
                self._handshake(peer, src)
            elif not peer.ready.wait(max(0.0, deadline - time.monotonic())):
                raise TransferTimeout(
                    f"handshake with {name} did not end within the pull's {timeout_s}s"
                )
            if peer.error is not None:
                raise TransferFailed(peer.error)
        except BaseException:
            self._checkin(peer, failed=True)
            raise
        return peer

    def _handshake(self, peer: _Peer, src: RankKV) -> None:
        """Connect to `src`'s agent and prepare its blocks (no lock held: it may wait
        on the network). Sets `peer.error` on failure; always sets `peer.ready`."""
        try:
            try:
                name = self._agent.add_remote_agent(src.agent_metadata)
            except Exception as e:
                # NIXL connects here: a dead peer fails now, as does garbage metadata.
                peer.error = (
                    f"handshake with {src.agent_name} failed (peer unreachable or bad "
                    f"metadata): {e!r}"
                )
                return
            name = name.decode() if isinstance(name, bytes) else name  # the binding: bytes
            if name != src.agent_name:
                self._forget(name)
                peer.error = f"metadata names agent {name!r}, handle says {src.agent_name!r}"
                return
            try:
                peer.dlist = self._agent.prep_xfer_dlist(
                    name,
                    _block_dlist(src.base_addr, src.num_blocks, src.block_bytes, src.device_id),
                    src.mem_type,
                )
            except Exception as e:
                self._forget(name)
                peer.error = f"cannot prepare blocks of {name}: {e!r}"
        finally:
            peer.ready.set()

    def _forget(self, name: str, done: threading.Event | None = None) -> None:
        try:
            self._agent.remove_remote_agent(name)
        except Exception as e:
            log.warning("removing NIXL peer %s: %r", name, e)
        if done is not None:
            with self._lock:
                self._unreserve(name, done)

    def _unreserve(self, name: str, done: threading.Event) -> None:
        """The retired peer `name` is disconnected (caller holds the lock)."""
        if self._forgetting.get(name) is done:
            del self._forgetting[name]
        done.set()

    def _checkin(self, peer: _Peer, failed: bool) -> None:
        with self._lock:
            peer.users -= 1
            # A failed peer is likely dead or broken; the next pull re-handshakes.
            if (failed or peer.gone) and peer.users == 0:
                self._teardown(peer)
            self._evict()
        self._run_pending()

    def _evict(self) -> None:
        """Drop least recently used idle peers beyond max_peers (caller holds the lock)."""
        excess = len(self._peers) - self.max_peers
        for peer in [p for p in self._peers.values() if p.users == 0][: max(excess, 0)]:
            self._teardown(peer)

    def _teardown(self, peer: _Peer, now: bool = False) -> None:
        """Take a peer out of use (caller holds the lock). Its NIXL calls are queued for
        `_run_pending`, after the lock: the disconnect once no pull uses it (at once
        with `now`), the dlist's release once no pull uses it, each once. Until the
        disconnect has run, the name is reserved: a new handshake waits for it."""
        if not peer.gone:
            peer.gone = True
            if self._peers.get(peer.name) is peer:
                del self._peers[peer.name]
            # The name is reserved until this peer is disconnected: a new handshake made
            # meanwhile would be undone by this peer's disconnect.
            peer.retired = self._forgetting[peer.name] = threading.Event()
        unused = peer.users == 0
        if unused and peer.dlist is not None:
            dlist, peer.dlist = peer.dlist, None
            self._pending.append(lambda: self._release_dlist(peer.name, dlist))
        if (now or unused) and not peer.forgotten and peer.ready.is_set():
            peer.forgotten = True
            if peer.error is None:
                self._pending.append(lambda: self._forget(peer.name, peer.retired))
            else:  # a failed handshake left no agent to disconnect
                self._unreserve(peer.name, peer.retired)

    def _run_pending(self) -> None:
        """The NIXL calls teardowns queued (no lock held: a dead peer may take its time
        to refuse a clean goodbye; logged, not raised)."""
        with self._lock:
            calls, self._pending = self._pending, []
        for call in calls:
            call()

    @staticmethod
    def _release_dlist(name: str, dlist) -> None:
        try:
            dlist.release()
        except Exception as e:
            log.warning("releasing dlist of NIXL peer %s: %r", name, e)

    # ---- lifecycle ----------------------------------------------------------

    def num_peers(self) -> int:
        """Peers currently cached (bounded by max_peers plus those in use)."""
        return len(self._peers)

    def close(self) -> None:
        """Drop all peers, deregister the pool, destroy the NIXL agent. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for peer in list(self._peers.values()):
                self._teardown(peer, now=True)
        self._run_pending()
        for xfer in self.release_stuck_all():
            log.error("leaving NIXL xfer unreleased at close: %r", xfer)
        try:
            self._local.release()
            self._agent.deregister_memory(self._reg)
        except Exception as e:
            log.warning("NIXL deregistration failed: %r", e)
        self._agent = None  # destroys the agent and its progress thread
        self._pool = None

    def release_stuck_all(self) -> list:
        """One last try for every held READ, due or not (the agent is closing); the
        xfers NIXL still refuses."""
        with self._lock:
            stuck, self._stuck = self._stuck, []
        left = []
        for xfer, _, _ in stuck:
            try:
                if xfer is not None:
                    xfer.release()
            except Exception:  # noqa: BLE001 - reported by close
                left.append(xfer)
        return left
