"""KV transfer between prefill and decode ranks: handle types and the NIXL backend.

Imports nothing from `cluster` or `workers`; the data path runs one way into here.
"""

from transfer.handle import (
    KVHandle,
    LeaseExpired,
    RankKV,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from transfer.nixl_backend import NixlTransferAgent

__all__ = [
    "KVHandle",
    "LeaseExpired",
    "NixlTransferAgent",
    "RankKV",
    "TransferError",
    "TransferFailed",
    "TransferTimeout",
]
