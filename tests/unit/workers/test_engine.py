"""The engine in-process: greedy equals Hugging Face, under batching, chunked
prefill and a KV pool too small for the load; blocks return to zero."""

from __future__ import annotations

import pytest
import torch

from workers.engine import Engine
from workers.kv_cache import BlockManager, NoFreeBlocks
from workers.runner import ModelRunner
from workers.sampling_params import SamplingParams
from workers.sequence import Sequence

N = 20


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts_and_refs(hf_model):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (3, 16, 17, 45, 130)]
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=N,
                min_new_tokens=N,
                do_sample=False,
                pad_token_id=0,
            )
        refs.append(out[0, len(p) :].tolist())
    return prompts, refs


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
