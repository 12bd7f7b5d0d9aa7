"""The router's output channels: one stream per decode replica carries every one of
this router's requests there (wire/channel.py is one channel's end)."""

from __future__ import annotations

import asyncio
import logging
import time

from cluster.pool import WorkerPool
from wire.channel import OutputChannel

log = logging.getLogger("pdcluster.router")

CHANNEL_RETRY_S = 0.1  # how often a request looks for, and the router reopens, a dead channel
RETIRED_GRACE_S = 1.0  # a replaced channel stays open this long at least, for requests given it


class DecodeChannels:
    """Opens every decode replica's output channel, and reopens one that failed (its
    actor died or restarted). Only `keep`, a task of the router's own, opens channels: a
    channel carries every request on its replica, so it must not be the child of a
    request's task, whose cancellation (client gone) Ray may pass on to it.

    A channel that has carried `max_messages` is replaced: Ray keeps state for every
    item of a streaming call on both ends until the call ends (Ray 2.60: about 120
    bytes an item here, 40 in the worker), so one channel for the replica's lifetime
    grows both processes with every step. Requests on the old channel finish there; it
    is closed once none is left."""

    def __init__(self, decode: WorkerPool, max_messages: int, period_s: float) -> None:
        self.decode = decode
        self.max_messages = max_messages
        self.period_s = period_s
        self.open: dict[int, OutputChannel] = {}
        # Replaced channels (when, channel) that requests still stream on.
        self.retired: list[tuple[float, OutputChannel]] = []
        self.opened = 0  # channels opened so far
        self._wanted = asyncio.Event()

    def queues(self) -> int:
        """Requests with a queue open on any channel, the retired ones' included."""
        return sum(len(c) for c in [*self.open.values(), *(c for _, c in self.retired)])

    async def keep(self) -> None:
        opened_at: dict[int, float] = {}
        while True:
            now = time.monotonic()
            for i in range(len(self.decode)):
                chan = self.open.get(i)
                if chan is not None and chan.messages >= self.max_messages:
                    self.retired.append((now, self.open.pop(i)))
                    chan = None
                    opened_at.pop(i, None)  # its successor opens now
                # A dead actor's channel fails at once: reopened every CHANNEL_RETRY_S at most.
                if (chan is None or not chan.alive) and (
                    time.monotonic() - opened_at.get(i, -CHANNEL_RETRY_S) >= CHANNEL_RETRY_S
                ):
                    opened_at[i] = time.monotonic()
                    try:
                        self.open[i] = OutputChannel(self.decode.handle(i), f"router-decode{i}")
                        self.opened += 1
                    except Exception:  # noqa: BLE001 - tried again next pass
                        log.exception("opening the output channel to decode-%d", i)
            for retired in [r for r in self.retired if not len(r[1]) or not r[1].alive]:
                # The grace covers a request given the channel just before it was replaced
                # that has not opened its queue on it yet.
                if now - retired[0] >= RETIRED_GRACE_S:
                    self.retired.remove(retired)
                    if retired[1].alive:  # a failed one has ended already
                        retired[1].shutdown()
            self._wanted.clear()
            try:
                await asyncio.wait_for(self._wanted.wait(), self.period_s)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def get(self, i: int) -> OutputChannel:
        """Decode replica i's live output channel, once `keep` has one open."""
        while True:
            chan = self.open.get(i)
            if chan is not None and chan.alive:
                return chan
            self._wanted.set()
            await asyncio.sleep(CHANNEL_RETRY_S)
