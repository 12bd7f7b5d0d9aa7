"""Fault hooks for chaos: exist only when `transfer.faults` is set in the config.

Each pull rolls once: delay it, make it never complete (it waits out its own
deadline and ends as `TransferTimeout`, exactly as a stalled peer would), hang it
past its deadline (as a blocked handshake would), or fail it; each lease rolls
once to be registered already expiring.
"""

from __future__ import annotations

import random
import time
from typing import Annotated

import msgspec
from msgspec import Meta

from transfer.handle import TransferFailed, TransferTimeout

_Rate = Annotated[float, Meta(ge=0, le=1)]


class FaultConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Injected transfer faults (`transfer.faults`, for chaos): each pull rolls once for
    hang, stall, fail and delay, in that order; each lease once for expire."""

    delay_rate: Annotated[_Rate, Meta(description="share of pulls delayed by `delay_s`")] = 0.0
    delay_s: Annotated[
        float,
        Meta(ge=0, description="a delayed pull's delay (past its deadline: a TransferTimeout)"),
    ] = 0.2
    stall_rate: Annotated[
        _Rate,
        Meta(description="share of pulls that never complete: each ends at transfer.timeout_s"),
    ] = 0.0
    fail_rate: Annotated[_Rate, Meta(description="share of pulls that fail at once")] = 0.0
    expire_rate: Annotated[
        _Rate,
        Meta(description="share of leases that expire at once, before decode can claim them"),
    ] = 0.0
    hang_rate: Annotated[
        _Rate,
        Meta(
            description="share of pulls whose thread ignores its deadline for `hang_s` more "
            "(a handshake blocked on a peer that drops packets): decode gives up on it and "
            "holds its blocks until it ends"
        ),
    ] = 0.0
    hang_s: Annotated[
        float, Meta(ge=0, description="how long a hung pull runs past its deadline")
    ] = 5.0
    seed: Annotated[int, Meta(description="seed of the rolls (salted per worker)")] = 0


class FaultInjector:
    def __init__(self, cfg: FaultConfig, salt: str = ""):
        self.cfg = cfg
        self._rng = random.Random(f"{cfg.seed}:{salt}")
        self.injected = {"delay": 0, "stall": 0, "fail": 0, "expire": 0, "hang": 0}

    def before_pull(self, timeout_s: float) -> None:
        """Called by the puller before its READ, on the transfer thread, with what
        is left of the pull's deadline (never sleeps past it, even when none is left)."""
        r = self._rng.random()
        c = self.cfg
        left = max(0.0, timeout_s)
        if r < c.hang_rate:
            self.injected["hang"] += 1
            time.sleep(left + c.hang_s)
            raise TransferTimeout(f"injected fault: pull hung {c.hang_s}s past its deadline")
        r -= c.hang_rate
        if r < c.stall_rate:
            self.injected["stall"] += 1
            time.sleep(left)
            raise TransferTimeout(f"injected fault: pull never completed within {left:.3f}s")
        r -= c.stall_rate
        if r < c.fail_rate:
            self.injected["fail"] += 1
            raise TransferFailed("injected fault: pull failed")
        r -= c.fail_rate
        if r < c.delay_rate:
            self.injected["delay"] += 1
            time.sleep(min(c.delay_s, left))
            if c.delay_s >= left:
                raise TransferTimeout(
                    f"injected fault: pull delayed past its deadline ({left:.3f}s)"
                )

    def lease_ttl(self, ttl_s: float) -> float:
        if self._rng.random() < self.cfg.expire_rate:
            self.injected["expire"] += 1
            return 0.0
        return ttl_s
