"""Logprobs in the engine: each sampled token's and the prompt's, the model's raw
log-softmax (before penalties and temperature), equal Hugging Face's within 1e-4,
greedy and sampled, under chunked prefill, preemption and prefix caching."""

from __future__ import annotations

import pytest
import torch

from tests.support import assert_logprobs_match, hf_logprobs
from wire.sampling_params import SamplingParams
from workers.engine import Engine
from workers.kv_cache import BlockManager
from workers.runner import ModelRunner
from workers.sequence import Sequence

K = 5


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (1, 17, 45, 130)]


def run(model_dir, params: list[SamplingParams], num_blocks=64, budget=512, caching=False):
    runner = ModelRunner(model_dir, max_model_len=512, num_blocks=num_blocks, block_size=16)
    engine = Engine(
        runner,
        BlockManager(num_blocks, 16, caching=caching),
        max_batched_tokens=budget,
        max_running=8,
    )
    seqs = [Sequence(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts(), params))]
    got = {s.request_id: ([], None) for s in seqs}
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        for out in engine.step():
            lps, prompt = got[out.seq.request_id]
            lps.append(out.logprobs)
            if out.prompt_logprobs is not None:
                assert prompt is None  # sent once, with the first token
                prompt = out.prompt_logprobs
            got[out.seq.request_id] = (lps, prompt)
    assert engine.blocks.num_used == 0
    return seqs, [got[s.request_id] for s in seqs]


@pytest.mark.parametrize(
    "budget,num_blocks,caching",
    [(512, 64, False), (40, 64, True), (512, 12, False)],  # chunks + cache; preemption
)
def test_logprobs_equal_hf(tiny_model_dir, hf, budget, num_blocks, caching):
    params = [
        SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0, logprobs=K),
        SamplingParams(
            max_tokens=12, min_tokens=12, temperature=0.0, logprobs=0, prompt_logprobs=K
        ),
        # Sampled, with transforms that must not change the logprobs reported.
        SamplingParams(
            max_tokens=12,
            min_tokens=12,
            temperature=1.3,
            top_k=20,
            seed=3,
            repetition_penalty=1.5,
            logprobs=K,
            prompt_logprobs=2,
        ),
        SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0),
    ]
    seqs, got = run(tiny_model_dir, params, num_blocks, budget, caching)
    for s, sp, (lps, prompt) in zip(seqs, params, got, strict=True):
        ref = hf_logprobs(hf, s.token_ids)
        if sp.logprobs is None:
            assert lps == [None] * 12
        else:
            assert_logprobs_match(ref, s.token_ids, lps, s.num_prompt_tokens, sp.logprobs)
        if sp.prompt_logprobs is None:
            assert prompt is None
        else:
            assert_logprobs_match(
                ref, s.token_ids[: s.num_prompt_tokens], prompt, 1, sp.prompt_logprobs
            )


def test_a_prompt_asking_for_prompt_logprobs_skips_the_prefix_cache(tiny_model_dir, hf):
    """Cached blocks never compute logits: such a prompt is computed whole, and adds
    nothing to the cache."""
    p = prompts()[3]
    runner = ModelRunner(tiny_model_dir, max_model_len=512, num_blocks=64, block_size=16)
    engine = Engine(
        runner, BlockManager(64, 16, caching=True), max_batched_tokens=512, max_running=8
    )
    for i, sp in enumerate(
        [SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, prompt_logprobs=1)]
    ):
        seq = Sequence(str(i), p, sp)
        engine.add(seq)
        outs = []
        while engine.has_work:
            outs += engine.step()
    assert seq.cached_tokens == 0 and engine.prefix_hit_tokens == 0
    ref = hf_logprobs(hf, p)
    assert_logprobs_match(ref, p, outs[0].prompt_logprobs, 1, 1)


def test_prompt_logprobs_take_a_bounded_number_of_logit_rows_a_step(
    tiny_model_dir, hf, monkeypatch
):
    """Logits at every prompt position cost rows x vocab floats: at most
    PROMPT_LOGPROB_ROWS a step (a long prompt goes in chunks), the same values."""
    import workers.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PROMPT_LOGPROB_ROWS", 20)
    runner = ModelRunner(tiny_model_dir, max_model_len=512, num_blocks=64, block_size=16)
    engine = Engine(runner, BlockManager(64, 16), max_batched_tokens=512, max_running=8)
    rows = []
    forward = runner.forward
    monkeypatch.setattr(
        runner,
        "forward",
        lambda seqs, n, every, *rest: (
            rows.append(sum(n[i] for i in every)) or forward(seqs, n, every, *rest)
        ),
    )
    p = prompts()[3]  # 130 tokens
    sp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    plain = Sequence("plain", prompts()[2], SamplingParams(max_tokens=2, temperature=0.0))
    seq = Sequence("long", p, sp)
    engine.add(seq)
    engine.add(plain)
    got = None
    while engine.has_work:
        for out in engine.step():
            if out.prompt_logprobs is not None:
                got = out.prompt_logprobs
    assert max(rows) <= 20 and sum(rows) == len(p)  # 7 chunks, each row once
    assert seq.prompt_logprobs == [] and seq.prompt_logprobs_sent  # not kept after
    assert_logprobs_match(hf_logprobs(hf, p), p, got, 1, 3)
    assert engine.blocks.num_used == 0
