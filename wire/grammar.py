"""What the router and the workers agree on about structured output: how JSON is
written, the bounds llguidance works within, and the thread it compiles on.

llguidance's compiler recurses over the grammar without a depth bound: a chain of a few
thousand rules (or `$ref`s) overflows a thread's default 8 MiB stack, which kills the
process (SIGSEGV, not an exception). So a grammar is at most MAX_GRAMMAR_BYTES, is
compiled only on a thread with a STACK_BYTES stack (a 64 KiB grammar needs about 12 MiB),
and works within LIMITS: a grammar that would take more (a regex that expands to a
million states) is refused in milliseconds, before it costs seconds of a model thread or
hundreds of MiB of lexer states. The first mask, where llguidance builds its lexer, is
computed on that thread too (`probe`).
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# JSON as json.dumps writes it (", " and ": ", no other whitespace): a model cannot pad
# its output with whitespace forever, and the text reads as Python's.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_BYTES = 64 * 1024
STACK_BYTES = 64 * 1024 * 1024
# llguidance.LLParserLimits arguments: lexer fuel (~50k a ms) and states (1-2 kB each).
LIMITS = {"initial_lexer_fuel": 200_000, "max_lexer_states": 20_000, "verbose_errors": False}


def digest(grammar: str) -> bytes:
    """A grammar's cache key (the text itself may be 64 KiB)."""
    return hashlib.blake2b(grammar.encode(), digest_size=16).digest()


def big_stack_executor(name: str) -> ThreadPoolExecutor:
    """One thread with a STACK_BYTES stack, started now (the stack size is read when a
    thread starts; the process default is restored at once)."""
    old = threading.stack_size(STACK_BYTES)
    try:
        pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        pool.submit(lambda: None).result()
    finally:
        threading.stack_size(old)
    return pool


def tokenizer(model_dir: str, vocab_size: int, eos_ids) -> object:
    """llguidance's tokenizer for the model in `model_dir`, from its tokenizer.json (the
    router and every worker build it the same way; ~0.4 s for a 49k vocabulary)."""
    import llguidance

    text = (Path(model_dir) / "tokenizer.json").read_text()
    return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_ids) or None)


def probe(tokenizer, grammar: str):
    """A matcher for `grammar` with its first mask computed (its lexer built), or a
    ValueError saying why it cannot be one: a compile error, a limit, or a format that
    allows no token at all. Call it on a `big_stack_executor` thread."""
    import llguidance

    limits = llguidance.LLParserLimits(**LIMITS)
    m = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
    if not m.is_error():
        mask = m.compute_bitmask()
        if not m.is_error() and not any(mask):
            raise ValueError("the format allows no token")
    if m.is_error():
        raise ValueError(error_text(m))
    return m


def error_text(matcher) -> str:
    """A matcher's error on one line, at most 300 characters."""
    return " ".join(matcher.get_error().split())[:300]
