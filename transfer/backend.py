"""The transfer backend interface and its second implementation, the Ray object store.

Two implementations exist, so this is an interface: `NixlTransferAgent`
(`transfer/nixl_backend.py`: one-sided READ, completion notified to prefill by
NIXL) and `RayObjectBackend` (prefill puts the blocks' bytes in Ray's object
store; decode gets them). Leases, epochs, bounds and deadlines live around
both, in `transfer/lease.py` and the workers, so they are the same for both.
`transfer.backend: ray` selects the object store; it is also the fallback when
NIXL cannot load, and the baseline in `benchmarks/kv_transfer.py`.
"""

from __future__ import annotations

import abc
import logging

import torch

from transfer.handle import RankKV, TransferFailed, TransferTimeout, check_blocks_match

log = logging.getLogger(__name__)


class TransferBackend(abc.ABC):
    """One per worker rank process, over that rank's block-major KV pool."""

    name: str
    #: True when a completed pull notifies the prefill side by itself
    #: (`poll_notifs`); otherwise the puller releases the lease explicitly.
    notifies: bool
    #: Longest a copy given up in flight (ReadLate) may still write our blocks.
    late_write_s: float = 0.0

    @abc.abstractmethod
    def rank_kv(self, block_ids: list[int]) -> RankKV:
        """Prefill side: describe local blocks for a KVHandle."""

    @abc.abstractmethod
    def pull(
        self,
        src: RankKV,
        local_block_ids: list[int],
        *,
        timeout_s: float,
        notif: bytes = b"",
        tag: str = "",
    ) -> int:
        """Decode side: copy `src`'s blocks into ours within `timeout_s`; bytes moved.
        `tag` names the blocks in `release_stuck` if the copy raises ReadStuck or
        ReadLate."""

    def poll_notifs(self) -> list[bytes]:
        return []

    def release_stuck(self) -> list[str]:
        """The tags of READs that raised `ReadStuck` or `ReadLate` whose blocks are
        safe to reuse now."""
        return []

    def connecting(self, src: RankKV):
        """A `threading.Event` set when a connection to `src`'s peer now being made
        has been made (or has failed); None when a pull can start at once."""
        return None

    def close(self) -> None:
        pass


class RayObjectBackend(TransferBackend):
    """KV through Ray's object store: prefill `ray.put`s a copy of the blocks
    when it describes them; decode `ray.get`s it with a timeout."""

    notifies = False

    def __init__(self, name_prefix: str, pool: torch.Tensor):
        self.name = f"{name_prefix}-ray"
        self._pool = pool
        self.block_bytes = pool[0].numel() * pool.element_size()
        self.block_shape = tuple(pool.shape[1:])

    def rank_kv(self, block_ids: list[int]) -> RankKV:
        import ray

        ids = torch.tensor(block_ids, dtype=torch.long, device=self._pool.device)
        ref = ray.put(self._pool.index_select(0, ids).cpu())
        return RankKV(
            agent_name=self.name,
            agent_metadata=b"",
            base_addr=0,
            num_blocks=self._pool.shape[0],
            block_bytes=self.block_bytes,
            device_id=0,
            mem_type="RAY",
            block_ids=list(block_ids),
            object_ref=ref,
            block_shape=list(self.block_shape),
        )

    def pull(
        self,
        src: RankKV,
        local_block_ids: list[int],
        *,
        timeout_s: float,
        notif: bytes = b"",
        tag: str = "",
    ) -> int:
        import ray
        from ray.exceptions import GetTimeoutError

        check_blocks_match(src, local_block_ids, self.block_bytes, self.block_shape)
        if src.object_ref is None:
            raise TransferFailed(f"handle from {src.agent_name} carries no object ref")
        if timeout_s <= 0:
            raise TransferTimeout(f"no time left to fetch the object from {src.agent_name}")
        try:
            data = ray.get(src.object_ref, timeout=timeout_s)
        except GetTimeoutError:
            raise TransferTimeout(
                f"object from {src.agent_name} not fetched within {timeout_s}s"
            ) from None
        except Exception as e:  # owner died, object lost
            raise TransferFailed(f"object from {src.agent_name} lost: {e!r}") from None
        ids = torch.tensor(local_block_ids, dtype=torch.long, device=self._pool.device)
        self._pool.index_copy_(0, ids, data.to(self._pool.device))
        return data.numel() * data.element_size()
