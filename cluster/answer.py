"""One answer from its choices: a chat request's one lifecycle, or one per prompt of a
completions batch, merged as their tokens come, and what they add up to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cluster import responses
from cluster.lifecycle import RequestState


class Answer:
    """What a request's answer gathers from its choices' lifecycles: text, finish
    reason and token counts per choice, and the usage they add up to."""

    def __init__(self, rid: str, chat: bool, states: list[RequestState], echo: list[str]):
        self.rid, self.chat, self.states, self.echo = rid, chat, states, echo
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.text = list(echo)
        self.reason: list[str | None] = [None] * len(states)
        self.n_out = [0] * len(states)
        self._started: set[int] = set()

    def first(self, i: int) -> bool:
        """Whether this is choice i's first event (and mark it seen)."""
        new = i not in self._started
        self._started.add(i)
        return new

    def add(self, i: int, piece: str, reason: str | None, n_out: int) -> None:
        self.text[i] += piece
        self.reason[i] = reason or self.reason[i]
        self.n_out[i] = n_out

    def choices(self) -> list[tuple[str, str | None]]:
        return list(zip(self.text, self.reason, strict=True))

    def usage(self) -> dict:
        return responses.usage(
            sum(s.prompt_len for s in self.states),
            sum(self.n_out),
            sum(s.cached_tokens for s in self.states),
        )


async def merged(runs: list[AsyncIterator]) -> AsyncIterator[tuple[int, str, str | None, int]]:
    """(choice index, text, finish reason, tokens so far) from every choice's lifecycle
    as they come. When this ends (done, failed, or closed: the client left), every
    lifecycle has ended, so each has released what it held."""
    if len(runs) == 1:
        try:
            async for item in runs[0]:
                yield (0, *item)
        finally:
            await runs[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, run: AsyncIterator) -> None:
        end: object = done
        try:
            async for item in run:
                queue.put_nowait((i, item))
        except asyncio.CancelledError as e:  # the merge ends the pumps, or the run ended so
            end = e
            raise
        except Exception as e:  # noqa: BLE001 - ends the whole answer
            end = e
        finally:
            queue.put_nowait((i, end))  # always an end: the merge never waits on a run gone

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield (i, *item)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            await run.aclose()
