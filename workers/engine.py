"""Engine: a scheduler over `waiting` and `running` sequences plus one model
forward per step (continuous batching: sequences join and leave every step).

A step is either a prefill step (uncached tokens of waiting sequences under
`max_batched_tokens`, long prompts in chunks) or a decode step (one token for
every running sequence). When a running sequence needs a block and none is
free, the most recently admitted one is preempted: its blocks are freed and it
waits to be recomputed. Nothing here asserts on a full pool: work that does not
fit waits (`blocked`), and the thread that runs the engine sleeps until a free.

The engine is the one owner of its sequences and their blocks. `seqs` is the
request table: every sequence is in it from `add`/`add_pulled` until it ends
(finished, failed, aborted), whichever queue holds it, so nothing can be lost
between queues when a step raises (`fail_all` frees it all). Decode admission
of pulled KV lives here too (vLLM v1's "waiting for remote KV"): a pulled
request waits in `kv_waiting` for blocks, in order; `admit_pulls` allocates
them (PULLING) and the worker runs the transfer; `pull_done` puts it in the
batch, or frees its blocks, and only then: blocks a transfer may still write
are never freed, even when the request is aborted meanwhile.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from wire.api import TokenLogprobs
from workers.kv_cache import BlockManager, NoFreeBlocks
from workers.runner import ModelRunner
from workers.sampler import SampleError, logprobs_of, sample
from workers.sequence import ForkTooLate, SeqStatus, Sequence, finish_reason


@dataclass
class _Held:
    """Blocks of a failed pull that something may still write: out of the pool."""

    blocks: list[int]
    writers: int
    since: float


PROMPT_LOGPROB_ROWS = 512  # positions a step computes logits at for prompt logprobs


@dataclass
class StepOutput:
    seq: Sequence
    token: int  # -1 when no token was produced
    finish_reason: str | None  # "error" with `error` set when this sequence alone failed
    error: SampleError | None = None
    logprobs: TokenLogprobs | None = None  # the token's, when its params ask for them
    # With the first token of a prompt computed here whose params ask for them.
    prompt_logprobs: list[TokenLogprobs] | None = None


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        blocks: BlockManager,
        *,
        max_batched_tokens: int,
        max_running: int,
        prefill_only: bool = False,
        stall_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.runner = runner
        self.blocks = blocks
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        # prefill_only: a sequence leaves after its first token, keeping its
        # blocks; the caller (the prefill worker's KV sender) owns them from then on.
        self.prefill_only = prefill_only
        self.eos_ids = runner.args.eos_token_ids
        self.max_model_len = runner.max_model_len
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()  # each sequence's `arrival`, in order
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_waiting: deque[Sequence] = deque()
        self.num_pulling = 0  # PULLING sequences: each has a place in the batch kept for it
        self.held: dict[str, _Held] = {}  # request id -> blocks a failed pull may still write
        self._ended_early: dict[str, int] = {}  # writers that ended before their pull_done
        self.steps = 0  # progress counter a watchdog can read
        self.blocked = False  # the last step found work but no blocks for it
        # Blocked with nothing running for longer than this: stalled (see `stalled`).
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._idle_blocked_since: float | None = None
        self._last_step_at = 0.0
        self._finished_unscheduled: list[StepOutput] = []
        # Automatic prefix caching (when the block manager caches): prompt tokens asked
        # for, and how many of them were found cached.
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.preemptions = 0  # running sequences whose blocks were taken back, ever
        # Forks (`add_fork`): block copies (source, destination) the next forward makes
        # before it runs, by the forked sequence's id (each holds a reference on its
        # source until then), and forks that ended unforked, for their worker to fail.
        self._copies: dict[str, tuple[int, int]] = {}
        self.failed_forks: list[str] = []

    # ---- admission -------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; its uncached tokens get computed in prefill steps. With
        prefix caching it is hashed here, and reuses cached blocks when scheduled."""
        self._register(seq)
        seq.added_at = time.monotonic()
        if self.blocks.caching and seq.params.prompt_logprobs is None:
            # Every full block but the one of its last token (computed for its logits).
            # Not a prompt that asks for prompt logprobs: they need every position's
            # logits, which a cached block never computes.
            seq.block_hashes = self.blocks.prefix_hashes(
                seq.token_ids,
                (seq.num_tokens - 1) // self.blocks.block_size,
                seq.params.cache_salt,
            )
        self._enqueue(seq)

    def add_pulled(self, seq: Sequence) -> None:
        """Decode: a request whose KV (every token but the last, which prefill sampled)
        is to be pulled from prefill. It waits, in order, for blocks (`admit_pulls`)."""
        self._register(seq)
        seq.status = SeqStatus.WAITING_FOR_BLOCKS
        self.kv_waiting.append(seq)

    def admit_pulls(self) -> list[Sequence]:
        """Give blocks to waiting pulled requests, oldest first, while they fit with
        a block of headroom per running sequence (so admitting never preempts), the
        batch has a place for each when its KV arrives, and nothing older waits. (A
        pulled sequence parked in `waiting` with its KV could hold the blocks a
        preempted one needs to be recomputed, with nothing running to free any.)
        Each returned sequence is PULLING: the caller transfers into its blocks and
        must call `pull_done` once the transfer has ended, whatever the outcome."""
        admitted = []
        # Older work first: a sequence waiting to be (re)computed here (preempted, or
        # pulled but not yet in the batch) gets free blocks before any newer pull, and
        # a pull before any newer prompt decode prefills itself (router.max_local_prefill_tokens).
        oldest_waiting = min((w.arrival for w in self.waiting), default=math.inf)
        while self.kv_waiting and self.kv_waiting[0].arrival < oldest_waiting:
            seq = self.kv_waiting[0]
            n = self.blocks.blocks_for(seq.num_tokens - 1)
            if (
                self.blocks.num_free < n + len(self.running)
                or len(self.running) + self.num_pulling >= self.max_running
            ):
                break
            seq.block_table = self.blocks.allocate(n)
            seq.status = SeqStatus.PULLING
            self.num_pulling += 1
            self.kv_waiting.popleft()
            admitted.append(seq)
        return admitted

    def add_fork(self, seq: Sequence, parent_id: str) -> None:
        """Decode: another choice of the pulled request `parent_id` (n > 1), with the same
        tokens but the one prefill sampled for the parent. It is forked from the parent's
        KV (`_fork`): when that lands (`pull_done`), or at once if it has landed and the
        parent still holds it (running, or queued with its prompt cached). It shares the
        parent's full blocks and gets its own copy of the block its last token is in,
        which it recomputes for its own first token (positions after it in the copy are
        the parent's, overwritten as the fork writes its own and never read before).
        ForkTooLate when there is nothing to fork from (the parent ended, was preempted,
        or no block is free): the caller serves it on its own."""
        parent = self.seqs.get(parent_id)
        if parent is None or parent.fork_of is not None:
            raise ForkTooLate(f"{seq.request_id}: {parent_id} is not decoding here")
        if (
            seq.token_ids != parent.token_ids[: seq.num_tokens]
            or seq.num_prompt_tokens != parent.num_prompt_tokens
            or seq.num_output
        ):
            raise ValueError(f"{seq.request_id} is not a fork of {parent_id}: other tokens")
        pending = parent.status in (SeqStatus.WAITING_FOR_BLOCKS, SeqStatus.PULLING)
        landed = parent.status in (SeqStatus.RUNNING, SeqStatus.WAITING) and (
            parent.num_cached >= seq.num_tokens
        )
        if not (pending or landed):
            raise ForkTooLate(f"{seq.request_id}: {parent_id} holds no KV to fork from")
        self._register(seq)
        # It ranks as its parent: older than any pull after it, so it never waits, with
        # the blocks it shares, behind one that needs them (admit_pulls, _make_room).
        seq.arrival = parent.arrival
        seq.added_at = time.monotonic()
        if pending:
            seq.status = SeqStatus.WAITING_FOR_BLOCKS  # in no queue: it waits on its parent
            seq.fork_of = parent
            parent.forks.append(seq)
        elif not self._fork(parent, seq):
            del self.seqs[seq.request_id]
            raise ForkTooLate(f"{seq.request_id}: no KV block free for its copy")

    def _fork(self, parent: Sequence, seq: Sequence) -> bool:
        """`seq` joins `waiting` on `parent`'s landed KV; False when no block is free."""
        last = (seq.num_tokens - 1) // self.blocks.block_size  # holds its last token
        try:
            (copy,) = self.blocks.allocate(1)
        except NoFreeBlocks:
            return False
        src = parent.block_table[last]
        self.blocks.share([*parent.block_table[:last], src])  # src: until it is copied
        self._copies[seq.request_id] = (src, copy)
        seq.block_table = [*parent.block_table[:last], copy]
        seq.num_cached = seq.num_tokens - 1
        seq.fork_of = None
        seq.status = SeqStatus.WAITING
        # In arrival order (its parent's), ahead of newer prompts: behind them, it would
        # wait for a newer pull that waits for it (admit_pulls), a wedge.
        at = next((k for k, w in enumerate(self.waiting) if w.arrival > seq.arrival), None)
        self.waiting.insert(len(self.waiting) if at is None else at, seq)
        return True

    def _fail_forks(self, seq: Sequence) -> None:
        forks, seq.forks = seq.forks, []
        for f in forks:
            f.fork_of = None
            self._drop(f)
            self.failed_forks.append(f.request_id)

    def pull_done(self, request_id: str, ok: bool, writers: int = 0) -> None:
        """The pull into a PULLING sequence's blocks has ended. On success the sequence
        joins the batch; otherwise, or if it was aborted meanwhile, it ends here and its
        blocks are freed, unless `writers` (> 0) things may still write them (a READ
        NIXL could not release, a transfer thread past its deadline): then the blocks
        are held out of the pool until `writer_done` has been called that many times."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status is not SeqStatus.PULLING:
            return
        self.num_pulling -= 1
        if ok:  # its forks share the landed KV, even when the parent itself has left
            forks, seq.forks = seq.forks, []
            for f in forks:
                if not self._fork(seq, f):
                    seq.forks.append(f)
        self._fail_forks(seq)
        if seq.aborted or not ok:
            writers -= self._ended_early.pop(request_id, 0)
            if writers > 0:
                self.held[request_id] = _Held(seq.block_table, writers, self._clock())
                seq.block_table = []
            self._drop(seq)
            return
        seq.num_cached = seq.num_tokens - 1
        self._enqueue(seq)

    def writer_done(self, request_id: str) -> None:
        """One of the writers a failed pull left on its blocks has ended; after the
        last, the blocks go back to the pool."""
        h = self.held.get(request_id)
        if h is None:
            # Its pull has not ended here yet (the writer's end came first, by another
            # path): counted against the writers `pull_done` will name.
            if self.seqs.get(request_id) is not None:
                self._ended_early[request_id] = self._ended_early.get(request_id, 0) + 1
            return
        h.writers -= 1
        if h.writers <= 0:
            del self.held[request_id]
            self.blocks.free(h.blocks)

    @property
    def held_blocks(self) -> int:
        return sum(len(h.blocks) for h in self.held.values())

    @property
    def fault(self) -> str:
        """Why this engine cannot serve and wants its process restarted ("" if none):
        `stalled`, or blocks held for a writer that has not ended in `stall_after_s`
        (NIXL will not release a READ: the memory is not ours to reuse)."""
        if self.stalled:
            return f"blocked with nothing running for over {self.stall_after_s:.0f}s"
        if self.stall_after_s is not None and self.held:
            oldest = min(h.since for h in self.held.values())
            if self._clock() - oldest > self.stall_after_s:
                return (
                    f"{self.held_blocks} KV blocks held for over {self.stall_after_s:.0f}s "
                    "under transfers that have not ended"
                )
        return ""

    def _register(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs or seq.request_id in self.held:
            raise ValueError(f"request {seq.request_id} is already in this engine")
        self.seqs[seq.request_id] = seq
        seq.arrival = next(self._arrivals)

    def _enqueue(self, seq: Sequence) -> None:
        """A sequence whose KV is cached except the last token (pulled from a
        prefill worker) goes straight to `running` when the batch has room;
        otherwise it waits, keeping its KV, and joins later as a 1-token step."""
        if (
            not self.prefill_only
            and 0 < seq.num_cached == seq.num_tokens - 1
            and len(self.running) < self.max_running
        ):
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        else:
            seq.status = SeqStatus.WAITING
            self.waiting.append(seq)

    # ---- ending ----------------------------------------------------------

    def abort(self, request_id: str) -> Sequence | None:
        """End a request here, freeing its blocks (idempotent). A PULLING one keeps
        its blocks until `pull_done`: a transfer may still be writing them."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        if seq.status is SeqStatus.PULLING:
            seq.aborted = True
            return seq
        self._drop(seq)
        return seq

    def fail_all(self) -> list[Sequence]:
        """After a failed step: end every sequence (PULLING ones as `abort` does)."""
        seqs = list(self.seqs.values())
        for s in seqs:
            self.abort(s.request_id)
        return seqs

    def _drop(self, seq: Sequence) -> None:
        """Out of every queue and the table; blocks back to the pool."""
        if seq.status is SeqStatus.RUNNING and seq in self.running:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.WAITING_FOR_BLOCKS and seq in self.kv_waiting:
            self.kv_waiting.remove(seq)
        if self.seqs.get(seq.request_id) is seq:
            del self.seqs[seq.request_id]
        self._ended_early.pop(seq.request_id, None)
        if seq.fork_of is not None:  # a fork still waiting on its parent
            seq.fork_of.forks.remove(seq)
            seq.fork_of = None
        self._fail_forks(seq)
        self._release_blocks(seq)
        seq.status = SeqStatus.FINISHED

    def _hand_over(self, seq: Sequence) -> None:
        """prefill_only: the sequence leaves with its blocks, which its caller now owns."""
        del self.seqs[seq.request_id]
        seq.status = SeqStatus.FINISHED

    # ---- what others may read (through the owner's snapshot) -------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _watch_for_stall(self) -> None:
        """When no step can move (blocked, nothing running, no pull in flight: those end
        by their own deadlines), start the clock `stalled` reads; anything else stops it.
        Steps run back to back while `waiting` holds work, so a gap between two means the
        engine was idle (or its process stopped) meanwhile: the clock starts again."""
        now = self._clock()
        idle_between = now - self._last_step_at > 1.0
        self._last_step_at = now
        if not self._stuck_now():
            self._idle_blocked_since = None
        elif self._idle_blocked_since is None or idle_between:
            self._idle_blocked_since = now

    def _stuck_now(self) -> bool:
        return self.blocked and bool(self.waiting) and not self.running and not self.num_pulling

    @property
    def stalled(self) -> bool:
        """Work waits, blocked, with nothing running and no pull in flight, and has for
        longer than `stall_after_s`. Every block a queued sequence could give back has
        been given (`_make_room`) and pulls end by their own deadlines, so what still
        holds the blocks is outside the scheduler's reach (a leak, a READ that never
        ends): the worker reports itself stalled rather than waiting, and the watchdog
        restarts it. Off (None) for prefill, whose blocks wait on leases that expire
        by themselves."""
        since = self._idle_blocked_since
        return (
            self.stall_after_s is not None
            and since is not None
            and self._stuck_now()
            and self._clock() - since > self.stall_after_s
        )

    @property
    def num_queued_tokens(self) -> int:
        return sum(s.num_tokens - s.num_cached for s in self.waiting)

    # ---- scheduling --------------------------------------------------------

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        try:
            seq.block_table.extend(self.blocks.allocate(need))
        except NoFreeBlocks:
            return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence's blocks back; it waits at the head to be recomputed."""
        self.running.remove(seq)
        self._release_blocks(seq)
        self.preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _release_blocks(self, seq: Sequence) -> None:
        copy = self._copies.pop(seq.request_id, None)
        if copy is not None:  # forked, not copied yet: the copy is not needed now
            self.blocks.free([copy[0]])
        if seq.block_table:
            self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0

    def _make_room(self, head: Sequence, num_tokens: int) -> bool:
        """Nothing runs, so no step will free a block: sequences queued behind `head`
        that hold blocks (a chunked prompt part-way, work put back after a failed step)
        give them back, newest first, until `head` can have `num_tokens`. What holds
        blocks either makes progress or gives them back: this is what keeps a
        preempted sequence at the head from waiting for blocks that only the
        sequences behind it hold (a wedge the watchdog read as waiting)."""
        for seq in sorted(self.waiting, key=lambda s: s.arrival, reverse=True):
            if self._grow(head, num_tokens):
                return True
            if seq is not head and seq.block_table:
                self._release_blocks(seq)
        return self._grow(head, num_tokens)

    def _schedule_prefill(self) -> tuple[list[Sequence], list[int]]:
        seqs, num_new, budget = [], [], self.max_batched_tokens
        # Prompt logprobs need logits at every position (rows x vocab floats): at most
        # PROMPT_LOGPROB_ROWS of them a step, a long prompt's over several chunks.
        rows = PROMPT_LOGPROB_ROWS
        # A place in the batch is kept for each pull in flight (`admit_pulls`): taking it,
        # a prompt would leave the pulled request parked in `waiting` holding its blocks.
        while (
            self.waiting
            and budget > 0
            and len(self.running) + self.num_pulling + len(seqs) < self.max_running
        ):
            seq = self.waiting[0]
            # One arrival order across `waiting` and `kv_waiting`: a prompt newer than a
            # pull still waiting for blocks waits behind it, so a flow of short prompts
            # cannot keep taking the blocks the pull needs (`admit_pulls`).
            if self.kv_waiting and self.kv_waiting[0].arrival < seq.arrival:
                break
            if self.blocks.blocks_for(seq.num_tokens) > self.blocks.num_blocks:
                # Cannot fit even alone in the whole pool: end it instead of waiting forever.
                self.waiting.popleft()
                seq.finish_reason = "length"
                self._drop(seq)
                self._finished_unscheduled.append(StepOutput(seq, -1, "length"))
                continue
            # Prefix caching: only a sequence about to run takes references on cached
            # blocks (queued ones hold none, so they never pin what the head needs).
            hit = self.blocks.caching and not seq.block_table and seq.num_cached == 0
            if hit:
                seq.block_table = self.blocks.match(seq.block_hashes)
                seq.num_cached = len(seq.block_table) * self.blocks.block_size
            n = min(seq.num_tokens - seq.num_cached, budget)
            wants_rows = _wants_prompt_logprobs(seq)
            if wants_rows:
                if rows <= 0:
                    break
                n = min(n, rows)
            fits = self._grow(seq, seq.num_cached + n)
            if not fits and not self.running and not seqs:
                fits = self._make_room(seq, seq.num_cached + n)
            if not fits:
                if hit and seq.block_table:  # give the references back while it waits
                    self._release_blocks(seq)
                break
            if hit:
                self.prefix_queried_tokens += seq.num_tokens
                self.prefix_hit_tokens += seq.num_cached
            if seq.queued_s is None:  # first scheduled: what vLLM reports as queue time
                seq.queued_s = time.monotonic() - seq.added_at
                seq.cached_tokens = seq.num_cached
            self.waiting.popleft()
            seqs.append(seq)
            num_new.append(n)
            budget -= n
            rows -= n if wants_rows else 0
        return seqs, num_new

    def _schedule_decode(self) -> list[Sequence]:
        """One token for every running sequence, oldest first; when blocks run out the
        newest arrival is preempted (recomputed later), as vLLM's FCFS scheduler does."""
        scheduled = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in self.running:
                continue  # preempted below to make room for an older one
            while not self._grow(seq, seq.num_tokens):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        return [s for s in scheduled if s in self.running]

    def step(self) -> list[StepOutput]:
        """Run one batch; return the tokens sampled this step (and the sequences
        that ended without one). A sequence that cannot be sampled ends alone with
        finish_reason "error"; an exception out of here (the forward failed) leaves
        every sequence in `seqs` for `fail_all`."""
        self._finished_unscheduled = []
        seqs, num_new = self._schedule_prefill()
        is_prefill = bool(seqs)
        if not is_prefill:
            seqs = self._schedule_decode()
            num_new = [1] * len(seqs)
        outputs = self._finished_unscheduled
        self.blocked = not seqs and bool(self.waiting)
        self._watch_for_stall()
        if not seqs:
            return outputs
        every = [i for i, s in enumerate(seqs) if is_prefill and _wants_prompt_logprobs(s)]
        starts = {i: seqs[i].num_cached for i in every}  # where their rows begin
        copies, self._copies = self._copies, {}
        try:
            logits, whole = self.runner.forward(seqs, num_new, every, list(copies.values()))
        except BaseException:
            if is_prefill:  # taken out of `waiting` for this step: back where they were
                self.waiting.extendleft(reversed(seqs))
            raise
        finally:
            if copies:  # made (or the step failed, and every sequence with it)
                self.blocks.free([src for src, _ in copies.values()])
        self.steps += 1
        for i in every:
            _add_prompt_logprobs(seqs[i], whole[i], starts[i])
        for s, n in zip(seqs, num_new):
            s.num_cached += n
            if is_prefill and s.block_hashes:  # its prompt blocks this step completed
                bs = self.blocks.block_size
                for j in range(
                    (s.num_cached - n) // bs, min(len(s.block_hashes), s.num_cached // bs)
                ):
                    self.blocks.register(s.block_table[j], s.block_hashes[j])
        # Only sequences whose whole context is now cached produce a token;
        # a partial chunk of a long prompt waits for its next chunk.
        done = [i for i, s in enumerate(seqs) if s.num_cached == s.num_tokens]
        for i, s in enumerate(seqs):
            if is_prefill and i not in done:
                self.waiting.appendleft(s)
        if not done:
            return outputs
        if len(done) < len(seqs):
            logits = logits[done]
        tokens, lps = sample(logits, [seqs[i] for i in done], self.eos_ids)
        for i, tok, lp in zip(done, tokens, lps):
            s = seqs[i]
            if isinstance(tok, SampleError):
                s.finish_reason = "error"
                self._drop(s)
                outputs.append(StepOutput(s, -1, "error", tok))
                continue
            s.token_ids.append(tok)
            reason = finish_reason(s, tok, self.eos_ids, self.max_model_len)
            s.finish_reason = reason
            if reason is not None:
                self._drop(s)
            elif self.prefill_only:
                self._hand_over(s)
            elif is_prefill and s not in self.running:
                s.status = SeqStatus.RUNNING
                self.running.append(s)
            prompt_lps = None
            if is_prefill and s.params.prompt_logprobs is not None and s.num_output == 1:
                # Handed over once; not kept for the sequence's life, nor computed again.
                prompt_lps, s.prompt_logprobs = s.prompt_logprobs, []
                s.prompt_logprobs_sent = True
            outputs.append(StepOutput(s, tok, reason, None, lp, prompt_lps))
        return outputs


def _wants_prompt_logprobs(s: Sequence) -> bool:
    return (
        s.params.prompt_logprobs is not None
        and not s.prompt_logprobs_sent
        and len(s.prompt_logprobs) < s.num_prompt_tokens - 1
    )


def _add_prompt_logprobs(s: Sequence, rows, start: int) -> None:
    """Logprobs of the prompt tokens this chunk's logits `rows` predict (row r, at
    position start + r, predicts token start + r + 1), those not computed before (a
    recomputation after preemption computes them again)."""
    first = max(start + 1, len(s.prompt_logprobs) + 1)
    last = min(start + len(rows), s.num_prompt_tokens - 1)
    for a in range(first, last + 1, 128):  # a slice at a time: bounded temporaries
        b = min(a + 127, last)
        s.prompt_logprobs += logprobs_of(
            rows[a - 1 - start : b - start], s.token_ids[a : b + 1], s.params.prompt_logprobs
        )
