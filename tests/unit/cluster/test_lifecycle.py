"""One request's lifecycle (cluster/lifecycle.py) against in-process stand-ins for the
worker actors: the real `WorkerPool`s, output channels (`DecodeChannels`,
`OutputChannel`), detokenizer and metrics, with fake prefill and decode actors that
keep the leases and sequences a real worker would hold, and fail on cue.

Each test ends with nothing held: no lease on a prefill stand-in, no sequence on a
decode stand-in, no load counted in a pool, no entry in the request table."""

from __future__ import annotations

import asyncio

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cluster.channels import DecodeChannels
from cluster.config import RouterConfig
from cluster.lifecycle import Fork, Lifecycle, Unavailable
from cluster.metrics import RouterMetrics
from cluster.pool import WorkerPool
from transfer.handle import KVHandle, TransferFailed
from wire.api import Delta, PrefillResult, SequenceFailed, WorkerError
from wire.sampling_params import SamplingParams

OUTPUT = "the quick brown fox jumps"  # what the stand-in model writes, whatever the prompt


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE, one token per byte (built inline, no download)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t)


class _Method:
    """`actor.method.remote(...)` (and `.options(...)`) of a stand-in actor."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)

    def options(self, **_):
        return self


async def _value(x):
    return x


class FakePrefill:
    """Prefills by writing OUTPUT's next token; holds a lease per attempt until the
    decode stand-in claims it or the router releases it. `fail`: attempts to refuse."""

    def __init__(self, model: list[int], fail: int = 0):
        self.model, self.fail = model, fail
        self.leases: set[str] = set()
        self.calls: list[str] = []
        self.prefill = _Method(self._prefill)
        self.release = _Method(self.leases.discard)

    async def _prefill(self, attempt_id, prompt_ids, sp, before):
        self.calls.append(attempt_id)
        await asyncio.sleep(0.01)
        if self.fail:
            self.fail -= 1
            raise WorkerError("prefill refused")
        n = len(before)
        self.leases.add(attempt_id)
        done = "length" if n + 1 >= sp.max_tokens else None
        handle = KVHandle(attempt_id, "nixl", len(prompt_ids) + n, [], ttl_s=30.0)
        return PrefillResult(attempt_id, self.model[n], done, None if done else handle)


class FakeDecode:
    """Decodes OUTPUT token by token onto the router's output channel. `fail_pulls`:
    pulls that fail (TransferFailed); `die_after`: tokens after which the worker is
    lost mid-stream; `refuse`: the sequence fails alone (SequenceFailed)."""

    def __init__(self, model: list[int], step_s: float = 0.005):
        self.model, self.step_s = model, step_s
        self.fail_pulls, self.die_after, self.refuse = 0, None, False
        self.refuse_with: BaseException | None = None
        self.sequences: set[str] = set()
        self.streams: dict[str, asyncio.Queue] = {}
        self.outputs = _Method(self._outputs)
        self.generate = _Method(self._generate)
        self.generate_local = _Method(self._generate_local)
        self.generate_fork = _Method(self._generate_fork)
        self.forks: list[str] = []  # generate_fork calls (attempt ids)
        self.refuse_forks = False
        self.abort = _Method(self.sequences.discard)
        self.started: list[tuple[str, list[int]]] = []  # (attempt id, tokens before)

    async def _outputs(self, channel):
        q = self.streams[channel] = asyncio.Queue()
        yield _value([])  # open
        while True:
            yield _value(await q.get())

    async def _generate(self, attempt_id, channel, prompt_ids, first, sp, handle, left, p, before):
        await asyncio.sleep(0.01)
        if self.fail_pulls:
            self.fail_pulls -= 1
            raise TransferFailed("pull failed")
        p.leases.discard(attempt_id)  # the pull claimed it and told prefill it is done
        return await self._decode(attempt_id, channel, sp, len(before) + 1)

    async def _generate_fork(self, attempt_id, channel, parent, prompt_ids, sp, left):
        self.forks.append(attempt_id)
        await asyncio.sleep(0.01)
        if self.refuse_forks:
            raise WorkerError("no output channel here")
        return await self._decode(attempt_id, channel, sp, 0)  # its first token computed here

    async def _generate_local(self, attempt_id, channel, prompt_ids, sp, left, before):
        return await self._decode(attempt_id, channel, sp, len(before))

    async def _decode(self, attempt_id, channel, sp, n):
        self.started.append((attempt_id, self.model[: n - 1]))
        if self.refuse:
            raise SequenceFailed("every token banned", 400)
        if self.refuse_with is not None:
            raise self.refuse_with
        self.sequences.add(attempt_id)
        try:
            sent = 0
            while n < sp.max_tokens:
                await asyncio.sleep(self.step_s)
                if attempt_id not in self.sequences:
                    return "abort"
                if self.die_after is not None and sent >= self.die_after:
                    self.die_after = None
                    raise WorkerError("decode worker died")
                n += 1
                sent += 1
                reason = "length" if n >= sp.max_tokens else None
                self.streams[channel].put_nowait([(attempt_id, Delta([self.model[n - 1]], reason))])
            return "length"
        finally:
            self.sequences.discard(attempt_id)


class Cluster:
    """Two prefill and two decode stand-ins behind the router's real pools and channels."""

    def __init__(self, tok, **router):
        self.model = tok.encode(OUTPUT)
        self.prefills = [FakePrefill(self.model), FakePrefill(self.model)]
        self.decodes = [FakeDecode(self.model), FakeDecode(self.model)]
        metrics = RouterMetrics()
        self.prefill = WorkerPool("prefill", self.prefills, 5.0, metrics)
        self.decode = WorkerPool("decode", self.decodes, 5.0, metrics)
        self.channels = DecodeChannels(self.decode, 10_000, 0.05)
        cfg = RouterConfig(**{"request_timeout_s": 10.0, **router})
        self.lifecycle = Lifecycle(cfg, tok, self.prefill, self.decode, self.channels.get, metrics)
        self.metrics = metrics

    async def complete(self, max_tokens: int = len(OUTPUT), prompt: str = "hi"):
        """(text, finish reason, completion tokens) of one request."""
        prompt_ids = list(prompt.encode())
        state = self.lifecycle.admit(f"req{id(prompt_ids)}", len(prompt_ids))
        text, reason, n = "", None, 0
        async for piece, reason, n, _ in self.lifecycle.run(
            state, prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)
        ):
            text += piece
        return text, reason, n

    def held(self) -> dict:
        return {
            "leases": sum(len(p.leases) for p in self.prefills),
            "sequences": sum(len(d.sequences) for d in self.decodes),
            "load": sum(r.load for pool in (self.prefill, self.decode) for r in pool.replicas),
            "requests": len(self.lifecycle.requests),
        }

    def retries(self, kind: str) -> float:
        return self.metrics.retries.labels(kind)._value.get()


NOTHING = {"leases": 0, "sequences": 0, "load": 0, "requests": 0}


def run(cluster: Cluster, body):
    """Run `body(cluster)` with the router's channel task, then let released calls land."""

    async def main():
        keeper = asyncio.create_task(cluster.channels.keep())
        try:
            return await asyncio.wait_for(body(cluster), 10)
        finally:
            await asyncio.sleep(0.05)
            keeper.cancel()

    return asyncio.run(main())


def test_a_stop_string_inside_a_merged_delta_cuts_its_tokens_and_logprobs(tok):
    """Tokens that came at once (stream_interval, a lagging router) are checked one by
    one: those after the token completing the stop string are dropped, their logprobs
    and usage too."""
    c = Cluster(tok)
    ids = tok.encode("abXYZcd")
    lp = [(-0.5, 1, [], [])] * len(ids)

    async def tokens(state, prompt_ids, params, *fork):
        yield Delta(ids, None, lp)

    c.lifecycle._tokens = tokens

    async def run():
        state = c.lifecycle.admit("stop", 2)
        sp = SamplingParams(max_tokens=20, stop=["XY"], logprobs=0)
        return [e async for e in c.lifecycle.run(state, list(b"hi"), sp)]

    ((text, reason, n_out, lps),) = asyncio.run(run())
    assert (text, reason, n_out) == ("ab", "stop", 4)
    assert [t for t, _ in lps] == ids[:4]


async def _choices(c: Cluster, n: int, max_tokens: int) -> list[str]:
    """One prompt's n choices (as the router runs them: one Fork), their texts."""
    prompt_ids, fork = list(b"a prompt for n choices"), Fork()

    async def one(j: int) -> str:
        state = c.lifecycle.admit(f"n-c{j}", len(prompt_ids))
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return "".join([e[0] async for e in c.lifecycle.run(state, prompt_ids, sp, fork, j)])

    return await asyncio.gather(*[one(j) for j in range(n)])


def test_n_choices_share_one_prefill_and_fork_on_its_decode_replica(tok):
    c = Cluster(tok)
    assert run(c, lambda c: _choices(c, 3, 8)) == [OUTPUT[:8]] * 3
    assert sum(len(p.calls) for p in c.prefills) == 1  # one prefill, one KV handle
    (d,) = [d for d in c.decodes if d.forks]  # the others went where choice 0 decodes
    assert len(d.forks) == 2 and c.held() == NOTHING


def test_choices_not_forked_are_served_alone_within_their_budgets(tok):
    """A refused fork costs neither a migration nor a retry (max_migrations 0 and
    max_retries 0 here): the choice is prefilled and decoded on its own."""
    c = Cluster(tok, max_migrations=0, max_retries=0)
    for d in c.decodes:
        d.refuse_forks = True
    assert run(c, lambda c: _choices(c, 3, 6)) == [OUTPUT[:6]] * 3
    assert sum(len(p.calls) for p in c.prefills) == 3 and c.held() == NOTHING
    assert c.retries("fork") == 2


def test_choice_0_ending_at_its_first_token_lets_the_others_go_at_once(tok):
    c = Cluster(tok)
    assert run(c, lambda c: _choices(c, 3, 1)) == [OUTPUT[:1]] * 3
    assert not any(d.forks for d in c.decodes) and c.held() == NOTHING


def test_a_request_goes_prefill_then_decode_and_leaves_nothing_held(tok):
    c = Cluster(tok)
    text, reason, n = run(c, lambda c: c.complete())
    assert (text, reason, n) == (OUTPUT, "length", len(OUTPUT))
    assert c.held() == NOTHING
    assert [len(p.calls) for p in c.prefills] == [1, 0]


def test_a_failed_prefill_is_retried_on_the_other_replica(tok):
    c = Cluster(tok, max_retries=1)
    c.prefills[0].fail = 1
    assert run(c, lambda c: c.complete())[0] == OUTPUT
    first, second = (p.calls for p in c.prefills)
    assert len(first) == 1 and first == second  # the same attempt, on the other replica
    assert c.retries("prefill") == 1 and c.held() == NOTHING


def test_a_failed_transfer_re_prefills_elsewhere_under_a_new_attempt_id(tok):
    c = Cluster(tok, max_retries=1)
    c.decodes[0].fail_pulls = 1
    assert run(c, lambda c: c.complete())[0] == OUTPUT
    first, second = c.prefills[0].calls, c.prefills[1].calls
    assert len(first) == 1 and len(second) == 1  # the replica whose KV failed is avoided
    assert first[0].endswith("-0") and second[0].endswith("-1")
    assert c.retries("transfer") == 1 and c.held() == NOTHING  # the failed lease released


def test_new_requests_avoid_a_prefill_replica_whose_pulls_keep_failing(tok):
    """Decode cannot pull from prefill 0 (a partition the router's own polls do not see:
    prefill 0 still answers them). One failed pull may be chance: the next request still
    goes there. After two in a row, new requests go to prefill 1 at once, instead of each
    waiting out its pull first; once the avoidance has passed, prefill 0 is tried again,
    and a pull that succeeds ends it."""
    c = Cluster(tok, max_retries=2)
    first, second = c.prefills
    seen = []

    async def requests(c):
        for n in range(4):
            if n < 2:
                c.decodes[0].fail_pulls = 1
            if n == 3:
                c.prefill.replicas[0].transfer_avoid_until = 0.0  # the avoidance has passed
            assert (await c.complete())[0] == OUTPUT
            seen.append((len(first.calls), len(second.calls)))

    run(c, requests)
    # Failed on 0, then on 1 (twice); straight to 1; then 0 again.
    assert seen == [(1, 1), (2, 2), (2, 3), (3, 3)], seen
    assert c.prefill.replicas[0].transfer_fails == 0 and c.held() == NOTHING


def test_prefill_and_transfer_failures_share_one_retry_budget(tok):
    """router.max_retries counts every retry of the request: one spent on a refused
    prefill leaves none for a failed transfer, which is then a 503."""
    c = Cluster(tok, max_retries=1)
    c.prefills[0].fail = 1
    c.decodes[0].fail_pulls = 1
    with pytest.raises(Unavailable):
        run(c, lambda c: c.complete())
    assert c.held() == NOTHING


def test_no_retry_left_is_a_503_and_releases_every_attempt(tok):
    c = Cluster(tok, max_retries=2)
    for p in c.prefills:
        p.fail = 5
    with pytest.raises(Unavailable):
        run(c, lambda c: c.complete())
    assert sum(len(p.calls) for p in c.prefills) == 2  # one per replica, then none untried
    assert c.held() == NOTHING


def test_a_lost_decode_migrates_with_its_tokens_to_a_replica_it_was_not_lost_on(tok):
    """Decode 0 dies after 4 tokens. Its replica still looks healthy to the pool (no
    poll has run), yet the migration goes to decode 1, re-prefilling prompt + the
    tokens the router got so far (those still in flight from the dead worker are
    written again); the client sees one uninterrupted text."""
    c = Cluster(tok, max_migrations=1)
    c.decodes[0].die_after = 4
    text, reason, n = run(c, lambda c: c.complete())
    assert (text, reason, n) == (OUTPUT, "length", len(OUTPUT))
    assert [a for a, _ in c.decodes[0].started] == [c.decodes[0].started[0][0]]
    ((attempt, before),) = c.decodes[1].started
    assert attempt.endswith("-1") and 2 <= len(before) <= 5 and before == c.model[: len(before)]
    assert c.metrics.migrations._value.get() == 1 and c.held() == NOTHING


def test_a_decode_lost_past_max_migrations_is_a_503(tok):
    c = Cluster(tok, max_migrations=0)
    c.decodes[0].die_after = 2
    with pytest.raises(Unavailable):
        run(c, lambda c: c.complete())
    assert c.held() == NOTHING


def test_no_prefill_worker_falls_back_to_decode_prefilling_itself(tok):
    c = Cluster(tok)
    for r in c.prefill.replicas:
        r.healthy = False
    assert run(c, lambda c: c.complete())[0] == OUTPUT
    assert c.retries("decode_local") == 1 and c.held() == NOTHING


def _client_leaves_after_two_chunks(c: Cluster):
    async def body(c):
        prompt_ids = list(b"hi")
        state = c.lifecycle.admit("gone", len(prompt_ids))
        events = c.lifecycle.run(state, prompt_ids, SamplingParams(max_tokens=20))
        for _ in range(2):
            await events.__anext__()
        assert c.held()["sequences"] == 1
        await events.aclose()

    return body


async def _past_its_deadline(c: Cluster):
    for d in c.decodes:
        d.step_s = 0.2
    await c.complete()


async def _sequence_failed(c: Cluster):
    for d in c.decodes:
        d.refuse = True
    await c.complete()


async def _ray_cancelled_first(c: Cluster):
    """Ray's TaskCancelledError from a worker call, before asyncio's cancellation."""
    from ray.exceptions import TaskCancelledError

    for d in c.decodes:
        d.refuse_with = TaskCancelledError()
    await c.complete()


async def _cancelled(c: Cluster):
    task = asyncio.create_task(c.complete())
    await asyncio.sleep(0.08)
    task.cancel()
    await task


@pytest.mark.parametrize(
    "exit_path,raises",
    [
        ("client-leaves", None),
        ("deadline", TimeoutError),
        ("sequence-failed", SequenceFailed),
        ("task-cancelled", asyncio.CancelledError),
        ("ray-cancelled-first", Exception),
    ],
)
def test_every_exit_path_releases_everything(tok, exit_path, raises):
    c = Cluster(tok, request_timeout_s=0.5 if exit_path == "deadline" else 10.0)
    body = {
        "client-leaves": _client_leaves_after_two_chunks(c),
        "deadline": _past_its_deadline,
        "sequence-failed": _sequence_failed,
        "task-cancelled": _cancelled,
        "ray-cancelled-first": _ray_cancelled_first,
    }[exit_path]
    if raises is None:
        run(c, body)
    else:
        with pytest.raises(raises):
            run(c, body)
    assert c.held() == NOTHING
    if exit_path in ("client-leaves", "task-cancelled", "ray-cancelled-first"):
        assert c.metrics.requests.labels("cancelled")._value.get() == 1  # not an error
