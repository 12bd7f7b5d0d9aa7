"""What a JSON-schema token mask costs per decode step at batch 32, for the two grammar
libraries issue 25 may build on (xgrammar, llguidance), on the default model's tokenizer.

Each of 32 sequences follows the same JSON schema: every step fills its next-token mask,
applies it to a [32, vocab] float32 logits block, and accepts one allowed token drawn with
a fixed seed (a real token stream through the grammar, not one state). Reported per
library and fill mode (sequence by sequence on one thread, or the library's batch call on
--threads threads; each on fresh matchers, so neither reads masks the other cached):
schema compile time, mask fill time per step, the library's mask apply and a plain torch
apply per step (medians), beside a log-softmax of the same [32, vocab] block for scale.

Neither library is a project dependency yet: run with a venv that has both, e.g.
  python3 -m venv /work/grammar-venv && /work/grammar-venv/bin/pip install torch==2.13.0 \\
    && /work/grammar-venv/bin/pip install -c constraints.txt transformers==5.23.0 \\
       xgrammar==0.2.9 llguidance==1.9.1
  /work/grammar-venv/bin/python benchmarks/grammar_mask.py --model-dir DIR --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

BATCH = 32
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return "unknown"


def _allowed(mask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((mask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return torch.nonzero(bits[:vocab])[:, 0].tolist()


def torch_apply(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """The bitmask applied with plain torch ops (either library's layout: bit j of word
    i allows token 32 i + j): what the sampler could use on any device."""
    vocab = logits.shape[-1]
    bits = (mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    logits.masked_fill_(bits.flatten(1)[:, :vocab] == 0, float("-inf"))


def _run(name, make, fill_one, fill_batch, accept, is_done, apply, vocab, steps, seed, batch):
    """`steps` decode steps of BATCH sequences, masks filled one by one (or with the
    library's batch call); medians in microseconds per step."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    make_matcher = make()
    first = make_matcher()  # a library may compile lazily, at its first matcher
    compile_us = (time.perf_counter() - t0) * 1e6
    matchers = [first] + [make_matcher() for _ in range(BATCH - 1)]
    mask = torch.zeros(BATCH, (vocab + 31) // 32, dtype=torch.int32)
    logits = torch.randn(BATCH, vocab)
    fills, applies, torch_applies, tokens = [], [], [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        if batch:
            fill_batch(matchers, mask)
        else:
            for i, m in enumerate(matchers):
                fill_one(m, mask, i)
        fills.append((time.perf_counter() - t0) * 1e6)
        for fn, into in ((apply, applies), (torch_apply, torch_applies)):
            row = logits.clone()
            t0 = time.perf_counter()
            fn(row, mask)
            into.append((time.perf_counter() - t0) * 1e6)
        for i, m in enumerate(matchers):
            allowed = _allowed(mask[i], vocab)
            if not allowed or is_done(m):
                matchers[i] = make_matcher()  # a finished document: the next one starts
                continue
            accept(m, rng.choice(allowed))
            tokens += 1
    med = statistics.median
    return {
        "library": name,
        "fill": "batch call" if batch else "one by one",
        "compile_ms": round(compile_us / 1e3, 2),
        "fill_us_per_step": round(med(fills)),
        "apply_us_per_step": round(med(applies)),
        "torch_apply_us_per_step": round(med(torch_applies)),
        "tokens_accepted": tokens,
    }


def xgrammar_case(tokenizer, vocab):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)

    def make():
        compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(SCHEMA))
        return lambda: xgr.GrammarMatcher(compiled)

    batch = xgr.BatchGrammarMatcher(max_threads=torch.get_num_threads())
    return dict(
        name=f"xgrammar {version('xgrammar')}",
        make=make,
        fill_one=lambda m, mask, i: m.fill_next_token_bitmask(mask, i),
        fill_batch=lambda ms, mask: batch.batch_fill_next_token_bitmask(ms, mask),
        accept=lambda m, t: m.accept_token(t),
        is_done=lambda m: m.is_terminated(),
        apply=lambda logits, mask: xgr.apply_token_bitmask_inplace(logits, mask),
    )


def llguidance_case(tokenizer, vocab):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    ll_tok = llguidance.hf.from_tokenizer(tokenizer, vocab)
    executor = llguidance.LLExecutor()

    def make():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        return lambda: llguidance.LLMatcher(ll_tok, grammar)

    return dict(
        name=f"llguidance {version('llguidance')}",
        make=make,
        fill_one=lambda m, mask, i: llt.fill_next_token_bitmask(m, mask, i),
        fill_batch=lambda ms, mask: llt.fill_next_token_bitmask_par(
            executor, [(m, i) for i, m in enumerate(ms)], mask
        ),
        accept=lambda m, t: m.consume_token(t),
        is_done=lambda m: m.is_stopped(),
        apply=lambda logits, mask: llt.apply_token_bitmask_inplace(logits, mask),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True, help="the default model's directory")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    vocab = len(tokenizer)
    rows = []
    for case in (xgrammar_case, llguidance_case):
        for batch in (False, True):  # each on fresh matchers: no mask cached from the other
            try:
                rows.append(
                    _run(
                        **case(tokenizer, vocab), vocab=vocab, steps=args.steps, seed=0, batch=batch
                    )
                )
            except ImportError as e:
                print(f"skipped: {e}", file=sys.stderr)
    logits = torch.randn(BATCH, vocab)
    t0 = time.perf_counter()
    for _ in range(20):
        torch.log_softmax(logits, dim=-1)
    report = {
        "cpu": _cpu(),
        "batch": BATCH,
        "vocab": vocab,
        "steps": args.steps,
        "log_softmax_32_rows_us": round((time.perf_counter() - t0) / 20 * 1e6),
        "results": rows,
        "command": " ".join(["python", "benchmarks/grammar_mask.py", *sys.argv[1:]]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
