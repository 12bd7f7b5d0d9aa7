"""Structured output at admission: every way a request asks for a format, made into
one llguidance grammar (`SamplingParams.grammar`) that the workers compile and mask
with.

The ways: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, and a forced tool
call (cluster/tools.py). At most one per request. A grammar is validated here, on an
admission thread, against the model's tokenizer (cached, bounded); one llguidance
cannot compile is a 400 naming the reason, before anything is allocated.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from cluster.policy import bad
from cluster.protocol import AdmissionError
from wire.grammar import JSON_OPTIONS, MAX_GRAMMAR_BYTES, big_stack_executor, digest, probe
from wire.grammar import tokenizer as llg_tokenizer

MAX_CHOICES = 1024
VALIDATED_CACHE = 256  # grammars validated per router replica, most recent kept
# structured_outputs keys that change nothing here: vLLM's backend choice and fallback,
# and its whitespace switch (JSON never has free whitespace here).
_SO_HARMLESS = {"backend", "disable_fallback", "disable_any_whitespace"}


def json_grammar(schema: Any, param: str) -> str:
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise bad(param, f"the schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise bad(param, "a JSON schema is an object")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_OPTIONS)
    except (ValueError, TypeError, RecursionError) as e:
        raise bad(param, f"the schema cannot be used: {str(e)[:300]}") from None


def _choice(choices: Any, param: str) -> str:
    import llguidance

    if (
        not isinstance(choices, list)
        or not choices
        or len(choices) > MAX_CHOICES
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise bad(param, f"a list of 1-{MAX_CHOICES} non-empty strings")
    return llguidance.grammar_from("choice", choices)


def _text_grammar(kind: str, text: Any, param: str) -> str:
    import llguidance

    if not isinstance(text, str) or not text:
        raise bad(param, f"a non-empty {kind} string")
    try:
        # "grammar": Lark (llguidance's) or GBNF (llama.cpp's, xgrammar's), told apart here.
        return llguidance.grammar_from("regex" if kind == "regex" else "grammar", text)
    except ValueError as e:
        raise bad(param, str(e)[:300]) from None


def _from_response_format(rf: Any) -> str | None:
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise bad("response_format", "json_schema needs {'name': ..., 'schema': {...}}")
        return json_grammar(spec["schema"], "response_format.json_schema.schema")
    raise bad("response_format", 'its type is one of "text", "json_object", "json_schema"')


# What each kind of structured_outputs (and each guided_<kind>) is made into.
_KINDS = {
    "json": json_grammar,
    "regex": lambda v, param: _text_grammar("regex", v, param),
    "choice": _choice,
    "grammar": lambda v, param: _text_grammar("grammar", v, param),
    "json_object": lambda _, param: json_grammar({"type": "object"}, param),
}


def _from_structured_outputs(so: Any) -> str | None:
    if so is None:
        return None
    if not isinstance(so, dict):
        raise bad("structured_outputs", "an object with one of json, regex, choice, grammar")
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    other = sorted(set(given) - set(_KINDS) - _SO_HARMLESS)
    if other:
        raise bad(f"structured_outputs.{other[0]}"[:80], "not supported by pdcluster")
    kinds = [k for k in _KINDS if k in given]
    if len(kinds) != 1:
        raise bad(
            "structured_outputs",
            "exactly one of json, regex, choice, grammar, json_object"
            + (f" (got {', '.join(kinds)})" if kinds else ""),
        )
    kind = kinds[0]
    return _KINDS[kind](given[kind], f"structured_outputs.{kind}")


def grammar_of(req, tool_grammar: str | None = None) -> tuple[str, str] | None:
    """(the field that asks, its grammar) for the one format a request asks for (None:
    free text); a 400 when it asks for more than one, or one that cannot be made."""
    asked = {
        "response_format": _from_response_format(req.response_format),
        "structured_outputs": _from_structured_outputs(req.structured_outputs),
    }
    for kind in ("json", "regex", "choice", "grammar"):  # vLLM's older names
        field = f"guided_{kind}"
        value = getattr(req, field)
        asked[field] = None if value is None else _KINDS[kind](value, field)
    asked["tool_choice"] = tool_grammar
    given = [k for k, v in asked.items() if v is not None]
    if len(given) > 1:
        raise AdmissionError(
            f"Invalid '{given[1]}': the request already asks for a format with "
            f"'{given[0]}'; give one of them",
            given[1],
            "invalid_value",
        )
    if not given:
        return None
    if getattr(req, "ignore_eos", None):
        raise bad("ignore_eos", "a structured output ends at the end of its format")
    if req.min_tokens:
        raise bad("min_tokens", "a structured output ends where its format ends")
    field, grammar = given[0], asked[given[0]]
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise bad(
            field, f"the format is {len(grammar)} bytes compiled; at most {MAX_GRAMMAR_BYTES}"
        )
    return field, grammar


class Validator:
    """Grammars checked against the model's tokenizer: compiled, and their first mask
    computed (wire.grammar.probe), on one large-stack thread the admission threads share;
    the results of the most recent VALIDATED_CACHE kept by digest. The tokenizer
    llguidance needs is built at the first grammar (~0.4 s for a 49k vocabulary)."""

    def __init__(self, model_dir: str, vocab_size: int, eos_ids: list[int]):
        self._model_dir, self._vocab, self._eos = model_dir, vocab_size, eos_ids
        self._tokenizer = None
        self._seen: OrderedDict[bytes, str] = OrderedDict()  # digest -> error ("" = valid)
        self._lock = threading.Lock()
        self._thread = None

    def check(self, grammar: str, param: str) -> None:
        key = digest(grammar)
        with self._lock:
            error = self._seen.get(key)
            if error is not None:
                self._seen.move_to_end(key)
            elif self._thread is None:
                self._thread = big_stack_executor("grammar-check")
        if error is None:
            error = self._thread.submit(self._probe, grammar).result()
            with self._lock:
                self._seen[key] = error
                while len(self._seen) > VALIDATED_CACHE:
                    self._seen.popitem(last=False)
        if error:
            raise bad(param, f"the format cannot be compiled: {error}")

    def _probe(self, grammar: str) -> str:  # the large-stack thread
        if self._tokenizer is None:
            self._tokenizer = llg_tokenizer(self._model_dir, self._vocab, self._eos)
        try:
            probe(self._tokenizer, grammar)
        except ValueError as e:
            return str(e) or "unknown error"
        return ""
