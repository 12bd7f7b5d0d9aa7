"""The scheduler under random operation sequences (hypothesis), against the real
`Engine`, `BlockManager` and the tiny model's `ModelRunner`.

Operations: `add` (a prompt decode prefills itself), `add_pulled`, `add_fork` (another
choice of a pulled request, n > 1), `admit_pulls`, `pull_done` (ok or not), `abort`,
`step`, with prefix caching on and off, and pools
from the smallest the config allows (kv_blocks * block_size == max_model_len) up.
After every operation:
- every block is free, cached, or held, and a held block's references are exactly
  the live sequences whose block tables name it, plus a fork's pending copy of its
  source (nothing leaked, nothing shared that should not be);
- every live sequence is in exactly the queue its status says;
- a prompt newer than a pull still waiting for blocks never starts ahead of it.
At the end of every example, with no new arrivals, a bounded number of passes of
the worker's loop (admit pulls, finish transfers, step) ends every sequence: the
pool never wedges. Then everything is aborted and nothing is left.

`make test` runs a fixed number of examples, derandomized (profile "pdcluster"); set
PDCLUSTER_HYPOTHESIS_EXAMPLES for a longer run.
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from wire.sampling_params import SamplingParams
from workers.engine import Engine
from workers.kv_cache import BlockManager
from workers.runner import ModelRunner
from workers.sequence import ForkTooLate, SeqStatus, Sequence

EXAMPLES = int(os.environ.get("PDCLUSTER_HYPOTHESIS_EXAMPLES", "150"))
settings.register_profile(
    "pdcluster",
    max_examples=EXAMPLES,
    stateful_step_count=40,
    derandomize=True,  # the same examples on every run: CI is deterministic
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Passes of the worker loop that must end everything once arrivals stop. Each
# sequence needs at most (prompt chunks + max_tokens) steps when alone, and a
# preemption costs a recomputation; far below this in practice.
DRAIN_PASSES = 5_000


@functools.cache
def _runner(model_dir: str, max_model_len: int, num_blocks: int, block_size: int) -> ModelRunner:
    # Reused across examples: a new engine and block manager start from scratch, and
    # every block is written before it is read.
    return ModelRunner(
        model_dir, max_model_len=max_model_len, num_blocks=num_blocks, block_size=block_size
    )


class Scheduler(RuleBasedStateMachine):
    model_dir: str = ""

    @initialize(
        block_size=st.sampled_from([4, 16]),
        max_model_len=st.sampled_from([32, 64]),
        extra_blocks=st.integers(0, 8),
        caching=st.booleans(),
        max_running=st.integers(1, 6),
        budget=st.sampled_from([8, 24, 2048]),
    )
    def start(self, block_size, max_model_len, extra_blocks, caching, max_running, budget):
        # The smallest pool the config allows holds exactly one max_model_len sequence.
        num_blocks = max_model_len // block_size + extra_blocks
        runner = _runner(self.model_dir, max_model_len, num_blocks, block_size)
        self.engine = Engine(
            runner,
            BlockManager(num_blocks, block_size, caching),
            max_batched_tokens=budget,
            max_running=max_running,
        )
        self.max_model_len = max_model_len
        self.n = 0
        self.local: set[str] = set()  # prompts decode prefills itself
        self.started: set[str] = set()  # local prompts that have been scheduled once

    # ---- arrivals ---------------------------------------------------------------

    def _seq(self, data, pulled: bool) -> Sequence:
        # Few distinct tokens: prompts share prefixes, so prefix caching has hits.
        room = self.max_model_len - (2 if pulled else 1)
        n = data.draw(st.integers(1, room), label="prompt_len")
        prompt = data.draw(st.lists(st.integers(3, 5), min_size=n, max_size=n), label="prompt")
        left = self.max_model_len - n - (1 if pulled else 0)
        sp = SamplingParams(
            max_tokens=data.draw(st.integers(1, min(left, 12)), label="max_tokens"),
            temperature=0.0,
            ignore_eos=True,
        )
        self.n += 1
        return Sequence(f"r{self.n}", prompt, sp, output_ids=[7] if pulled else None)

    @rule(data=st.data())
    def add(self, data):
        seq = self._seq(data, pulled=False)
        self.local.add(seq.request_id)
        self.engine.add(seq)

    @rule(data=st.data())
    def add_pulled(self, data):
        self.engine.add_pulled(self._seq(data, pulled=True))

    def _parents(self) -> list[Sequence]:
        """Pulled requests forks may join: their KV still to land, or landed and held."""
        return [
            s
            for s in self.engine.seqs.values()
            if s.fork_of is None and s.num_output and s.status is not SeqStatus.FINISHED
        ]

    @precondition(lambda self: self._parents())
    @rule(data=st.data())
    def add_fork(self, data):
        parent = data.draw(st.sampled_from(self._parents()), label="fork of")
        prompt = parent.token_ids[: parent.num_prompt_tokens]
        left = self.max_model_len - len(prompt)
        sp = SamplingParams(
            max_tokens=data.draw(st.integers(1, min(left, 12)), label="max_tokens"),
            temperature=0.0,
            ignore_eos=True,
        )
        self.n += 1
        try:
            self.engine.add_fork(Sequence(f"r{self.n}", prompt, sp), parent.request_id)
        except ForkTooLate:  # preempted, or no block for its copy: served on its own
            pass

    @rule()
    def admit_pulls(self):
        for s in self.engine.admit_pulls():
            assert s.status is SeqStatus.PULLING and s.block_table

    # ---- ends -------------------------------------------------------------------

    def _pulling(self) -> list[Sequence]:
        return [s for s in self.engine.seqs.values() if s.status is SeqStatus.PULLING]

    @precondition(lambda self: self._pulling())
    @rule(data=st.data(), ok=st.booleans(), writers=st.sampled_from([0, 0, 1, 2]))
    def pull_done(self, data, ok, writers):
        """A pull ends; a failed one may leave READs that can still write its blocks."""
        seq = data.draw(st.sampled_from(self._pulling()), label="pulled")
        self.engine.pull_done(seq.request_id, ok, writers)

    @precondition(lambda self: self.engine.held)
    @rule(data=st.data())
    def writer_done(self, data):
        rid = data.draw(st.sampled_from(sorted(self.engine.held)), label="writer of")
        self.engine.writer_done(rid)

    @precondition(lambda self: self.engine.seqs)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.engine.seqs)), label="abort")
        self.engine.abort(rid)

    @precondition(lambda self: self.engine.seqs)
    @rule(ok=st.booleans())
    def abort_everything(self, ok):
        """Every request aborted at once (e.g. the router gone): once the transfers in
        flight have ended, nothing is held."""
        e = self.engine
        for rid in list(e.seqs):
            e.abort(rid)
        for s in self._pulling():
            assert s.aborted
            e.pull_done(s.request_id, ok)
        assert not e.seqs and e.blocks.num_used == e.held_blocks and e.num_pulling == 0
        assert not (e.waiting or e.running or e.kv_waiting)
        self._end_writers()

    def _end_writers(self) -> None:
        e = self.engine
        for rid in list(e.held):
            while rid in e.held:
                e.writer_done(rid)
        assert not e.held and e.blocks.num_used == 0

    @rule()
    def step(self):
        self._step()

    def _step(self) -> None:
        """One pass of the decode worker's loop: pulls are offered blocks, then a step."""
        e = self.engine
        e.admit_pulls()
        waiting_pulls = [s.arrival for s in e.kv_waiting]
        oldest_pull = min(waiting_pulls, default=None)
        e.step()
        assert not set(e.failed_forks) & set(e.seqs)  # failed forks are gone
        e.failed_forks.clear()  # what the worker does: it fails their calls
        for s in list(e.seqs.values()):
            rid = s.request_id
            if s.num_cached and rid in self.local and rid not in self.started:
                self.started.add(rid)
                assert oldest_pull is None or oldest_pull > s.arrival, (
                    f"{rid} (arrival {s.arrival}) started while an older pull "
                    f"(arrival {oldest_pull}) waited for blocks"
                )

    # ---- invariants -------------------------------------------------------------

    @invariant()
    def blocks_are_conserved(self):
        if not hasattr(self, "engine"):
            return
        bm, e = self.engine.blocks, self.engine
        holders: dict[int, int] = {}
        for h in e.held.values():  # blocks a READ may still write: out of the pool
            for b in h.blocks:
                holders[b] = holders.get(b, 0) + 1
        for s in e.seqs.values():
            assert len(set(s.block_table)) == len(s.block_table), s.block_table
            for b in s.block_table:
                holders[b] = holders.get(b, 0) + 1
        for rid, (src, dst) in e._copies.items():  # a fork holds its source until copied
            assert dst in e.seqs[rid].block_table
            holders[src] = holders.get(src, 0) + 1
        assert holders == bm._refs, (holders, bm._refs)
        free, cached = set(bm._free), set(bm._evictable)
        assert len(free) == len(bm._free) and not (free & cached)
        assert not (free | cached) & set(holders)
        assert len(free) + len(cached) + len(holders) == bm.num_blocks

    @invariant()
    def queues_match_statuses(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        where = {
            SeqStatus.WAITING: e.waiting,
            SeqStatus.RUNNING: e.running,
            SeqStatus.WAITING_FOR_BLOCKS: e.kv_waiting,
        }
        queued = [s for q in where.values() for s in q]
        assert len({id(s) for s in queued}) == len(queued), "a sequence is queued twice"
        for s in e.seqs.values():
            if s.status is SeqStatus.PULLING:
                assert not any(s in q for q in where.values())
                assert s.block_table
            elif s.fork_of is not None:  # a fork waiting on its parent: in no queue
                assert not any(s in q for q in where.values()) and not s.block_table
                assert s in s.fork_of.forks and e.seqs.get(s.fork_of.request_id) is s.fork_of
            else:
                assert s in where[s.status], (s.request_id, s.status)
        assert all(s.request_id in e.seqs for s in queued)
        assert e.num_pulling == len(self._pulling())
        assert len(e.running) + e.num_pulling <= e.max_running

    # ---- progress ---------------------------------------------------------------

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        # READs past their deadline end too (else the engine reports `fault` and the
        # worker is restarted: covered in test_engine.py).
        for rid in list(e.held):
            while rid in e.held:
                e.writer_done(rid)
        for _ in range(DRAIN_PASSES):  # the worker's loop, with transfers that succeed
            if not e.seqs:
                break
            for s in self._pulling():
                e.pull_done(s.request_id, True)
            self._step()
            self.blocks_are_conserved()
            self.queues_match_statuses()
        assert not e.seqs, (
            f"wedged: running={[s.request_id for s in e.running]} "
            f"waiting={[(s.request_id, s.num_cached, len(s.block_table)) for s in e.waiting]} "
            f"kv_waiting={[s.request_id for s in e.kv_waiting]} blocked={e.blocked} "
            f"free={e.blocks.num_free} used={e.blocks.num_used}"
        )
        assert e.blocks.num_used == 0 and not e.has_work and not e.kv_waiting


def test_scheduler_properties(tiny_model_dir):
    Scheduler.model_dir = str(tiny_model_dir)
    Scheduler.TestCase.settings = settings.get_profile("pdcluster")
    Scheduler.TestCase("runTest").runTest()


@pytest.mark.parametrize("pulled", [False, True])
def test_everything_aborted_leaves_nothing(tiny_model_dir, pulled):
    """Aborting every request at any point frees every block (PULLING ones once their
    transfer ends)."""
    runner = _runner(str(tiny_model_dir), 64, 6, 16)
    e = Engine(runner, BlockManager(6, 16, True), max_batched_tokens=24, max_running=3)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i in range(5):
        s = Sequence(f"r{i}", [3 + i % 2] * (20 + 5 * i), sp, output_ids=[7] if pulled else None)
        (e.add_pulled if pulled else e.add)(s)
    e.admit_pulls()
    for _ in range(3):
        e.step()
    for rid in list(e.seqs):
        e.abort(rid)
    for rid in [s.request_id for s in e.seqs.values() if s.status is SeqStatus.PULLING]:
        e.pull_done(rid, True)
    assert not e.seqs and e.blocks.num_used == 0 and e.num_pulling == 0 and not e.has_work
