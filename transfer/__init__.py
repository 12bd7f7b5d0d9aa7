"""KV transfer between prefill and decode ranks: handle types and the NIXL backend.

Imports nothing from `cluster` or `workers`; the data path runs one way into here.
"""

from transfer.handle import (
    KVHandle,
    LeaseExpired,
    RankKV,
    TransferBackpressure,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from transfer.backend import RayObjectBackend, TransferBackend
from transfer.faults import FaultConfig, FaultInjector
from transfer.lease import Lease, LeaseRegistry

try:  # the Ray object-store backend works without NIXL
    from transfer.nixl_backend import NixlTransferAgent
except ImportError:  # pragma: no cover - depends on the machine
    NixlTransferAgent = None

__all__ = [
    "RayObjectBackend",
    "TransferBackend",
    "FaultConfig",
    "FaultInjector",
    "KVHandle",
    "Lease",
    "LeaseRegistry",
    "TransferBackpressure",
    "LeaseExpired",
    "NixlTransferAgent",
    "RankKV",
    "TransferError",
    "TransferFailed",
    "TransferTimeout",
]
