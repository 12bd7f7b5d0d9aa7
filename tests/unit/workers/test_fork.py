"""n > 1 on decode (`Engine.add_fork`): the choices of one pulled prompt share its KV
blocks (reference-counted), each with its own copy of the block its last prompt token is
in, and give the text each gets alone; forks that cannot be made end, and nothing leaks."""

from __future__ import annotations

import pytest
import torch

from wire.sampling_params import SamplingParams
from workers.engine import Engine
from workers.kv_cache import BlockManager
from workers.runner import ModelRunner
from workers.sequence import ForkTooLate, Sequence

PROMPT = list(range(3, 40))  # 37 tokens: 2 full blocks of 16 and a partial one
N = 12


def params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", N)
    return SamplingParams(min_tokens=kw["max_tokens"], **kw)


KINDS = [
    params(temperature=0.0),
    params(temperature=0.9, seed=5),
    params(temperature=0.9, seed=6, repetition_penalty=1.3),
    params(temperature=0.0, logprobs=2),
]


def engine(model_dir, num_blocks=32) -> Engine:
    runner = ModelRunner(model_dir, max_model_len=256, num_blocks=num_blocks, block_size=16)
    return Engine(runner, BlockManager(num_blocks, 16), max_batched_tokens=512, max_running=8)


def alone(model_dir, sp: SamplingParams) -> tuple[list[int], list]:
    """The tokens (and logprobs) of one sequence prefilled and decoded by itself."""
    e = engine(model_dir)
    seq = Sequence("alone", PROMPT, sp)
    e.add(seq)
    lps = []
    while e.has_work:
        lps += [o.logprobs for o in e.step()]
    return seq.output_ids, lps


def land(e: Engine, parent: Sequence) -> None:
    """What a pull does: the prompt's KV written into the parent's blocks."""
    (admitted,) = e.admit_pulls()
    assert admitted is parent
    tmp = Sequence("kv", PROMPT, KINDS[0])
    tmp.block_table = parent.block_table
    e.runner.forward([tmp], [len(PROMPT)])


def pulled_with_forks(e: Engine, first: int, kinds) -> tuple[Sequence, list[Sequence]]:
    parent = Sequence("p", PROMPT, kinds[0], output_ids=[first])
    e.add_pulled(parent)
    forks = [Sequence(f"p-{j}", PROMPT, sp) for j, sp in enumerate(kinds[1:], start=1)]
    for f in forks:
        e.add_fork(f, "p")
    return parent, forks


def run(e: Engine) -> dict[str, list]:
    lps: dict[str, list] = {}
    while e.has_work:
        for o in e.step():
            lps.setdefault(o.seq.request_id, []).append(o.logprobs)
    return lps


def test_forks_share_the_pulled_blocks_and_give_the_text_each_gets_alone(tiny_model_dir):
    want = [alone(tiny_model_dir, sp) for sp in KINDS]
    e = engine(tiny_model_dir)
    parent, forks = pulled_with_forks(e, want[0][0][0], KINDS)
    land(e, parent)
    e.pull_done("p", True)
    # 3 blocks pulled; each fork shares the 2 full ones and has its own third.
    assert e.blocks.num_used == 3 + len(forks)
    assert all(f.block_table[:2] == parent.block_table[:2] for f in forks)
    assert len({f.block_table[2] for f in forks} | {parent.block_table[2]}) == 4
    lps = run(e)
    for s, (tokens, logprobs) in zip([parent, *forks], want, strict=True):
        assert s.output_ids == tokens, s.request_id
        if s.params.logprobs is not None:  # its first token's too, computed here
            got = lps[s.request_id]
            assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(got, logprobs, strict=True))
    assert len({tuple(s.output_ids) for s in [parent, *forks]}) >= 3  # seeds differ
    assert e.blocks.num_used == 0 and not e.seqs


def test_forks_that_cannot_be_made_end_and_nothing_leaks(tiny_model_dir):
    e = engine(tiny_model_dir)
    parent, forks = pulled_with_forks(e, 7, KINDS)
    e.abort("p-1")  # its client left before the KV landed: never forked
    assert [f.request_id for f in parent.forks] == ["p-2", "p-3"]
    land(e, parent)
    e.abort("p")  # the parent leaves while its pull runs: its forks still get the KV
    e.pull_done("p", True)
    assert "p" not in e.seqs and {"p-2", "p-3"} <= set(e.seqs)
    with pytest.raises(ForkTooLate):  # the parent has ended: nothing to fork from
        e.add_fork(Sequence("late", PROMPT, KINDS[1]), "p")
    run(e)
    assert e.blocks.num_used == 0 and not e.seqs and not e.failed_forks

    parent, forks = pulled_with_forks(e, 7, KINDS)
    land(e, parent)
    e.pull_done("p", False)  # the pull failed: so do its forks
    assert e.failed_forks == ["p-1", "p-2", "p-3"]
    assert e.blocks.num_used == 0 and not e.seqs

    e.failed_forks.clear()
    parent, forks = pulled_with_forks(e, 7, KINDS)
    e.abort("p")  # left while waiting for blocks: its forks end with it
    assert e.failed_forks == ["p-1", "p-2", "p-3"]
    assert e.blocks.num_used == 0 and not e.seqs and not e.kv_waiting


def test_a_fork_preempted_before_its_copy_gives_the_source_back(tiny_model_dir):
    """A fork holds a reference on the block it copies until the next forward copies
    it; dropped before (aborted, preempted), it gives that reference back."""
    e = engine(tiny_model_dir)
    parent, forks = pulled_with_forks(e, 7, KINDS[:2])
    land(e, parent)
    e.pull_done("p", True)
    src = parent.block_table[2]
    assert e.blocks._refs[src] == 2  # the parent's, and the pending copy's
    e.abort("p-1")
    assert e.blocks._refs[src] == 1 and not e._copies
    e.abort("p")
    assert e.blocks.num_used == 0


def test_copies_run_on_every_rank_before_the_forward(tiny_model_dir):
    """The copy travels in the step plan (the ranks of a TP group each copy their shard)."""
    e = engine(tiny_model_dir)
    parent, forks = pulled_with_forks(e, 7, KINDS[:2])
    land(e, parent)
    e.pull_done("p", True)
    plans = []
    plan = e.runner.plan
    e.runner.plan = lambda *a: plans.append(plan(*a)) or plans[-1]
    e.step()
    ((src, dst),) = plans[0].copies
    assert (src, dst) == (parent.block_table[2], forks[0].block_table[2])
    pool = e.runner.kv_pool
    # The fork recomputed its last prompt token in its copy: the rest of it is the parent's.
    torch.testing.assert_close(pool[dst][..., :4, :], pool[src][..., :4, :])
    run(e)
    assert e.blocks.num_used == 0


def test_a_fork_waits_its_parents_turn_not_behind_newer_pulls(tiny_model_dir):
    """A fork ranks as its parent (arrived before any later pull): it must not wait, with
    the blocks it shares, behind a pull that came between the parent and the fork and
    needs those blocks (the engine wedged: nothing running, the pull never admitted)."""
    e = engine(tiny_model_dir, num_blocks=8)
    e.stall_after_s = 5.0
    parent = Sequence("p", PROMPT, params(temperature=0.0, max_tokens=3), output_ids=[7])
    e.add_pulled(parent)
    x = Sequence("x", list(range(3, 93)), params(temperature=0.0), output_ids=[7])
    e.add_pulled(x)  # 6 blocks: admitted only once the fork and the parent are done
    e.add_fork(Sequence("f", PROMPT, params(temperature=0.0, max_tokens=3)), "p")
    land(e, parent)
    e.pull_done("p", True)
    for _ in range(40):
        for s in e.admit_pulls():
            e.pull_done(s.request_id, True)  # its KV: what a pull writes is not checked here
        if not e.has_work and not e.kv_waiting:
            break
        e.step()
    assert not e.kv_waiting and not e.seqs and e.blocks.num_used == 0


def test_a_fork_that_comes_after_the_kv_landed_forks_from_the_running_parent(tiny_model_dir):
    """The fork's call can reach decode after its parent's pull has ended (the pull won
    the race): it forks from the parent's blocks while the parent decodes, and gets the
    text it gets alone."""
    want = [alone(tiny_model_dir, sp) for sp in KINDS[:2]]
    e = engine(tiny_model_dir)
    parent = Sequence("p", PROMPT, KINDS[0], output_ids=[want[0][0][0]])
    e.add_pulled(parent)
    land(e, parent)
    e.pull_done("p", True)
    for _ in range(3):
        e.step()  # the parent decodes: its copy of the last block has later tokens now
    fork = Sequence("p-1", PROMPT, KINDS[1])
    e.add_fork(fork, "p")
    run(e)
    assert parent.output_ids == want[0][0] and fork.output_ids == want[1][0]
    assert e.blocks.num_used == 0 and not e.seqs
