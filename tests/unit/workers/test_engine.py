"""The engine in-process: greedy equals Hugging Face, under batching, chunked
prefill and a KV pool too small for the load; blocks return to zero."""

from __future__ import annotations

import pytest
import torch

from tests.support import hf_greedy
from wire.sampling_params import SamplingParams
from workers.engine import Engine
from workers.kv_cache import BlockManager, NoFreeBlocks
from workers.runner import ModelRunner
from workers.sequence import Sequence

N = 20


@pytest.fixture(scope="module")
def prompts_and_refs(hf):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (3, 16, 17, 45, 130)]
    return prompts, [hf_greedy(hf, p, N) for p in prompts]


def make_engine(model_dir, num_blocks=64, max_batched_tokens=512, max_running=8):
    runner = ModelRunner(model_dir, max_model_len=512, num_blocks=num_blocks, block_size=16)
    return Engine(
        runner,
        BlockManager(num_blocks, 16),
        max_batched_tokens=max_batched_tokens,
        max_running=max_running,
    )


def run_all(engine: Engine, prompts, **params) -> list[Sequence]:
    sp = SamplingParams(max_tokens=N, temperature=0.0, min_tokens=N, **params)
    seqs = [Sequence(str(i), p, sp) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    for _ in range(10_000):
        if not engine.has_work:
            break
        engine.step()
    assert not engine.has_work
    return seqs


@pytest.mark.parametrize("budget", [512, 40])  # 40: long prompts are prefilled in chunks
def test_batched_greedy_equals_hf(tiny_model_dir, prompts_and_refs, budget):
    prompts, refs = prompts_and_refs
    engine = make_engine(tiny_model_dir, max_batched_tokens=budget)
    seqs = run_all(engine, prompts)
    assert [s.output_ids for s in seqs] == refs
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.blocks.num_used == 0


def test_tiny_pool_preempts_and_stays_correct(tiny_model_dir, prompts_and_refs):
    """10 blocks cannot hold all five sequences at once: preempt and recompute."""
    prompts, refs = prompts_and_refs
    engine = make_engine(tiny_model_dir, num_blocks=10)
    seqs = run_all(engine, prompts)
    assert [s.output_ids for s in seqs] == refs
    assert engine.blocks.num_used == 0


def test_max_model_len_ends_sequences(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    sp = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    seq = Sequence("long", [3 + i % 200 for i in range(497)], sp)
    engine.add(seq)
    while engine.has_work:
        engine.step()
    assert seq.num_tokens == 512 and seq.finish_reason == "length"
    assert engine.blocks.num_used == 0


def test_abort_frees_blocks(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    sp = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("a", list(range(3, 40)), sp))
    engine.step()
    assert engine.blocks.num_used > 0
    assert engine.abort("a") is not None
    assert engine.blocks.num_used == 0 and not engine.has_work
    assert engine.abort("a") is None


def test_seeded_sampling_is_reproducible(tiny_model_dir):
    outs = []
    for _ in range(2):
        engine = make_engine(tiny_model_dir)
        sp = SamplingParams(
            max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True
        )
        s = Sequence("s", list(range(3, 20)), sp)
        engine.add(s)
        while engine.has_work:
            engine.step()
        outs.append(s.output_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_block_manager_never_asserts():
    bm = BlockManager(4, 16)
    ids = bm.allocate(3)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2)
    bm.free(ids)
    with pytest.raises(ValueError):
        bm.free(ids)  # double free is refused, the free list stays consistent
    assert bm.num_free == 4 and bm.num_used == 0


def test_a_poisoned_request_ends_alone_and_the_batch_goes_on(tiny_model_dir, prompts_and_refs):
    """A request whose sampling fails ends with "error"; its neighbours in the same
    steps give Hugging Face's tokens, and every block comes back."""
    prompts, refs = prompts_and_refs
    engine = make_engine(tiny_model_dir)
    sp = SamplingParams(max_tokens=N, temperature=0.0, min_tokens=N)
    good = [Sequence(str(i), p, sp) for i, p in enumerate(prompts)]
    bad = Sequence(
        "bad",
        prompts[0],
        SamplingParams(max_tokens=N, temperature=0.0, min_tokens=1, stop_token_ids=[99_999_999]),
    )
    for s in [good[0], bad, *good[1:]]:
        engine.add(s)
    outs = []
    while engine.has_work:
        outs += engine.step()
    failed = [o for o in outs if o.finish_reason == "error"]
    assert [o.seq.request_id for o in failed] == ["bad"] and failed[0].error.status == 400
    assert [s.output_ids for s in good] == refs
    assert engine.blocks.num_used == 0 and not engine.seqs


def test_a_failed_step_loses_no_sequence(tiny_model_dir, monkeypatch):
    """The forward raises in a prefill step: the sequences taken out of `waiting`
    for it are still the engine's, so aborting every request frees every block."""
    engine = make_engine(tiny_model_dir)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("a", list(range(3, 40)), sp))
    engine.step()  # "a" is running, holding blocks
    engine.add(Sequence("b", list(range(3, 60)), sp))
    engine.add(Sequence("c", list(range(3, 20)), sp))

    def broken(*_):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "forward", broken)
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.blocks.num_used > 0
    for rid in ("a", "b", "c"):
        assert engine.abort(rid) is not None
    assert engine.blocks.num_used == 0 and not engine.has_work and not engine.seqs


def test_pulled_requests_wait_for_blocks_in_order_and_a_transfer_keeps_its_blocks(tiny_model_dir):
    """Decode admission of pulled KV: requests wait for blocks in arrival order; a
    request aborted while its transfer may still write keeps its blocks until the
    transfer has ended."""
    engine = make_engine(tiny_model_dir, num_blocks=8)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"p{i}", list(range(3, 3 + 60)), sp, output_ids=[7]) for i in range(3)]
    for s in seqs:  # 4 blocks each: two fit in 8
        engine.add_pulled(s)
    assert [s.request_id for s in engine.admit_pulls()] == ["p0", "p1"]
    assert engine.admit_pulls() == [] and len(engine.kv_waiting) == 1
    engine.abort("p0")  # aborted mid-transfer: nothing is freed yet
    assert engine.blocks.num_used == 8 and engine.admit_pulls() == []
    engine.pull_done("p0", ok=True)  # the transfer ended: now its blocks go back
    assert engine.blocks.num_used == 4
    engine.pull_done("p1", ok=True)  # p1 joins the batch; p2 must wait for headroom
    assert [s.request_id for s in engine.running] == ["p1"]
    while engine.has_work:
        engine.step()
    assert [s.request_id for s in engine.admit_pulls()] == ["p2"]
    engine.pull_done("p2", ok=False)  # a failed transfer frees its blocks
    assert engine.blocks.num_used == 0 and not engine.seqs


def test_work_that_does_not_fit_waits_blocked_without_steps(tiny_model_dir):
    """No free block for the head of `waiting`: the step does nothing and says it
    is blocked (waiting, not stalled); a free unblocks it."""
    engine = make_engine(tiny_model_dir, num_blocks=8)
    held = engine.blocks.allocate(6)  # e.g. leases not yet pulled
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("x", list(range(3, 60)), sp))  # 4 blocks
    assert engine.step() == [] and engine.blocked and engine.steps == 0
    engine.blocks.free(held)
    engine.step()
    assert not engine.blocked and engine.steps == 1


def test_engine_thread_sleeps_while_blocked(tiny_model_dir):
    """The thread that runs a blocked engine sleeps until a free (it used to spin a
    core, which the watchdog read as busy without progress)."""
    import threading
    import time

    from workers.engine_thread import EngineThread

    engine = make_engine(tiny_model_dir, num_blocks=8)
    held = engine.blocks.allocate(6)
    done = threading.Event()

    class Owner:
        def __init__(self):
            self.engine = engine

        def before_step(self):
            pass

        def on_outputs(self, outputs):
            if any(o.finish_reason for o in outputs):
                done.set()

        def on_tick(self):
            pass

        def on_error(self, exc):
            raise AssertionError(exc)

    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    thread = EngineThread(Owner(), num_threads=1)
    thread.call(lambda: engine.add(Sequence("x", list(range(3, 60)), sp)))
    time.sleep(0.3)
    cpu0, t0 = time.thread_time(), time.process_time()
    time.sleep(1.0)
    busy = time.process_time() - t0 - (time.thread_time() - cpu0)
    assert engine.blocked and busy < 0.3, busy
    thread.call(lambda: engine.blocks.free(held))
    assert done.wait(10)
    thread.stop()
    assert engine.blocks.num_used == 0


def test_older_waiting_work_gets_blocks_before_a_newer_pull(tiny_model_dir):
    """A sequence waiting to be computed here (e.g. preempted) is older than any
    pull still waiting for blocks: the pull is not admitted ahead of it."""
    engine = make_engine(tiny_model_dir, num_blocks=8)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    held = engine.blocks.allocate(6)
    engine.add(Sequence("old", list(range(3, 40)), sp))  # 3 blocks: does not fit yet
    engine.step()
    engine.add_pulled(Sequence("new", list(range(3, 20)), sp, output_ids=[7]))  # 2 blocks
    assert engine.admit_pulls() == []  # 2 are free, but "old" waits first
    engine.blocks.free(held)
    engine.step()  # "old" is computed
    assert [s.request_id for s in engine.admit_pulls()] == ["new"]


def test_a_pull_waits_for_a_place_in_the_batch(tiny_model_dir):
    """A pulled request gets blocks only when the batch has a place for it: parked in
    `waiting` with its KV, it could hold the blocks a preempted sequence needs to be
    recomputed while nothing runs to free any (a deadlock found in review)."""
    engine = make_engine(tiny_model_dir, num_blocks=10, max_running=1)
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("r", list(range(3, 23)), sp))
    engine.step()
    engine.add_pulled(Sequence("a", list(range(3, 63)), sp, output_ids=[7]))
    assert engine.admit_pulls() == []  # free blocks, but "r" has the only place
    while engine.running:
        engine.step()
    assert [s.request_id for s in engine.admit_pulls()] == ["a"]
    engine.pull_done("a", ok=True)
    assert [s.request_id for s in engine.running] == ["a"]
    while engine.has_work:
        engine.step()
    assert engine.blocks.num_used == 0 and not engine.seqs


# ---- automatic prefix caching ------------------------------------------------


def test_block_manager_prefix_cache_counts_evicts_lru_and_never_makes_work_wait():
    bm = BlockManager(6, 4, caching=True)
    toks = list(range(100, 112))  # 3 full blocks
    hashes = bm.prefix_hashes(toks, 3)
    assert bm.prefix_hashes(toks, 3) == hashes and len(set(hashes)) == 3
    assert bm.prefix_hashes([9, *toks[1:]], 3)[1] != hashes[1]  # chained: a prefix changes all
    a = bm.allocate(3)
    for i, h in zip(a, hashes):
        bm.register(i, h)
    assert bm.match(hashes) == a  # a second request shares them
    assert bm.num_used == 3
    bm.free(a)
    assert bm.num_used == 3  # still held by the second
    bm.free(a)
    assert (bm.num_used, bm.num_cached, bm.num_free) == (0, 3, 6)  # cached, yet free
    assert bm.match(hashes[:2]) == a[:2]
    bm.free(a[:2])  # a[2] is now the least recently used cached block, then a[0], a[1]
    got = bm.allocate(4)  # 3 never-used blocks, then the LRU cached one
    assert a[2] in got and bm.num_cached == 2
    assert bm.match(hashes) == a[:2]  # the chain stops at its evicted third block
    bm.free(a[:2])
    bm.allocate(2)  # evicts the rest: nothing waits while cached blocks exist
    assert bm.num_cached == 0 and bm.num_free == 0
    with pytest.raises(NoFreeBlocks):
        bm.allocate(1)


def _shared_prefix_prompts(prefix_len: int, suffixes: int, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 250, (prefix_len,), generator=g).tolist()
    return [
        prefix + torch.randint(3, 250, (5 + 7 * i,), generator=g).tolist() for i in range(suffixes)
    ]


def caching_engine(model_dir, num_blocks=64, max_model_len=512, **kw):
    runner = ModelRunner(
        model_dir, max_model_len=max_model_len, num_blocks=num_blocks, block_size=16
    )
    return Engine(
        runner,
        BlockManager(num_blocks, 16, caching=True),
        max_batched_tokens=512,
        max_running=8,
        **kw,
    )


def test_prefix_caching_keeps_greedy_output_identical(tiny_model_dir, hf):
    """Prompts sharing a 100-token prefix, one after another (each finds the last one's
    blocks cached) and then all at once: every output equals HF's, as without caching."""
    prompts = _shared_prefix_prompts(100, 4)
    refs = [hf_greedy(hf, p, N) for p in prompts]
    engine = caching_engine(tiny_model_dir)
    one_by_one = [run_all(engine, [p])[0].output_ids for p in prompts]
    assert one_by_one == refs
    assert engine.prefix_hit_tokens == 3 * 96  # 6 full blocks, from the second prompt on
    assert [s.output_ids for s in run_all(engine, prompts)] == refs
    assert engine.blocks.num_used == 0 and engine.blocks.num_cached > 0


def test_a_shared_1000_token_prefix_prefills_only_the_suffix(tiny_model_dir, monkeypatch):
    engine = caching_engine(tiny_model_dir, num_blocks=160, max_model_len=1200, prefill_only=True)
    computed = []
    forward = engine.runner.forward
    monkeypatch.setattr(
        engine.runner,
        "forward",
        lambda seqs, n, *rest: computed.append(sum(n)) or forward(seqs, n, *rest),
    )
    first, second = _shared_prefix_prompts(1000, 2)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    per_prompt = []
    for i, p in enumerate((first, second)):
        seq = Sequence(str(i), p, sp)
        engine.add(seq)
        while engine.has_work:
            engine.step()
        per_prompt.append(sum(computed))
        computed.clear()
        engine.blocks.free(seq.block_table)  # what the prefill worker's lease release does
    # 62 full blocks (992 tokens) of the shared prefix are reused; the rest is computed.
    assert per_prompt == [len(first), len(second) - 992] and per_prompt[1] == 20
    assert engine.blocks.num_used == 0


def test_prefix_caching_greedy_through_a_prefill_only_engine_matches_hf(tiny_model_dir, hf):
    """The prefill worker's engine: the first token of a prompt whose prefix was cached
    equals HF's, and its KV blocks (cached and new) equal those of an uncached run."""
    a, b = _shared_prefix_prompts(64, 2, seed=5)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    kvs = []
    for caching in (True, False):
        engine = caching_engine(tiny_model_dir, prefill_only=True)
        engine.blocks.caching = caching
        for i, p in enumerate((a, b)):
            seq = Sequence(str(i), p, sp)
            engine.add(seq)
            while engine.has_work:
                engine.step()
            assert seq.output_ids == hf_greedy(hf, p, 1)
        kvs.append(engine.runner.kv_pool[seq.block_table].clone())
    torch.testing.assert_close(kvs[0], kvs[1], rtol=1e-5, atol=1e-5)


def test_cached_blocks_are_evicted_before_a_request_waits(tiny_model_dir):
    """A 10-block pool left holding 8 cached blocks: a new 140-token prompt (9 blocks)
    runs at once, evicting them, never `blocked`."""
    engine = caching_engine(tiny_model_dir, num_blocks=10, prefill_only=True)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    g = torch.Generator().manual_seed(3)
    for i, n in enumerate((130, 140)):
        seq = Sequence(str(i), torch.randint(3, 250, (n,), generator=g).tolist(), sp)
        engine.add(seq)
        engine.step()
        assert not engine.blocked and not engine.has_work and seq.num_output == 1
        engine.blocks.free(seq.block_table)
        if i == 0:
            assert (engine.blocks.num_cached, engine.blocks.num_used) == (8, 0)
    # It took the 2 never-used blocks and evicted 7 of the first prompt's 8 (LRU); its
    # own 8 full blocks are cached now, beside the first prompt's last one.
    assert engine.blocks.num_cached == 9


def test_a_queued_request_pins_no_cached_blocks_the_head_needs(tiny_model_dir):
    """16 blocks; a 240-token prompt P leaves 14 cached blocks. W1 (100 tokens) then P
    again queue behind it: P must not take references on its cached blocks while it
    waits (before, it did at `add`, and W1 could never get its 7 blocks: both waited
    for good). W1 runs at once, P after W1's lease is released, reusing its head."""
    engine = caching_engine(tiny_model_dir, num_blocks=16, prefill_only=True)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    g = torch.Generator().manual_seed(9)
    p_ids = torch.randint(3, 250, (240,), generator=g).tolist()
    first = Sequence("p", p_ids, sp)
    engine.add(first)
    engine.step()
    engine.blocks.free(first.block_table)
    assert (engine.blocks.num_cached, engine.blocks.num_used) == (14, 0)
    w1 = Sequence("w1", torch.randint(3, 250, (100,), generator=g).tolist(), sp)
    w2 = Sequence("w2", p_ids, sp)
    engine.add(w1)
    engine.add(w2)
    done = []
    for _ in range(6):
        for out in engine.step():
            done.append(out.seq.request_id)
            engine.blocks.free(out.seq.block_table)  # the lease is released
        if not engine.has_work:
            break
    assert done == ["w1", "w2"] and not engine.has_work
    assert engine.prefix_hit_tokens == 9 * 16  # P's head survived the tail's eviction
    assert w2.output_ids == first.output_ids and engine.blocks.num_used == 0


def test_a_decode_engine_caches_only_what_it_computes(tiny_model_dir, hf):
    """Decode with prefix caching (router.max_local_prefill_tokens sends it short prompts):
    prompts it prefills itself reuse each other's prefix blocks, greedy still equal to
    HF's; a pulled request takes blocks by evicting cached ones, and its pulled KV is
    never entered in the cache."""
    prompts = _shared_prefix_prompts(100, 2)
    engine = caching_engine(tiny_model_dir, num_blocks=12)
    assert [run_all(engine, [p])[0].output_ids for p in prompts] == [
        hf_greedy(hf, p, N) for p in prompts
    ]
    assert engine.prefix_hit_tokens == 96  # the second prompt found 6 full blocks
    assert engine.blocks.num_used == 0 and engine.blocks.num_cached >= 6
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    pulled = Sequence("p", list(range(3, 3 + 150)), sp, output_ids=[7])  # 10 blocks
    engine.add_pulled(pulled)
    assert [s.request_id for s in engine.admit_pulls()] == ["p"]
    assert engine.blocks.num_cached == 2  # 12 blocks, 10 now held: the rest evicted
    engine.pull_done("p", ok=True)
    while engine.has_work:
        engine.step()
    assert pulled.num_output == 4
    assert (engine.blocks.num_used, engine.blocks.num_cached) == (0, 2)


def test_a_prompt_decode_prefills_cannot_take_the_place_a_pull_holds(tiny_model_dir):
    """max_running 2, one request running and a pull admitted (its place held): a prompt
    decode is to prefill itself, arriving meanwhile, waits; the pulled request joins the
    batch when its KV is in, instead of parking in `waiting` with its blocks (where a
    preempted request needing them could wait forever, with the watchdog reading `blocked`)."""
    engine = make_engine(tiny_model_dir, num_blocks=40, max_running=2)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("a", list(range(3, 22)), sp))
    engine.step()
    engine.add_pulled(Sequence("p", list(range(100, 180)), sp, output_ids=[7]))
    assert [s.request_id for s in engine.admit_pulls()] == ["p"]
    engine.add(Sequence("local", list(range(3, 32)), sp))
    engine.step()
    assert [s.request_id for s in engine.running] == ["a"]
    engine.pull_done("p", ok=True)
    assert [s.request_id for s in engine.running] == ["a", "p"]
    while engine.has_work:
        engine.step()
    assert engine.blocks.num_used == 0 and not engine.seqs


def test_a_pull_is_not_overtaken_by_a_newer_prompt_decode_prefills_itself(tiny_model_dir):
    """max_running 1: a pull waiting for a place gets it before a prompt that arrived
    after it (a steady flow of short prompts would otherwise hold pulls back until their
    deadline, their prefill leases renewed all the while)."""
    engine = make_engine(tiny_model_dir, num_blocks=40, max_running=1)
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("a", list(range(3, 22)), sp))
    engine.step()
    engine.add_pulled(Sequence("p", list(range(100, 180)), sp, output_ids=[7]))
    assert engine.admit_pulls() == []  # the batch is full
    engine.add(Sequence("local", list(range(3, 32)), sp))
    while engine.running:
        engine.step()
    assert [s.request_id for s in engine.admit_pulls()] == ["p"]
    engine.step()  # nothing runs: "local" waits for the place "p" holds
    assert not engine.running and engine.num_pulling == 1
    engine.pull_done("p", ok=True)
    assert [s.request_id for s in engine.running] == ["p"]
    while engine.has_work:
        engine.step()
    assert engine.blocks.num_used == 0 and not engine.seqs


def test_a_pull_short_of_blocks_is_not_starved_by_newer_prompts(tiny_model_dir):
    """Blocks short, batch places free: a running sequence holds blocks, a pull P needs
    more than are free, and a short prompt decode prefills itself arrives every step.
    No prompt newer than P is scheduled before P gets its blocks (before, each took the
    blocks freed meanwhile and P waited until its deadline, its lease renewed all along)."""
    engine = make_engine(tiny_model_dir, num_blocks=10, max_running=8)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("a", list(range(3, 63)), sp))  # 4 blocks, then a 5th as it decodes
    engine.step()
    pulled = Sequence("p", list(range(100, 200)), sp, output_ids=[7])  # 7 blocks (+1 headroom)
    engine.add_pulled(pulled)
    short = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    newer = []
    for i in range(200):
        if engine.admit_pulls():
            break
        s = Sequence(f"s{i}", list(range(3, 13)), short)  # 1 block each
        newer.append(s)
        engine.add(s)
        engine.step()
        started = [x.request_id for x in newer if x.num_cached]
        assert not started, f"{started} were scheduled while the older pull waited for blocks"
    assert pulled.status.value == "pulling"
    engine.pull_done("p", ok=True)
    while engine.has_work:
        engine.step()
    assert engine.blocks.num_used == 0 and not engine.seqs


def _clocked_engine(model_dir, now: list[float]) -> Engine:
    """An 8-block decode engine with a 30 s stall bound, on the clock `now[0]`."""
    runner = ModelRunner(model_dir, max_model_len=512, num_blocks=8, block_size=16)
    return Engine(
        runner,
        BlockManager(8, 16),
        max_batched_tokens=512,
        max_running=4,
        stall_after_s=30.0,
        clock=lambda: now[0],
    )


def test_blocked_with_nothing_running_reports_stalled_after_the_bound(tiny_model_dir):
    """The last line of defence: blocks held where the scheduler cannot take them back
    (here leaked outside it) leave work blocked with nothing running and no pull in
    flight; past `stall_after_s` the engine says it is stalled (the watchdog then
    restarts the worker) instead of waiting forever. A pull in flight stops the clock
    (it ends by its own deadline), and so does an idle spell: an engine whose waiting
    work was aborted is not stalled however long it then sits idle (the review found a
    healthy idle worker reporting a stall), and new work starts a fresh clock."""
    now = [0.0]
    engine = _clocked_engine(tiny_model_dir, now)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def tick(t: float) -> None:  # the engine thread's passes, every half second
        while now[0] < t:
            now[0] += 0.5
            if engine.has_work:
                engine.step()

    leaked = engine.blocks.allocate(6)
    engine.add(Sequence("x", list(range(3, 60)), sp))  # 4 blocks: only 2 are free
    tick(29.0)
    assert engine.blocked and not engine.stalled
    tick(31.0)
    assert engine.stalled and "blocked" in engine.fault
    engine.abort("x")  # its client gives up: nothing waits any more
    tick(100.0)  # idle: no step runs
    assert not engine.stalled and not engine.fault
    engine.add_pulled(Sequence("p", list(range(3, 20)), sp, output_ids=[7]))
    assert [s.request_id for s in engine.admit_pulls()] == ["p"]  # 2 blocks, in flight
    engine.add(Sequence("y", list(range(3, 60)), sp))
    tick(150.0)
    assert engine.blocked and not engine.stalled  # a pull in flight ends by its deadline
    engine.pull_done("p", ok=False)
    tick(170.0)
    assert engine.blocked and not engine.stalled  # a fresh clock, not the old one
    engine.blocks.free(leaked)
    tick(171.0)
    assert not engine.blocked and not engine.stalled
    while engine.has_work:
        engine.step()
    assert engine.blocks.num_used == 0 and not engine.seqs


def test_blocks_a_failed_pull_may_still_write_stay_held_until_its_writers_end(tiny_model_dir):
    """A pull that gave up while a READ may still write its blocks (NIXL would not
    release it, or its thread outlived the deadline) keeps those blocks out of the
    pool until every writer has ended; held too long, the engine reports a fault (the
    worker is restarted: nothing else makes that memory safe)."""
    now = [0.0]
    engine = _clocked_engine(tiny_model_dir, now)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_pulled(Sequence("p", list(range(3, 90)), sp, output_ids=[7]))  # 6 blocks
    engine.admit_pulls()
    engine.pull_done("p", ok=False, writers=2)
    assert not engine.seqs and engine.held_blocks == 6 and engine.blocks.num_used == 6
    engine.writer_done("p")
    assert engine.blocks.num_used == 6 and not engine.fault
    now[0] = 31.0
    assert "held" in engine.fault
    engine.writer_done("p")
    assert engine.blocks.num_used == 0 and engine.held_blocks == 0 and not engine.fault
    engine.writer_done("p")  # a late extra call changes nothing
    assert engine.blocks.num_free == 8
    # A writer's end may reach the engine before its pull's end does (NIXL let a stuck
    # READ go at once): it counts against the writers pull_done then names.
    engine.add_pulled(Sequence("q", list(range(3, 90)), sp, output_ids=[7]))
    engine.admit_pulls()
    engine.writer_done("q")
    engine.pull_done("q", ok=False, writers=1)
    assert engine.blocks.num_used == 0 and not engine.held


def _run_to_end(engine: Engine, seq: Sequence) -> list[int]:
    engine.add(seq)
    while engine.has_work:
        engine.step()
    return seq.output_ids


def test_seeded_sampling_gives_the_same_text_on_every_path(tiny_model_dir):
    """The draw for a seeded request's k-th output token depends on (seed, k) alone:
    one engine all the way (local prefill, decode-only fallback); prefill's engine
    for token 1, then decode for the rest (the disaggregated path); and a migration
    that re-prefills prompt + tokens so far on a fresh engine after 5 tokens, all
    give the same tokens. (Decode used to seed a new generator from `seed` alone, so
    token 2 reused token 1's draw.)"""
    prompt = list(range(3, 40))
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    whole = _run_to_end(make_engine(tiny_model_dir), Sequence("a", prompt, sp))
    assert len(whole) == 12 and len(set(whole)) > 3  # sampled, not one repeated token

    prefill = make_engine(tiny_model_dir)
    prefill.prefill_only = True
    first = _run_to_end(prefill, Sequence("b", prompt, sp))
    decode = make_engine(tiny_model_dir)
    rest = _run_to_end(decode, Sequence("b", prompt, sp, output_ids=first))
    assert rest == whole

    migrated = _run_to_end(make_engine(tiny_model_dir), Sequence("c", prompt, sp, whole[:5]))
    assert migrated == whole
    other = SamplingParams(max_tokens=12, temperature=1.0, seed=1235, ignore_eos=True)
    assert _run_to_end(make_engine(tiny_model_dir), Sequence("d", prompt, other)) != whole


def test_prompts_under_different_cache_salts_never_share_a_cached_block(tiny_model_dir):
    """`cache_salt` enters the first block's hash: the same 100-token prompt under salt
    "a" reuses what "a" computed, and never what "b" or no salt computed (a tenant's
    cache-timing probe finds nothing of another's). Greedy output is the same."""
    engine = caching_engine(tiny_model_dir, prefill_only=True)
    prompt = _shared_prefix_prompts(100, 1)[0]

    def run(rid: str, salt: str | None) -> tuple[list[int], int]:
        sp = SamplingParams(max_tokens=1, temperature=0.0, cache_salt=salt)
        seq = Sequence(rid, prompt, sp)
        hits = engine.prefix_hit_tokens
        out = _run_to_end(engine, seq)
        engine.blocks.free(seq.block_table)  # the lease is released
        return out, engine.prefix_hit_tokens - hits

    first, _ = run("a1", "a")
    assert run("b1", "b") == (first, 0)
    assert run("none", None) == (first, 0)
    assert run("a2", "a") == (first, 96)  # 6 full blocks, computed under "a"
    bm = engine.blocks
    assert set(bm.prefix_hashes(prompt, 6, "a")).isdisjoint(bm.prefix_hashes(prompt, 6, "b"))
    assert set(bm.prefix_hashes(prompt, 6, "a")).isdisjoint(bm.prefix_hashes(prompt, 6))
