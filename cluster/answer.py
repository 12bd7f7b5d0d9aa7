"""One answer from its choices: a chat request's one lifecycle, or one per prompt of a
completions batch, merged as their tokens come, and what they add up to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cluster import responses, tools
from cluster.admission import Admitted
from cluster.lifecycle import RequestState
from cluster.logprobs import LogprobFormat, Piece
from cluster.policy import echo_only, runs_per_prompt


class Answer:
    """What a request's answer gathers from its choices' lifecycles: text, finish
    reason, token counts and logprobs per choice, and the usage they add up to."""

    def __init__(
        self,
        rid: str,
        chat: bool,
        states: list[RequestState],
        admitted: Admitted,
        fmt: LogprobFormat,
    ):
        req = admitted.request
        self.rid, self.chat, self.states = rid, chat, states
        self.fmt = fmt.for_request(bool(req.return_tokens_as_token_ids))
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.choices_in = admitted.choices
        self.echo = [c.echo for c in admitted.choices]
        self.text = list(self.echo)
        self.reason: list[str | None] = [None] * len(states)
        self.n_out = [0] * len(states)
        self._started: set[int] = set()
        # Top logprobs shown per token (None: no logprobs), and per prompt token (vLLM's
        # prompt_logprobs); a completion's echo with logprobs shows the prompt's first.
        self.k = (req.top_logprobs or 0) if chat else req.logprobs
        if chat and not req.logprobs:
            self.k = None
        self.prompt_k = req.prompt_logprobs
        self.echo_logprobs = not chat and bool(req.echo) and req.logprobs is not None
        self.n, self.runs = runs_per_prompt(req)  # returned and sampled per prompt
        self.echo_only = echo_only(req)  # the prompt scored: the token computed is not shown
        self.pieces: list[list[Piece]] = [[] for _ in states]  # output logprobs so far
        self.offset = [0] * len(states)  # completions' text_offset so far (streamed)
        self.tools = admitted.tools  # chat with tools: text read back as calls
        self._tool_streams = [tools.ToolStream(self.tools) for _ in states] if self.tools else []

    def first(self, i: int) -> bool:
        """Whether this is choice i's first event (and mark it seen)."""
        new = i not in self._started
        self._started.add(i)
        return new

    def visible(
        self, piece: str, n_out: int, lps: list[Piece] | None
    ) -> tuple[str, int, list[Piece] | None]:
        """What a choice shows of its new output: nothing when only its prompt is scored."""
        return ("", 0, None) if self.echo_only else (piece, n_out, lps)

    def stream_tools(
        self, i: int, piece: str, reason: str | None
    ) -> tuple[str, list[dict] | None, str | None]:
        """A streamed choice's (content, tool-call deltas, finish reason) for its new text."""
        if not self.tools:
            return piece, None, reason
        stream = self._tool_streams[i]
        piece, calls = stream.feed(piece)
        if reason is not None:
            more, last = stream.finish()
            piece, calls = piece + more, calls + last
            reason = tools.finish_reason(self.tools, reason, stream.calls)
        return piece, calls or None, reason

    def add(
        self, i: int, piece: str, reason: str | None, n_out: int, lps: list[Piece] | None = None
    ) -> None:
        self.text[i] += piece
        self.reason[i] = reason or self.reason[i]
        self.n_out[i] = n_out
        if lps:
            self.pieces[i] += lps

    def logprobs(
        self, i: int, lps: list[Piece] | None, first: bool, stream: bool = True
    ) -> dict | None:
        """Choice i's `logprobs` for these tokens (a chunk's, or with `stream` False the
        whole output's); `first`: they are the choice's first, after the echoed prompt's
        when asked. A stream's text offsets go on from its previous chunk's."""
        if self.k is None:
            return None
        pieces = list(lps or [])
        if first and self.echo_logprobs:
            ids, entries = self.choices_in[i].prompt_ids, self._prompt_entries(i)
            pieces = [(ids[0], None), *zip(ids[1:], entries, strict=True), *pieces]
        if self.chat:
            return self.fmt.chat(pieces, self.k)
        out = self.fmt.completion(pieces, self.k, self.offset[i] if stream else 0)
        if stream:
            self.offset[i] += sum(len(t) for t in out["tokens"])
        return out

    def prompt_logprobs(self, i: int) -> list | None:
        """vLLM's `prompt_logprobs` of choice i, when asked for."""
        if self.prompt_k is None:
            return None
        return self.fmt.prompt(
            self.choices_in[i].prompt_ids, self._prompt_entries(i), self.prompt_k
        )

    def _prompt_entries(self, i: int) -> list:
        """Choice i's prompt logprobs: its own, or, forked from its prompt's first run
        (which had them with its first token, before any fork began), that run's."""
        own = self.states[i].prompt_logprobs
        if own is None:
            own = self.states[i - i % self.runs].prompt_logprobs
        return own or []

    def choices(self) -> list[tuple]:
        """(text, finish reason, logprobs, prompt logprobs, tool calls) of each choice, in
        order: of each prompt's runs (best_of), the n with the highest cumulative logprob.
        With tools, the text is the content left besides the calls (None when none)."""
        kept = []
        for start in range(0, len(self.states), self.runs):
            runs = list(range(start, start + self.runs))
            if self.runs > self.n:
                runs.sort(key=lambda i: -sum(e[0] for _, e in self.pieces[i]))
            kept += runs[: self.n]
        out = []
        for i in kept:
            text, reason, calls = self.text[i], self.reason[i], None
            if self.tools:
                text, calls = tools.parse(text, self.tools)
                reason = tools.finish_reason(self.tools, reason, calls)
            lps = self.logprobs(i, self.pieces[i], True, stream=False)
            out.append((text, reason, lps, self.prompt_logprobs(i), calls))
        return out

    def usage(self) -> dict:
        """Each prompt's tokens once (however many runs it has), every run's output."""
        firsts = [s for i, s in enumerate(self.states) if i % self.runs == 0]
        return responses.usage(
            sum(s.prompt_len for s in firsts),
            sum(self.n_out),
            sum(s.cached_tokens for s in firsts),
        )


async def merged(runs: list[AsyncIterator]) -> AsyncIterator[tuple]:
    """(choice index, text, finish reason, tokens so far, logprobs) from every choice's lifecycle
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
