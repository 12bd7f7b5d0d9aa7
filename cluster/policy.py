"""What pdcluster accepts of a parsed request: the admission policy for fields it
defines but does not implement, value ranges, and chat messages.

* a defined field pdcluster does not implement is accepted when ignoring it changes
  nothing the client relies on (``user``, ``service_tier``, ``metadata`` ...) and is a
  400 when it would (beam search, ``functions``, audio ...):
  see ``CHAT_POLICY`` / ``COMPLETION_POLICY``;
* ill-typed and out-of-range values are a 400 naming the parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from cluster.responses import AdmissionError

MAX_STOP_STRINGS = 4  # OpenAI's limit
# The stop checker holds back at most this much text and checks only the new text plus
# that tail, so each token costs O(new text + this), never O(output).
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256  # each is a banned id per sequence per step before min_tokens
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_BAD_WORDS = 64
MAX_PROMPTS = 64  # a /v1/completions batch: one choice each
MAX_LOGPROBS = 20  # top logprobs per token (vLLM's default --max-logprobs)
MAX_N = 128  # choices per prompt (OpenAI's limit for n); router.max_queued bounds the total
# torch.Generator.manual_seed accepts [-2**63, 2**64).
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def bad(param: str, why: str) -> AdmissionError:
    return AdmissionError(f"Invalid '{param}': {why}", param, "invalid_value")


def _unsupported(param: str, value: Any, allowed: str) -> AdmissionError:
    try:
        shown = msgspec.json.encode(value).decode()
    except RecursionError:  # decoded just inside the depth limit, encoded from deeper down
        shown = "(nested too deeply to show)"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return AdmissionError(
        f"'{param}'={shown} is not supported by pdcluster ({allowed})", param, "unsupported_value"
    )


def _is_none_or(*ok: Any) -> Callable[[Any], bool]:
    """None, or one of `ok` (bools compare by identity so False never equals 0)."""

    def check(v: Any) -> bool:
        return v is None or any(
            v is x if isinstance(x, bool) or isinstance(v, bool) else v == x for x in ok
        )

    return check


def _empty(v: Any) -> bool:
    return not v


# field -> (accepted?, what is accepted). Fields not listed are either implemented
# or ignorable (user, service_tier, metadata, store, parallel_tool_calls, priority...).
COMMON_POLICY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_beam_search": (_is_none_or(False), "beam search is not implemented"),
    "length_penalty": (_is_none_or(1), "beam search is not implemented"),
    "truncate_prompt_tokens": (_is_none_or(), "prompt truncation is not implemented"),
    "logits_processors": (_empty, "not implemented"),
    "spaces_between_special_tokens": (_is_none_or(True), "only true"),
}
CHAT_POLICY = {
    **COMMON_POLICY,
    "functions": (_empty, "function calling is not implemented"),
    "function_call": (lambda v: v is None or v == "none", "function calling is not implemented"),
    "audio": (_is_none_or(), "audio output is not implemented"),
    "modalities": (lambda v: v is None or v == ["text"], 'only ["text"]'),
    "moderation": (_is_none_or(), "moderation is not implemented"),
    "web_search_options": (_is_none_or(), "web search is not implemented"),
    "echo": (_is_none_or(False), "echo is not implemented"),
    "chat_template": (_is_none_or(), "the model's own chat template is always used"),
    "documents": (_empty, "not implemented"),
    "add_special_tokens": (_is_none_or(False), "the chat template adds its own special tokens"),
}
COMPLETION_POLICY = {
    **COMMON_POLICY,
    "suffix": (_empty, "suffix (insertion) is not implemented"),
    "add_special_tokens": (_is_none_or(True), "special tokens are always added"),
}


def apply_policy(req, policy: dict) -> None:
    for name, (ok, allowed) in policy.items():
        v = getattr(req, name)
        if not ok(v):
            raise _unsupported(name, v, allowed)


def check_ranges(req) -> None:
    if req.cache_salt is not None and not req.cache_salt:
        raise bad("cache_salt", "an empty string; give a non-empty salt or leave it out")
    t = req.temperature
    if t is not None and not 0.0 <= t <= 2.0:  # also rejects NaN
        raise bad("temperature", f"{t} is not in [0, 2]")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise bad("top_p", f"{req.top_p} is not in (0, 1]")
    if req.top_k is not None and req.top_k < -1:
        raise bad("top_k", f"{req.top_k}; use -1 (or 0) to disable, or a value >= 1")
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, name, None)
        if v is not None and v < 1 and not (v == 0 and echo_only(req)):
            raise bad(name, f"{v}; it must be at least 1 (0 only with echo, to score a prompt)")
    if req.min_tokens is not None:
        if req.min_tokens < 0:
            raise bad("min_tokens", f"{req.min_tokens}; it must be at least 0")
        cap = requested_max_tokens(req)
        if cap is not None and req.min_tokens > cap:
            raise bad("min_tokens", f"{req.min_tokens} is larger than max_tokens ({cap})")
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise bad("n", f"{req.n} is not in [1, {MAX_N}]")
    best_of = getattr(req, "best_of", None)
    if best_of is not None:
        if not (req.n or 1) <= best_of <= MAX_N:
            raise bad("best_of", f"{best_of} is not in [n, {MAX_N}] (n = {req.n or 1})")
        if req.stream and best_of > (req.n or 1):
            raise bad("best_of", "the best of several runs cannot be streamed")
    _check_logprobs(req)
    if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX:
        raise bad("seed", f"{req.seed} is outside [-2**63, 2**64)")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None:
        if len(stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}")
        if any(s == "" for s in stop):
            raise bad("stop", "stop strings must be non-empty")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
            raise bad("stop", f"a stop string is longer than {MAX_STOP_STRING_CHARS} characters")
    if req.stop_token_ids is not None:
        if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad(
                "stop_token_ids", f"{len(req.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}"
            )
        if any(t < 0 for t in req.stop_token_ids):
            raise bad("stop_token_ids", "token ids must be >= 0")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v is not None and not -2.0 <= v <= 2.0:
            raise bad(name, f"{v} is not in [-2, 2]")
    if req.repetition_penalty is not None and not 0.0 < req.repetition_penalty <= 10.0:
        raise bad("repetition_penalty", f"{req.repetition_penalty} is not in (0, 10]")
    if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
        raise bad("min_p", f"{req.min_p} is not in [0, 1]")
    if req.logit_bias:
        if len(req.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"{len(req.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        for k, v in req.logit_bias.items():
            if not (k.isascii() and k.isdigit() and len(k) <= 9):
                raise bad("logit_bias", f"{k[:20]!r} is not a token id")
            if not -100.0 <= v <= 100.0:
                raise bad("logit_bias", f"the bias {v} of token {k} is not in [-100, 100]")
    if req.allowed_token_ids is not None:
        if not req.allowed_token_ids:
            raise bad("allowed_token_ids", "an empty list allows no token")
        if any(t < 0 for t in req.allowed_token_ids):
            raise bad("allowed_token_ids", "token ids must be >= 0")
    if req.bad_words:
        if len(req.bad_words) > MAX_BAD_WORDS:
            raise bad("bad_words", f"{len(req.bad_words)} words; at most {MAX_BAD_WORDS}")
        if any(not w.strip() or len(w) > MAX_STOP_STRING_CHARS for w in req.bad_words):
            raise bad(
                "bad_words", f"each must be non-blank and at most {MAX_STOP_STRING_CHARS} chars"
            )


def _check_logprobs(req) -> None:
    chat = hasattr(req, "messages")
    k = ("top_logprobs", req.top_logprobs) if chat else ("logprobs", req.logprobs)
    for name, v in (k, ("prompt_logprobs", req.prompt_logprobs)):
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise bad(name, f"{v} is not in [0, {MAX_LOGPROBS}]")
    if chat and req.top_logprobs and not req.logprobs:
        raise bad("top_logprobs", "it needs 'logprobs': true")
    if req.stream and req.prompt_logprobs is not None:  # as vLLM: not streamed
        raise bad("prompt_logprobs", "prompt logprobs are not available when streaming")


def echo_only(req) -> bool:
    """A completions request that only scores its prompt: `echo` with `max_tokens` 0
    (OpenAI's legacy idiom; vLLM's too). One token is computed and not returned."""
    return (
        getattr(req, "echo", None) is True
        and getattr(req, "prompt", None) is not None
        and (req.max_tokens == 0)
    )


def runs_per_prompt(req) -> tuple[int, int]:
    """(choices returned per prompt, runs sampled per prompt): n, and best_of when set."""
    n = req.n or 1
    return n, max(n, getattr(req, "best_of", None) or n)


def logprobs_asked(req) -> tuple[int | None, int | None]:
    """(top logprobs per output token, per prompt token): None where not asked for.
    A completion's `echo` with `logprobs` asks for the prompt's too."""
    if hasattr(req, "messages"):
        out = (req.top_logprobs or 0) if req.logprobs else None
        return out, req.prompt_logprobs
    prompt = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt = max(prompt or 0, req.logprobs)
    return req.logprobs, prompt


def message_text(m) -> str:
    """A message's content as one string (text parts joined with newlines, as vLLM does)."""
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "\n".join(p.text or "" for p in m.content)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(req) -> None:
    if not req.messages:
        raise bad("messages", "it must be a non-empty list")
    if req.continue_final_message:
        if req.add_generation_prompt:
            raise bad(
                "continue_final_message",
                "it cannot be true together with add_generation_prompt; set "
                "add_generation_prompt to false",
            )
        if req.messages[-1].role != "assistant":
            raise bad("continue_final_message", "the last message must be the assistant's")
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role not in _ROLES:
            raise AdmissionError(
                f"Invalid '{where}.role': {m.role!r}; expected one of {', '.join(_ROLES)}",
                f"{where}.role",
                "invalid_value",
            )
        if m.function_call is not None:
            raise _unsupported(
                f"{where}.function_call", m.function_call, "the older functions API; use tools"
            )
        if m.tool_calls and (m.role != "assistant" or not _calls_ok(m.tool_calls)):
            raise bad(
                f"{where}.tool_calls",
                "an assistant's list of {'id', 'type': 'function', 'function': {'name', "
                "'arguments'}}",
            )
        if m.audio is not None:
            raise _unsupported(f"{where}.audio", m.audio, "audio is not implemented")
        if m.content is None and m.role != "assistant":
            raise AdmissionError(
                f"Invalid '{where}.content': a {m.role} message needs content",
                f"{where}.content",
                "invalid_value",
            )
        if isinstance(m.content, list):
            for j, p in enumerate(m.content):
                pw = f"{where}.content[{j}]"
                if p.type != "text":
                    raise _unsupported(f"{pw}.type", p.type, "only text content parts")
                if p.text is None:
                    raise AdmissionError(
                        f"Invalid '{pw}': a text part needs 'text'",
                        f"{pw}.text",
                        "missing_required_parameter",
                    )


def _calls_ok(calls) -> bool:
    return all(
        isinstance(c, dict)
        and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", ""), str | dict)
        for c in calls
    )


def requested_max_tokens(req) -> int | None:
    """The completion length the client asked for (max_completion_tokens first), if any."""
    return getattr(req, "max_completion_tokens", None) or req.max_tokens


# What each implemented field does here, and why each ignored one may be: with the
# policy tables above, the request-field reference (docs/request-fields.md,
# tools/request_fields.py) is generated from these.
SUPPORTED = {
    "model": "must name the served model (`router.model_name`); any other is a 404 "
    "`model_not_found`",
    "messages": "roles system, developer (templated as system), user, assistant (with "
    "`tool_calls`), tool; string content or text parts",
    "prompt": "a string, token ids, or a one-element list of either",
    "max_tokens": "clamped to the room left in `model.max_model_len` (a 400 with "
    "`router.strict_max_tokens`); default `router.default_max_tokens`",
    "max_completion_tokens": "as `max_tokens`, which it takes precedence over",
    "temperature": "[0, 2]; below 1e-5 greedy",
    "top_p": "(0, 1]",
    "top_k": "-1 or 0: off",
    "seed": "a generator per request: the same seed gives the same text, across a migration too",
    "stop": f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters, "
    "cut exactly by the router",
    "stop_token_ids": f"at most {MAX_STOP_TOKEN_IDS} ids of the vocabulary",
    "stream": "server-sent events; the first chunk goes out with the first token",
    "stream_options": "`include_usage`; `include_obfuscation` ignored",
    "ignore_eos": "vLLM's",
    "min_tokens": "vLLM's: EOS and `stop_token_ids` banned before it",
    "skip_special_tokens": "vLLM's",
    "include_stop_str_in_output": "vLLM's",
    "cache_salt": "vLLM's: prompts share cached prefix blocks only under the same salt",
    "presence_penalty": "[-2, 2], on output tokens, as OpenAI and vLLM define it",
    "frequency_penalty": "[-2, 2], per occurrence in the output, as OpenAI and vLLM define it",
    "repetition_penalty": "vLLM's (0, 10]: on prompt and output tokens, as Hugging Face's",
    "min_p": "vLLM's [0, 1]: after temperature, before top-k and top-p",
    "logit_bias": f"token id (a string) -> bias in [-100, 100], at most {MAX_LOGIT_BIAS}",
    "allowed_token_ids": "vLLM's: only these ids may be sampled",
    "bad_words": f"vLLM's: at most {MAX_BAD_WORDS} words, each never completed (with and "
    "without a leading space)",
    "n": f"1-{MAX_N} choices per prompt, each its own sequence (its seed `seed` + its index, "
    "as vLLM's); a batch of prompts gives n per prompt, prompt i's at indexes i*n..",
    "best_of": f"completions: n-{MAX_N} runs per prompt, the n with the highest cumulative "
    "logprob returned; not with `stream`",
    "echo": "the prompt's text before the completion (with `max_tokens` 0 the prompt alone, "
    "scored: nothing generated is returned); with `logprobs`, the prompt "
    "tokens' logprobs before the completion's (the first prompt token's are null)",
    "logprobs": f"chat: true for each token's logprob; completions: 0-{MAX_LOGPROBS} top "
    "logprobs per token. The model's log-softmax before any sampling transform (vLLM's "
    "`raw_logprobs`), token 1's computed by prefill and carried across the transfer",
    "top_logprobs": f"0-{MAX_LOGPROBS}, with `logprobs`: true",
    "return_tokens_as_token_ids": 'vLLM\'s: logprobs name each token "token_id:<id>", not its text',
    "prompt_logprobs": f"vLLM's: 0-{MAX_LOGPROBS} top logprobs per prompt token, in vLLM's "
    "shape (a choice's field for completions, the response's for chat); not with `stream`. "
    "Such a prompt is not served from the prefix cache",
    "add_generation_prompt": "vLLM's; default true (false with `continue_final_message`)",
    "continue_final_message": "vLLM's: completes the last (assistant) message in place",
    "chat_template_kwargs": "vLLM's: variables for the model's chat template, not its own "
    "arguments",
    "response_format": '`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": '
    '{"name", "schema"}}`: the output is masked to the schema on every worker (llguidance), '
    "across a migration too; a schema it cannot compile is a 400 naming the reason",
    "structured_outputs": "vLLM's: one of `json` (a schema), `regex`, `choice` (strings), "
    "`grammar` (Lark or GBNF), `json_object`",
    "guided_json": "vLLM's older name of `structured_outputs.json`",
    "guided_regex": "vLLM's older name of `structured_outputs.regex`",
    "guided_choice": "vLLM's older name of `structured_outputs.choice`",
    "guided_grammar": "vLLM's older name of `structured_outputs.grammar`",
    "tools": "function tools (at most 128); templates that do not render tools get them "
    "in the model family's format (`model.tool_call_parser`)",
    "tool_choice": '"none" (tools not shown), "auto" (the default with tools: calls read by '
    '`model.tool_call_parser`), "required" and a named function (enforced by structured '
    "output, on any model); streamed calls come as OpenAI's tool-call deltas",
    "parallel_tool_calls": 'false: at most one call with "required"',
}
IGNORED = {
    "user": "an end-user id for the provider's abuse tracking",
    "service_tier": "one tier here",
    "metadata": "stored completions are not kept",
    "store": "stored completions are not kept",
    "priority": "vLLM's priority scheduling; requests are served in arrival order",
    "request_id": "vLLM's; the router names each request itself (`pdcluster-request-id`)",
    "guided_decoding_backend": "llguidance is the one backend",
    "prediction": "predicted outputs only speed up a provider; the text is the same",
    "prompt_cache_key": "a routing hint; prefix caching is automatic",
    "prompt_cache_options": "a routing hint; prefix caching is automatic",
    "prompt_cache_retention": "a routing hint; prefix caching is automatic",
    "reasoning_effort": "for reasoning models; this one does not reason",
    "verbosity": "for reasoning models; this one does not reason",
    "safety_identifier": "an end-user id for the provider's abuse tracking",
}
