"""KV transfer between prefill and decode ranks.

Imports nothing from `cluster` or `workers`; the data path runs one way into here.
This package's top level is torch- and NIXL-free (handle types, typed errors,
fault config, the lease table), so the router can import it; the backends
(`transfer.backend`, `transfer.nixl_backend`) and the sending side
(`transfer.sender`) are imported by name where they run, in the workers.
"""

from transfer.faults import FaultConfig, FaultInjector
from transfer.handle import (
    KVHandle,
    LeaseExpired,
    RankKV,
    ReadLate,
    ReadStuck,
    TransferBackpressure,
    TransferError,
    TransferFailed,
    TransferTimeout,
)
from transfer.lease import Lease, LeaseRegistry

__all__ = [
    "FaultConfig",
    "FaultInjector",
    "KVHandle",
    "Lease",
    "LeaseExpired",
    "LeaseRegistry",
    "RankKV",
    "ReadLate",
    "ReadStuck",
    "TransferBackpressure",
    "TransferError",
    "TransferFailed",
    "TransferTimeout",
]
