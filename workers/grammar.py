"""Structured output on a worker: llguidance matchers, and the token mask they give.

A request's grammar (`SamplingParams.grammar`) is compiled once per worker and kept in
a bounded cache keyed by its digest; each sequence gets its own copy of the compiled
matcher. Compiling (and the first mask, where llguidance builds its lexer) runs on one
thread of its own with a large stack (wire/grammar.py), never on the actor's event loop
nor on the model thread. The sampler (`masks`) advances each sequence's matcher over the output
tokens it has not yet seen, so a sequence that starts with output (prefill's first
token, a migration's tokens so far) replays it and every path masks alike.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import numpy as np
import torch

from wire.grammar import big_stack_executor, digest, error_text, probe
from wire.grammar import tokenizer as llg_tokenizer
from workers.sequence import Sequence

CACHE_SIZE = 16  # compiled grammars kept per worker (each within wire.grammar.LIMITS)


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (the router validates first; this is a
    worker whose tokenizer or library disagrees)."""


class Grammars:
    """One worker's compiled grammars. The tokenizer llguidance needs (~0.4 s to build
    for a 49k vocabulary) is made on the compile thread (`warm`, at the worker's start)."""

    def __init__(self, model_dir: str, vocab_size: int, eos_ids: tuple[int, ...]):
        self.model_dir, self.vocab_size, self.eos_ids = model_dir, vocab_size, eos_ids
        self._tokenizer = None
        self._compiled: OrderedDict[bytes, object] = OrderedDict()  # compile thread only
        self._thread = big_stack_executor("grammar")

    async def matcher(self, grammar: str):
        """A fresh matcher for `grammar`, compiled off the event loop and model thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._matcher, grammar)

    def _matcher(self, grammar: str):
        key = digest(grammar)
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                compiled = probe(self.tokenizer(), grammar)
            except ValueError as e:
                raise GrammarError(str(e)) from None
            self._compiled[key] = compiled
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled.deep_copy()

    def warm(self) -> None:
        """Build the tokenizer now, on the compile thread, so that the first request
        with a grammar does not wait for it."""
        self._thread.submit(self.tokenizer)

    def tokenizer(self):
        """llguidance's tokenizer, from the model's tokenizer.json (no transformers
        import in a worker)."""
        if self._tokenizer is None:
            self._tokenizer = llg_tokenizer(self.model_dir, self.vocab_size, self.eos_ids)
        return self._tokenizer


def masks(seqs: list[Sequence], rows: list[int], vocab: int) -> tuple[torch.Tensor, dict]:
    """The allowed tokens [len(rows), vocab] (bool, on the CPU) of `seqs[i]` for i in
    `rows`, each matcher first advanced over its sequence's new output tokens; and
    {i: message} for rows whose matcher failed (output it cannot follow)."""
    bits = np.zeros((len(rows), (vocab + 31) // 32), dtype=np.int32)
    failed = {}
    for j, i in enumerate(rows):
        s = seqs[i]
        m, seen, output = s.matcher, s.sampling_cache.get("grammar_at", 0), s.output_ids
        try:
            if seen < len(output):
                m.consume_tokens(output[seen:])
                s.sampling_cache["grammar_at"] = len(output)
            if not m.is_error():
                row = bits[j]
                m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            if m.is_error():
                failed[i] = error_text(m)
        except Exception as e:  # noqa: BLE001 - this sequence fails, never the batch
            failed[i] = f"{type(e).__name__}: {e}"[:300]
    allowed = np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
    return torch.from_numpy(allowed.astype(bool)), failed
