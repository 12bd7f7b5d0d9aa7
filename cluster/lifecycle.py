"""One request's life on the workers: prefill -> KV transfer -> decode -> release.

`Lifecycle.run` is the one try/finally that owns a request from admission to its
last token: the router's table entry goes when it ends, and every worker the
request touched is told to let go on the way out, whatever the exit (success,
error, deadline, client gone). Failures are survived here: a failed prefill or KV
transfer is retried on another prefill replica, a decode lost mid-stream is
migrated (prompt + tokens so far re-prefilled, decoding continues elsewhere).

It talks to the workers only through two `WorkerPool`s and the decode replicas'
output channels, so its unit tests run it against in-process stand-ins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from ray.exceptions import ActorUnavailableError, RayActorError, TaskCancelledError

from cluster.config import RouterConfig
from cluster.detokenizer import IncrementalDetokenizer, StopChecker
from cluster.pool import WorkerPool, WorkerStalled
from transfer.handle import TransferError, TransferFailed, TransferTimeout
from wire.api import Delta, TokenLogprobs, WorkerError, time_left
from wire.channel import OutputChannel
from wire.sampling_params import SamplingParams

log = logging.getLogger("pdcluster.router")


class Unavailable(Exception):
    """No worker could serve the request (after retries/migrations): HTTP 503."""


class NoPrefillWorker(Exception):
    """No prefill replica is healthy: the decode worker prefills locally."""


# A worker that died, is restarting, was found stalled, or refused the work.
WORKER_LOST = (RayActorError, ActorUnavailableError, WorkerError, WorkerStalled)


class Fork:
    """One prompt's n choices (n > 1, best_of): choice 0 is prefilled, and its KV pulled,
    once; the others join it on its decode replica (`DecodeWorker.generate_fork`) and
    fork from its KV when it lands. Choice 0 says where (`announce`) as soon as its
    decode call is sent, or that there is nowhere (`give_up`: a local prefill, a first
    token that ended it, a failure): then each goes on its own."""

    def __init__(self) -> None:  # on the router's event loop
        self._where: asyncio.Future = asyncio.get_running_loop().create_future()

    def announce(self, replica: int, attempt_id: str) -> None:
        if not self._where.done():
            self._where.set_result((replica, attempt_id))

    def give_up(self) -> None:
        if not self._where.done():
            self._where.set_result(None)

    async def where(self, timeout: float) -> tuple[int, str] | None:
        """(decode replica, choice 0's attempt id) to fork from, or None."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._where), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return None


@dataclass
class RequestState:
    """The router's entry for one request; exists while its lifecycle runs."""

    request_id: str
    prompt_len: int
    deadline: float  # this router's time.monotonic()
    stage: str = "admitted"
    # (replica, attempt id) pairs that may hold a lease / a decode sequence. Each
    # attempt (first try, re-prefill, migration) has its own id, the id the workers
    # know it by, so a late release can never hit a newer attempt.
    prefills: set[tuple[int, str]] = field(default_factory=set)
    decodes: set[tuple[int, str]] = field(default_factory=set)
    attempts: int = 0
    retries: int = 0  # failed prefills and KV transfers so far (router.max_retries)
    worker_done: bool = False  # the decode worker finished (and freed) the last attempt
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None
    slow_client: bool = False  # the edge cut its client off for leaving output unread
    queued_s: float | None = None  # in prefill's queue (vLLM's queue time), first prefill
    cached_tokens: int = 0  # prompt tokens prefill found in its prefix cache
    # params.prompt_logprobs: the prompt's tokens 1.., once they came (with token 1)
    prompt_logprobs: list[TokenLogprobs] | None = None

    def new_attempt(self) -> str:
        attempt_id = f"{self.request_id}-{self.attempts}"
        self.attempts += 1
        return attempt_id


def _apply_stops(
    detok: IncrementalDetokenizer, stops: StopChecker, tokens: list[int], final: bool
) -> tuple[str, int]:
    """The text `tokens` add, cut at a stop string, and how many of them it took: with
    stop strings, several tokens that came at once go one at a time, so the tokens kept
    (their logprobs, the usage) end at the one that completed the stop string, as vLLM's.
    `final`: the worker ended the sequence with the last of them."""
    steps = [tokens[j : j + 1] for j in range(len(tokens))] if stops.stop and tokens else [tokens]
    text, used = "", 0
    for j, step in enumerate(steps):
        used += len(step)
        last = j == len(steps) - 1
        piece = detok.push(step)
        if last and final:
            piece += detok.flush()
        piece, stopped = stops.push(piece, final=last and final)
        text += piece
        if stopped:
            break
    return text, used


class Lifecycle:
    """Runs this router's requests on its prefill and decode pools. `channel(i)`
    returns decode replica i's open output channel."""

    def __init__(
        self,
        cfg: RouterConfig,
        tokenizer,
        prefill: WorkerPool,
        decode: WorkerPool,
        channel: Callable[[int], Awaitable[OutputChannel]],
        metrics,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prefill = prefill
        self.decode = decode
        self.channel = channel
        self.metrics = metrics
        self.requests: dict[str, RequestState] = {}

    def admit(self, request_id: str, prompt_len: int) -> RequestState:
        """The request's table entry; it holds a router.max_queued slot until `run`
        ends (or, for a generator never started, until it is collected)."""
        state = RequestState(request_id, prompt_len, time.monotonic() + self.cfg.request_timeout_s)
        self.requests[request_id] = state
        return state

    def remaining(self, state: RequestState) -> float:
        """Seconds to the request's deadline; TimeoutError once it has passed."""
        return time_left(
            state.deadline,
            f"request {state.request_id} (during {state.stage}, router.request_timeout_s "
            f"{self.cfg.request_timeout_s}s)",
        )

    async def run(
        self,
        state: RequestState,
        prompt_ids: list[int],
        params: SamplingParams,
        fork: Fork | None = None,
        choice: int = 0,
    ) -> AsyncIterator[tuple[str, str | None, int, list[tuple[int, TokenLogprobs]] | None]]:
        """Yield (text delta, finish_reason, completion tokens so far, and when asked
        for, (token id, its logprobs) of each new token); the prompt's logprobs, when
        asked for, are in `state.prompt_logprobs` by the first yield. With `fork`, this is
        choice `choice` of a prompt's n, sharing choice 0's prefill and KV (`Fork`)."""
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        stops = StopChecker(params.stop, params.include_stop_str_in_output)
        n_out, outcome, reason, last_at = 0, "error", None, 0.0
        deltas = None
        try:
            async for delta in (deltas := self._tokens(state, prompt_ids, params, fork, choice)):
                tokens, reason = delta.tokens, delta.finish_reason
                if delta.prompt_logprobs is not None:
                    state.prompt_logprobs = delta.prompt_logprobs
                now = time.time()
                if n_out == 0:
                    state.first_token_at = now
                    # A prompt's tokens count once, however many choices it has.
                    prompt_tokens = state.prompt_len if choice == 0 else 0
                    self.metrics.first_token(now - state.created, prompt_tokens)
                self.metrics.tokens(len(tokens), now - last_at if n_out else None)
                last_at = now
                if reason is not None:
                    state.worker_done = True  # the worker ended and freed the sequence itself
                text, used = _apply_stops(detok, stops, tokens, reason is not None)
                if stops.stopped:
                    reason, tokens = "stop", tokens[:used]
                n_out += len(tokens)
                lps = None
                if delta.logprobs:
                    lps = list(zip(tokens, delta.logprobs[: len(tokens)], strict=True))
                yield text, reason, n_out, lps
                if reason is not None:
                    outcome = "ok"
                    break
        except (asyncio.CancelledError, GeneratorExit, TaskCancelledError):
            # The client left: Serve cancels this task, and Ray the calls it made, in
            # either order (a call's TaskCancelledError can arrive first).
            outcome = "cancelled"
            raise
        except TimeoutError:
            outcome = "timeout"
            raise
        finally:
            if deltas is not None:  # closed now: its own finally (a fork's give_up) runs
                await deltas.aclose()
            if state.slow_client:
                outcome = "slow_client"
            self.requests.pop(state.request_id, None)
            self.release(state)
            now = time.time()
            first = state.first_token_at
            self.metrics.ended(
                outcome, reason, now - state.created, n_out, now - first if first else None
            )

    def _retry(self, state: RequestState, kind: str, e: BaseException, exhausted: str) -> None:
        """A failed prefill or KV transfer (`kind`): spend one of the request's
        router.max_retries, or end it with a 503 saying `exhausted`."""
        self.metrics.retries.labels(kind).inc()
        if state.retries >= self.cfg.max_retries:
            log.warning("request %s: %s failed, no retry left: %r", state.request_id, kind, e)
            raise Unavailable(exhausted) from None
        state.retries += 1
        log.warning("request %s: %s failed (%r); retrying", state.request_id, kind, e)

    async def _tokens(
        self,
        state: RequestState,
        prompt_ids: list[int],
        params: SamplingParams,
        fork: Fork | None = None,
        choice: int = 0,
    ) -> AsyncIterator[Delta]:
        """Token ids (and logprobs) as they are produced, surviving worker loss: a failed prefill
        is retried elsewhere and a failed transfer re-prefills (both count against
        router.max_retries); a decode lost mid-stream is migrated (router.max_migrations):
        prompt + tokens so far re-prefilled on a prefill worker, continued on another
        decode worker. A fork's choices > 0 first try to fork from choice 0's KV."""
        produced: list[int] = []
        migrations = 0
        avoid: set[int] = set()  # prefill replicas whose KV transfer failed
        lost: set[int] = set()  # decode replicas this request was lost on
        if fork is not None and choice > 0:
            where = await fork.where(self.remaining(state))
            if where is not None:
                try:
                    async for delta in self._forked(state, prompt_ids, params, where, lost):
                        produced.extend(delta.tokens)
                        yield delta
                        if delta.finish_reason is not None:
                            return
                    raise WorkerError("decode stream ended without a finish reason")
                except TransferError as e:  # not forked (too late, a failed pull): on its own
                    if produced:
                        raise Unavailable("KV transfer failed after tokens were sent") from None
                    self.metrics.retries.labels("fork").inc()  # no retry of its budget spent
                    log.info("request %s: not forked (%r); served on its own", state.request_id, e)
                except WORKER_LOST as e:
                    if produced:  # lost mid-stream: a migration, as any other
                        if self.cfg.max_migrations < 1:
                            raise Unavailable("decode failed after 0 migrations") from None
                        migrations += 1
                        self.metrics.migrations.inc()
                    else:  # refused or lost before its first token: served on its own
                        self.metrics.retries.labels("fork").inc()
                    log.warning("request %s: forked decode lost (%r)", state.request_id, e)
            fork = None
        try:
            async for delta in self._own(
                state, prompt_ids, params, fork, produced, migrations, avoid, lost
            ):
                yield delta
        finally:
            if fork is not None:
                fork.give_up()

    async def _forked(
        self,
        state: RequestState,
        prompt_ids: list[int],
        params: SamplingParams,
        where: tuple[int, str],
        lost: set[int],
    ) -> AsyncIterator[Delta]:
        """A choice > 0 forked from choice 0's KV on its decode replica: its first token
        computed there (not by prefill), so no prompt logprobs (choice 0 has them)."""
        i, parent = where
        state.stage = "decode"
        attempt_id = state.new_attempt()
        sp = params
        if params.prompt_logprobs is not None:
            sp = msgspec.structs.replace(params, prompt_logprobs=None)

        def submit(chan: OutputChannel):
            left = self.remaining(state)
            return self.decode.handle(i).generate_fork.remote(
                attempt_id, chan.id, parent, prompt_ids, sp, left
            )

        async for item in self._on_decode(i, state, attempt_id, submit, lost):
            yield item

    async def _own(
        self,
        state: RequestState,
        prompt_ids: list[int],
        params: SamplingParams,
        fork: Fork | None,
        produced: list[int],
        migrations: int,
        avoid: set[int],
        lost: set[int],
    ) -> AsyncIterator[Delta]:
        """The request's own attempts (prefill, transfer, decode; retries, migrations);
        with `fork`, it is choice 0, and announces its first decode call to the others."""
        while True:
            if fork is not None and state.attempts:  # a retry: the first attempt is over
                fork.give_up()
            # A migration re-prefills prompt + tokens so far; the workers count those
            # tokens as output (max_tokens, min_tokens, a seeded draw's index).
            before = list(produced)
            sp = params
            if before and params.prompt_logprobs is not None:  # the client has them already
                sp = msgspec.structs.replace(params, prompt_logprobs=None)
            state.stage = "prefill"
            attempt_id = state.new_attempt()
            res = p = None  # None: the decode worker prefills itself
            got_at = 0.0  # when prefill's result came (router clock)
            if len(prompt_ids) + len(before) <= self.cfg.max_local_prefill_tokens:
                self.metrics.local_prefills.inc()  # short: no transfer is worth its cost
            else:
                try:
                    res, p = await self._prefill(state, attempt_id, prompt_ids, before, sp, avoid)
                    got_at = time.monotonic()
                except NoPrefillWorker:  # decode-only fallback
                    self.metrics.retries.labels("decode_local").inc()
            if res is not None:
                if state.queued_s is None:  # the first prompt's, not a re-prefill's
                    state.queued_s, state.cached_tokens = res.queued_s, res.cached_tokens
                    self.metrics.queued(res.queued_s)
                produced.append(res.first_token)
                if fork is not None and res.finish_reason is not None:
                    fork.give_up()  # ended at its first token: nothing to fork from
                lps = [res.logprobs] if res.logprobs is not None else None
                yield Delta([res.first_token], res.finish_reason, lps, res.prompt_logprobs)
                if res.finish_reason is not None:
                    return
                if sp.prompt_logprobs is not None:  # computed by prefill, not again on decode
                    sp = msgspec.structs.replace(sp, prompt_logprobs=None)
            state.stage = "decode"
            got_tokens = False
            try:
                async for delta in self._decode(
                    state, attempt_id, prompt_ids, before, res, got_at, p, sp, lost, fork
                ):
                    if not got_tokens and p is not None:  # its KV came through
                        self.prefill.transfer_ok(p)
                    got_tokens = True
                    produced.extend(delta.tokens)
                    yield delta
                    if delta.finish_reason is not None:
                        return
                raise WorkerError("decode stream ended without a finish reason")
            except TransferError as e:
                if got_tokens:
                    raise Unavailable("KV transfer failed after tokens were sent") from None
                if p is not None and isinstance(e, (TransferTimeout, TransferFailed)):
                    # Decode may not reach it (an expired lease or a full pool says nothing
                    # of that): new requests may avoid it for a while.
                    self.prefill.transfer_failed(p)
                self._retry(state, "transfer", e, f"KV transfer failed {state.retries + 1} times")
                if p is not None:
                    avoid.add(p)  # re-prefill elsewhere while another replica is healthy
            except WORKER_LOST as e:
                if migrations >= self.cfg.max_migrations:
                    log.warning(
                        "request %s: decode lost after %d migrations: %r",
                        state.request_id,
                        migrations,
                        e,
                    )
                    raise Unavailable(f"decode failed after {migrations} migrations") from None
                migrations += 1
                self.metrics.migrations.inc()
                log.warning(
                    "request %s: decode lost after %d tokens (%r); migrating",
                    state.request_id,
                    len(produced),
                    e,
                )

    async def _prefill(
        self,
        state: RequestState,
        attempt_id: str,
        prompt_ids: list[int],
        before: list[int],
        sp: SamplingParams,
        avoid: set[int],
    ):
        """Prefill prompt + `before` (tokens produced so far) on the least-loaded
        healthy replica (other than those in `avoid` while there are others),
        retrying others on failure. Returns (result, replica)."""
        n = len(prompt_ids) + len(before)
        tried: set[int] = set()
        while True:
            i = self.prefill.pick(exclude=tried, avoid=avoid)
            if i is None:
                if not self.prefill.healthy_count():
                    raise NoPrefillWorker()
                raise Unavailable("no prefill worker could take the request")
            state.prefills.add((i, attempt_id))
            with self.prefill.hold(i, n):
                try:
                    left = self.remaining(state)  # before submitting: it may raise
                    call = self.prefill.handle(i).prefill.remote(attempt_id, prompt_ids, sp, before)
                    return await self.prefill.call(i, call, left), i
                except WORKER_LOST + (TransferError,) as e:
                    tried.add(i)
                    self.prefill.handle(i).release.remote(attempt_id)
                    self._retry(state, "prefill", e, "no prefill worker could take the request")

    async def _decode(
        self,
        state: RequestState,
        attempt_id: str,
        prompt_ids: list[int],
        before: list[int],
        res,
        got_at: float,
        p: int | None,
        sp: SamplingParams,
        lost: set[int],
        fork: Fork | None = None,
    ) -> AsyncIterator[Delta]:
        """Decode on the healthy replica with the most free blocks, other than those
        this request was lost on (`lost`, added to here) while another is healthy: a
        migration must not land on the replica that just failed it, which this
        router's health poller may not have marked yet."""
        i = self.decode.pick(avoid=lost)
        if i is None:
            raise Unavailable("no healthy decode worker")

        def submit(chan: OutputChannel):
            # Time left, not a time stamp: the worker's clock is never compared with ours.
            left = self.remaining(state)
            h = self.decode.handle(i)  # now: the actor may have been found again meanwhile
            if res is None:
                if fork is not None:  # prefilled on decode: nothing pulled to fork from
                    fork.give_up()
                return h.generate_local.remote(attempt_id, chan.id, prompt_ids, sp, left, before)
            handle = res.handle
            if handle.ttl_s > 0:  # what is left of the lease, counted on our clock
                handle = msgspec.structs.replace(
                    handle, ttl_s=max(0.0, handle.ttl_s - (time.monotonic() - got_at))
                )
            ref = h.generate.remote(
                attempt_id,
                chan.id,
                prompt_ids,
                res.first_token,
                sp,
                handle,
                left,
                self.prefill.handle(p),
                before,
            )
            if fork is not None and not before:  # the other choices fork from this pull
                fork.announce(i, attempt_id)
            return ref

        async for item in self._on_decode(i, state, attempt_id, submit, lost):
            yield item

    async def _on_decode(
        self,
        i: int,
        state: RequestState,
        attempt_id: str,
        submit: Callable[[OutputChannel], object],
        lost: set[int],
    ) -> AsyncIterator[Delta]:
        """Attempt `attempt_id` on decode replica i, through its output channel:
        `submit(chan)` sends the call; a replica lost meanwhile goes into `lost`."""
        state.decodes.add((i, attempt_id))

        def wait(fn):
            left = self.remaining(state)  # before fn(): it may raise
            return self.decode.call(i, fn(), left)

        with self.decode.hold(i):
            try:
                chan = await wait(lambda: self.channel(i))
                async for item in chan.stream(attempt_id, lambda: submit(chan), wait):
                    yield item
            except WORKER_LOST:
                lost.add(i)
                raise

    def release(self, state: RequestState) -> None:
        """Backstop release on every worker the request touched; idempotent there."""
        last = f"{state.request_id}-{state.attempts - 1}"
        for i, attempt_id in state.prefills:
            self.prefill.handle(i).release.remote(attempt_id)
        for i, attempt_id in state.decodes:
            if not (state.worker_done and attempt_id == last):
                self.decode.handle(i).abort.remote(attempt_id)
