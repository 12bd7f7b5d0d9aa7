"""Engine: a scheduler over `waiting` and `running` sequences plus one model
forward per step (continuous batching: sequences join and leave every step).

A step is either a prefill step (uncached tokens of waiting sequences under
`max_batched_tokens`, long prompts in chunks) or a decode step (one token for
every running sequence). When a running sequence needs a block and none is
free, the most recently admitted one is preempted: its blocks are freed and it
waits to be recomputed. Nothing here asserts on a full pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.kv_cache import BlockManager, NoFreeBlocks
from workers.runner import ModelRunner
from workers.sampler import sample
from workers.sequence import Sequence, SeqStatus, finish_reason


@dataclass
class StepOutput:
    seq: Sequence
    token: int
    finish_reason: str | None


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        blocks: BlockManager,
        *,
        max_batched_tokens: int,
        max_running: int,
        prefill_only: bool = False,
    ):
        self.runner = runner
        self.blocks = blocks
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        # prefill_only: a sequence leaves after its first token, keeping its
        # blocks; the caller (the prefill worker) owns them from then on.
        self.prefill_only = prefill_only
        self.eos_ids = runner.args.eos_token_ids
        self.max_model_len = runner.max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0  # progress counter a watchdog can read
        self._finished_unscheduled: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; its uncached tokens get computed in prefill steps.
        A sequence whose KV is already cached except the last token (pulled
        from a prefill worker) goes straight to `running` when the batch has
        room; otherwise it waits, keeping its KV, and joins later as a 1-token step."""
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

    def abort(self, request_id: str) -> Sequence | None:
        for q in (self.running, self.waiting):
            for s in q:
                if s.request_id == request_id:
                    q.remove(s)
                    self._release(s)
                    return s
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_queued_tokens(self) -> int:
        return sum(s.num_tokens - s.num_cached for s in self.waiting)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        seq.status = SeqStatus.FINISHED

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
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _schedule_prefill(self) -> tuple[list[Sequence], list[int]]:
        seqs, num_new, budget = [], [], self.max_batched_tokens
        while self.waiting and budget > 0 and len(self.running) + len(seqs) < self.max_running:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_cached, budget)
            if not self._grow(seq, seq.num_cached + n):
                if not self.running and not seqs and not self.blocks.num_used:
                    # Cannot fit even alone in an empty pool: end it instead of waiting forever.
                    self.waiting.popleft()
                    seq.status = SeqStatus.FINISHED
                    seq.finish_reason = "length"
                    self._finished_unscheduled.append(seq)
                    continue
                break
            self.waiting.popleft()
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return seqs, num_new

    def _schedule_decode(self) -> list[Sequence]:
        scheduled = []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below to make room for an earlier one
            while not self._grow(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        return [s for s in scheduled if s in self.running]

    def step(self) -> list[StepOutput]:
        """Run one batch; return the tokens sampled this step."""
        self._finished_unscheduled = []
        seqs, num_new = self._schedule_prefill()
        is_prefill = bool(seqs)
        if not is_prefill:
            seqs = self._schedule_decode()
            num_new = [1] * len(seqs)
        outputs = [StepOutput(s, -1, s.finish_reason) for s in self._finished_unscheduled]
        if not seqs:
            return outputs
        logits = self.runner.forward(seqs, num_new)
        self.steps += 1
        for s, n in zip(seqs, num_new):
            s.num_cached += n
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
        tokens = sample(logits, [seqs[i] for i in done], self.eos_ids)
        for i, tok in zip(done, tokens):
            s = seqs[i]
            s.token_ids.append(tok)
            reason = finish_reason(s, tok, self.eos_ids, self.max_model_len)
            s.finish_reason = reason
            if is_prefill and s not in self.running:
                if self.prefill_only:
                    s.status = SeqStatus.FINISHED  # blocks stay allocated: caller owns them
                else:
                    s.status = SeqStatus.RUNNING
                    self.running.append(s)
            if reason is not None and s in self.running:
                self.running.remove(s)
            if reason is not None and not self.prefill_only:
                self._release(s)
            outputs.append(StepOutput(s, tok, reason))
        return outputs
