"""NIXL backend: decode pulls a request's KV blocks from prefill with one NIXL READ.

Each worker rank process owns one `NixlTransferAgent` over its block-major KV
pool, registered once. Prefill describes blocks with `rank_kv`; decode calls
`pull`, which handshakes with the prefill agent on first use (its metadata rides
in the handle), READs the blocks, and has NIXL notify prefill on completion.
Every wait is bounded by a deadline, and the peer cache is bounded (LESSONS 4-5).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict

import nixl._api as nixl_api
import numpy as np
import torch
from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

from transfer.backend import TransferBackend
from transfer.handle import (
    RankKV,
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
    block dlist is reused by every pull from it."""

    __slots__ = ("name", "layout", "dlist", "users", "gone", "doomed", "ready", "error")

    def __init__(self, name: str, layout: tuple):
        self.name, self.layout, self.dlist = name, layout, None
        self.users = 0  # pulls in flight against this peer
        self.gone = False  # torn down (evicted, failed or closed): no new pull uses it
        self.doomed = False  # its NIXL disconnect is queued (`_finish_teardowns`)
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
        self._doomed: list[_Peer] = []  # torn down under the lock; NIXL calls after it
        # READs NIXL refused to release (ReadStuck): token -> xfer, retried by release_stuck.
        self._stuck: dict[int, object] = {}
        self._tokens = itertools.count(1)
        self._closed = False

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
        self, src: RankKV, local_block_ids: list[int], *, timeout_s: float, notif: bytes = b""
    ) -> int:
        """READ `src.block_ids` of the remote pool into `local_block_ids` of ours.

        Bounded by `timeout_s` (TransferTimeout), the handshake with a new peer
        included: no READ starts after the deadline, even when the handshake itself
        returned late. Any NIXL/UCX error, an unreachable peer or bad metadata raise
        TransferFailed; a READ that cannot be released raises ReadStuck (its blocks
        stay unsafe until `release_stuck`). `notif` is delivered to the remote agent
        when the READ completes. Returns bytes moved.
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
                raise TransferTimeout(
                    f"handshake with {src.agent_name} outlasted the pull's {timeout_s}s"
                )
            if not src.block_ids:
                # Nothing to move, but the peer still learns the request is done.
                if notif:
                    self._agent.send_notif(peer.name, notif)
                failed = False
                return 0
            self._read(peer, src, local_block_ids, deadline, timeout_s, notif)
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
    ) -> None:
        try:
            xfer = self._agent.make_prepped_xfer(
                "READ", self._local, local_ids, peer.dlist, src.block_ids, notif_msg=notif
            )
        except Exception as e:
            raise TransferFailed(f"cannot prepare READ from {src.agent_name}: {e!r}") from None
        state, error = "ERR", None
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
        self._abort(xfer, peer)
        n = len(local_ids)
        if state == "PROC":
            raise TransferTimeout(
                f"READ of {n} blocks from {src.agent_name} did not finish within {timeout_s}s"
            )
        raise TransferFailed(
            f"READ of {n} blocks from {src.agent_name} failed"
            + (f": {error!r}" if error else " (NIXL state ERR)")
        )

    def _abort(self, xfer, peer: _Peer) -> None:
        """Release an unfinished or failed xfer so nothing keeps writing our blocks;
        ReadStuck when NIXL will not let it go."""
        try:
            xfer.release()
            return
        except Exception:
            pass
        # NIXL could not cancel it; dropping the peer's endpoint makes UCX fail
        # its outstanding requests, after which release succeeds.
        with self._lock:
            self._teardown(peer, now=True)
        self._finish_teardowns()
        try:
            xfer.release()
            return
        except Exception as e:
            error = e
        token = next(self._tokens)
        with self._lock:
            self._stuck[token] = xfer
        log.error("cannot release NIXL xfer to %s after disconnect: %r", peer.name, error)
        raise ReadStuck(
            f"READ from {peer.name} could not be released ({error!r}): its blocks stay "
            "out of use until NIXL lets it go",
            token,
        )

    def release_stuck(self) -> list[int]:
        """Retry releasing every stuck READ; the tokens of those NIXL let go now."""
        with self._lock:
            stuck = list(self._stuck.items())
        released = []
        for token, xfer in stuck:
            try:
                xfer.release()
            except Exception:  # noqa: BLE001 - still stuck: tried again next time
                continue
            released.append(token)
        with self._lock:
            for token in released:
                self._stuck.pop(token, None)
        return released

    @property
    def stuck_reads(self) -> int:
        return len(self._stuck)

    # ---- peer cache ---------------------------------------------------------

    def _checkout(self, src: RankKV, deadline: float, timeout_s: float) -> _Peer:
        """The peer for `src`, marked in use. A new peer is handshaken by the first
        pull that needs it, outside the lock; pulls from the same peer meanwhile wait
        for that handshake until their own deadline, pulls from others go on."""
        layout = (src.base_addr, src.num_blocks, src.block_bytes, src.device_id, src.mem_type)
        with self._lock:
            if self._closed:
                raise TransferFailed("transfer agent is closed")
            peer = self._peers.get(src.agent_name)
            if peer is not None and peer.layout != layout:
                # Same agent, different pool: our prepared dlist is stale.
                self._teardown(peer)
                peer = None
            first = peer is None
            if first:
                peer = self._peers[src.agent_name] = _Peer(src.agent_name, layout)
            self._peers.move_to_end(peer.name)
            peer.users += 1
            self._evict()
        self._finish_teardowns()
        try:
            if first:
                self._handshake(peer, src)
            elif not peer.ready.wait(max(0.0, deadline - time.monotonic())):
                raise TransferTimeout(
                    f"handshake with {src.agent_name} did not end within the pull's {timeout_s}s"
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

    def _forget(self, name: str) -> None:
        try:
            self._agent.remove_remote_agent(name)
        except Exception as e:
            log.warning("removing NIXL peer %s: %r", name, e)

    def _checkin(self, peer: _Peer, failed: bool) -> None:
        with self._lock:
            peer.users -= 1
            # A failed peer is likely dead or broken; the next pull re-handshakes.
            if failed and not peer.gone and peer.users == 0:
                self._teardown(peer)
            elif peer.gone and peer.users == 0 and not peer.doomed:
                self._doom(peer)  # torn down while in use: disconnected now it is not
            self._evict()
        self._finish_teardowns()

    def _evict(self) -> None:
        """Drop least recently used idle peers beyond max_peers (caller holds the lock)."""
        excess = len(self._peers) - self.max_peers
        for peer in [p for p in self._peers.values() if p.users == 0][: max(excess, 0)]:
            self._teardown(peer)

    def _teardown(self, peer: _Peer, now: bool = False) -> None:
        """Forget a peer (caller holds the lock). Its NIXL disconnect runs in
        `_finish_teardowns`, after the lock is released, once no pull uses it (at
        once with `now`: to make UCX fail a READ that will not end)."""
        if not peer.gone:
            peer.gone = True
            if self._peers.get(peer.name) is peer:
                del self._peers[peer.name]
        if (now or peer.users == 0) and not peer.doomed:
            self._doom(peer)

    def _doom(self, peer: _Peer) -> None:
        peer.doomed = True
        self._doomed.append(peer)

    def _finish_teardowns(self) -> None:
        """Release the dlists of torn-down peers and disconnect them (no lock held: a
        dead peer may take its time to refuse a clean goodbye; logged, not raised)."""
        with self._lock:
            doomed, self._doomed = self._doomed, []
        for peer in doomed:
            if peer.error is not None or peer.dlist is None:
                continue  # the handshake failed (and forgot the agent) or never ran
            try:
                peer.dlist.release()
            except Exception as e:
                log.warning("releasing dlist of NIXL peer %s: %r", peer.name, e)
            self._forget(peer.name)

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
                self._teardown(peer)
        self._finish_teardowns()
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
        """One last try for every stuck READ; those NIXL still refuses."""
        self.release_stuck()
        with self._lock:
            left, self._stuck = list(self._stuck.values()), {}
        return left
