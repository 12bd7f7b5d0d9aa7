"""The OpenAI request format: request structs and the checks that need only the body.

Admission policy (DESIGN.md, "Data path" step 1):

* a field that neither OpenAI's API nor vLLM's extensions define is a 400
  (every struct here has ``forbid_unknown_fields=True``);
* a defined field pdcluster does not implement is accepted when ignoring it
  changes nothing the client relies on (``user``, ``service_tier``, ``metadata``
  ...) and is a 400 when it would (``n`` > 1, ``tools``, ``response_format``
  json, ``logprobs`` ...): see ``_CHAT_POLICY`` / ``_COMPLETION_POLICY``;
* ill-typed and out-of-range values are a 400 naming the parameter.

Every 4xx raised here is an ``AdmissionError``; ``to_json`` gives OpenAI's
error shape. Nothing in this module allocates anything on the cluster. The checks
that need the model (tokens, context length) are in cluster/admission.py, the
response shapes in cluster/responses.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from cluster.responses import error_body

__all__ = [
    "AdmissionError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "StreamOptions",
    "message_text",
    "parse_chat",
    "parse_completion",
]

MAX_STOP_STRINGS = 4  # OpenAI's limit
# The stop checker holds back at most this much text and checks only the new text plus
# that tail, so each token costs O(new text + this), never O(output).
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256  # each is a banned id per sequence per step before min_tokens
# torch.Generator.manual_seed accepts [-2**63, 2**64).
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


class AdmissionError(Exception):
    """A request rejected before anything is allocated (a 4xx)."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status

    def to_json(self) -> bytes:
        return error_body(self.message, "invalid_request_error", self.param, self.code)

    def __repr__(self) -> str:
        return (
            f"AdmissionError({self.message!r}, param={self.param!r}, code={self.code!r}, "
            f"status={self.status})"
        )


# ---------------------------------------------------------------------------
# request structs
# ---------------------------------------------------------------------------


class _Wire(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ContentPart(_Wire):
    """One part of a message's content. Only type "text" is implemented; the other
    OpenAI part types are declared so that they get a clear 400, not "unknown field"."""

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None


class ChatMessage(_Wire):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # OpenAI defines these on assistant / tool messages; tools are not implemented.
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None


class StreamOptions(_Wire):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # ignored: pdcluster never pads chunks


class _Common(_Wire):
    """Fields chat and completions share (OpenAI's, then vLLM's extensions)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    response_format: Any = None
    # vLLM's sampling extensions
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    spaces_between_special_tokens: bool | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logits_processors: Any = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    structured_outputs: Any = None
    return_tokens_as_token_ids: bool | None = None
    priority: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    # vLLM's chat extensions
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[Any] | None = None


class CompletionRequest(_Common, kw_only=True):
    # str, token ids, or a one-element list of either; normalized by parse_completion
    # to `str | list[int]`.
    prompt: str | list[int | str | list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# ---------------------------------------------------------------------------
# parsing and checks
# ---------------------------------------------------------------------------

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]+)`")


def _msgspec_error(e: Exception) -> AdmissionError:
    msg = str(e)
    if isinstance(e, msgspec.DecodeError) and not isinstance(e, msgspec.ValidationError):
        return AdmissionError(f"Request body is not valid JSON: {msg}", None, "invalid_json")
    path = ""
    m = _AT.search(msg)
    if m:
        path = m.group("path").lstrip(".")
    n = _NAMED.search(msg)
    if n:
        path = f"{path}.{n.group('name')}" if path else n.group("name")
    code = "invalid_type"
    if "unknown field" in msg:
        code = "unknown_parameter"
        msg += " (not a parameter of the OpenAI API or of vLLM's extensions)"
    elif "missing required field" in msg:
        code = "missing_required_parameter"
    return AdmissionError(msg, path or None, code)


def _bad(param: str, why: str) -> AdmissionError:
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
_COMMON_POLICY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_is_none_or(1), "only n=1"),
    "presence_penalty": (_is_none_or(0), "penalties are not implemented"),
    "frequency_penalty": (_is_none_or(0), "penalties are not implemented"),
    "repetition_penalty": (_is_none_or(1), "penalties are not implemented"),
    "min_p": (_is_none_or(0), "min_p is not implemented"),
    "logit_bias": (_empty, "logit_bias is not implemented"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, 'only {"type": "text"}'),
    "use_beam_search": (_is_none_or(False), "beam search is not implemented"),
    "length_penalty": (_is_none_or(1), "beam search is not implemented"),
    "prompt_logprobs": (_is_none_or(), "logprobs are not implemented"),
    "truncate_prompt_tokens": (_is_none_or(), "prompt truncation is not implemented"),
    "allowed_token_ids": (_is_none_or(), "not implemented"),
    "bad_words": (_empty, "not implemented"),
    "logits_processors": (_empty, "not implemented"),
    "guided_json": (_is_none_or(), "guided decoding is not implemented"),
    "guided_regex": (_is_none_or(), "guided decoding is not implemented"),
    "guided_choice": (_is_none_or(), "guided decoding is not implemented"),
    "guided_grammar": (_is_none_or(), "guided decoding is not implemented"),
    "structured_outputs": (_is_none_or(), "guided decoding is not implemented"),
    "spaces_between_special_tokens": (_is_none_or(True), "only true"),
    "return_tokens_as_token_ids": (_is_none_or(False), "not implemented"),
}
_CHAT_POLICY = {
    **_COMMON_POLICY,
    "logprobs": (_is_none_or(False), "logprobs are not implemented"),
    "top_logprobs": (_is_none_or(0), "logprobs are not implemented"),
    "tools": (_empty, "tool calling is not implemented"),
    # tool_choice is checked in _apply_policy: "auto" with no tools is plain text.
    "functions": (_empty, "function calling is not implemented"),
    "function_call": (lambda v: v is None or v == "none", "function calling is not implemented"),
    "audio": (_is_none_or(), "audio output is not implemented"),
    "modalities": (lambda v: v is None or v == ["text"], 'only ["text"]'),
    "moderation": (_is_none_or(), "moderation is not implemented"),
    "web_search_options": (_is_none_or(), "web search is not implemented"),
    "echo": (_is_none_or(False), "echo is not implemented"),
    "add_generation_prompt": (_is_none_or(True), "the generation prompt is always added"),
    "continue_final_message": (_is_none_or(False), "not implemented"),
    "chat_template": (_is_none_or(), "the model's own chat template is always used"),
    "chat_template_kwargs": (_empty, "the model's own chat template is always used"),
    "documents": (_empty, "not implemented"),
}
_COMPLETION_POLICY = {
    **_COMMON_POLICY,
    "logprobs": (_is_none_or(), "logprobs are not implemented"),
    "echo": (_is_none_or(False), "echo is not implemented"),
    "suffix": (_empty, "suffix (insertion) is not implemented"),
    "best_of": (_is_none_or(1), "only best_of=1"),
    "add_special_tokens": (_is_none_or(True), "special tokens are always added"),
}


def _apply_policy(req: ChatCompletionRequest | CompletionRequest, policy: dict) -> None:
    for name, (ok, allowed) in policy.items():
        v = getattr(req, name)
        if not ok(v):
            raise _unsupported(name, v, allowed)
    if isinstance(req, ChatCompletionRequest):
        tc = req.tool_choice
        if not (tc is None or tc == "none" or (tc == "auto" and not req.tools)):
            raise _unsupported("tool_choice", tc, "tool calling is not implemented")


def _check_ranges(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.cache_salt is not None and not req.cache_salt:
        raise _bad("cache_salt", "an empty string; give a non-empty salt or leave it out")
    t = req.temperature
    if t is not None and not 0.0 <= t <= 2.0:  # also rejects NaN
        raise _bad("temperature", f"{t} is not in [0, 2]")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise _bad("top_p", f"{req.top_p} is not in (0, 1]")
    if req.top_k is not None and req.top_k < -1:
        raise _bad("top_k", f"{req.top_k}; use -1 (or 0) to disable, or a value >= 1")
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, name, None)
        if v is not None and v < 1:
            raise _bad(name, f"{v}; it must be at least 1")
    if req.min_tokens is not None:
        if req.min_tokens < 0:
            raise _bad("min_tokens", f"{req.min_tokens}; it must be at least 0")
        cap = requested_max_tokens(req)
        if cap is not None and req.min_tokens > cap:
            raise _bad("min_tokens", f"{req.min_tokens} is larger than max_tokens ({cap})")
    if req.n is not None and req.n < 1:
        raise _bad("n", f"{req.n}; it must be at least 1")
    if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX:
        raise _bad("seed", f"{req.seed} is outside [-2**63, 2**64)")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None:
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}")
        if any(s == "" for s in stop):
            raise _bad("stop", "stop strings must be non-empty")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
            raise _bad("stop", f"a stop string is longer than {MAX_STOP_STRING_CHARS} characters")
    if req.stop_token_ids is not None:
        if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise _bad(
                "stop_token_ids", f"{len(req.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}"
            )
        if any(t < 0 for t in req.stop_token_ids):
            raise _bad("stop_token_ids", "token ids must be >= 0")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v is not None and not -2.0 <= v <= 2.0:
            raise _bad(name, f"{v} is not in [-2, 2]")


def message_text(m: ChatMessage) -> str:
    """A message's content as one string (text parts joined with newlines, as vLLM does)."""
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "\n".join(p.text or "" for p in m.content)


_ROLES = ("system", "user", "assistant")


def _check_messages(req: ChatCompletionRequest) -> None:
    if not req.messages:
        raise _bad("messages", "it must be a non-empty list")
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role not in _ROLES:
            hint = " (tools are not implemented)" if m.role == "tool" else ""
            raise AdmissionError(
                f"Invalid '{where}.role': {m.role!r}; expected one of {', '.join(_ROLES)}{hint}",
                f"{where}.role",
                "invalid_value",
            )
        if m.tool_calls or m.function_call is not None or m.tool_call_id is not None:
            raise _unsupported(
                f"{where}.tool_calls",
                m.tool_calls or m.function_call or m.tool_call_id,
                "tool calling is not implemented",
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


# Built once, here, at import: a Decoder resolves its type's schema when constructed,
# so the admission threads only ever run decodes (thread-safe in msgspec), never a
# first-use schema build. (A router replica was seen to SIGSEGV inside msgspec's struct
# decoding under a burst of concurrent first requests; not reproduced standalone.)
_DECODERS = {t: msgspec.json.Decoder(t) for t in (ChatCompletionRequest, CompletionRequest)}


def _decode(body: bytes, typ: type) -> Any:
    try:
        return _DECODERS[typ].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise _msgspec_error(e) from None
    except RecursionError:  # msgspec's depth limit is Python's recursion limit
        raise AdmissionError(
            "Request body is not accepted: its JSON is nested too deeply", None, "invalid_json"
        ) from None


class _MessageShape(msgspec.Struct):
    content: str | list[msgspec.Raw] | None = None


class _ChatShape(msgspec.Struct):
    """Just enough of a chat body to count its messages and content parts, every other
    field skipped: far cheaper than building a struct per message."""

    messages: list[_MessageShape] = []


_SHAPE = msgspec.json.Decoder(_ChatShape)


def _check_message_count(body: bytes, max_messages: int) -> None:
    """Refuse more than `max_messages` messages and content parts before the full decode:
    ~180,000 empty messages fit in 4 MiB, and building, checking and templating each one
    costs the router seconds of CPU for a request with no content."""
    try:
        messages = _SHAPE.decode(body).messages
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return  # the full decode names the problem
    n = len(messages)
    if n <= max_messages:
        n += sum(len(m.content) for m in messages if isinstance(m.content, list))
    if n > max_messages:
        raise AdmissionError(
            f"Invalid 'messages': more than {max_messages} messages and content parts "
            "(router.max_messages)",
            "messages",
            "too_many_messages",
        )


def parse_chat(body: bytes, max_messages: int = 1024) -> ChatCompletionRequest:
    """Decode and check a /v1/chat/completions body of at most `max_messages` messages
    and content parts; raises AdmissionError."""
    _check_message_count(body, max_messages)
    req = _decode(body, ChatCompletionRequest)
    _apply_policy(req, _CHAT_POLICY)
    _check_ranges(req)
    _check_messages(req)
    return req


def parse_completion(body: bytes) -> CompletionRequest:
    """Decode and check a /v1/completions body; raises AdmissionError.
    On return `req.prompt` is a non-empty `str` or `list[int]`."""
    req = _decode(body, CompletionRequest)
    req.prompt = _normalize_prompt(req.prompt)
    _apply_policy(req, _COMPLETION_POLICY)
    _check_ranges(req)
    return req


def _normalize_prompt(p: Any) -> str | list[int]:
    if isinstance(p, list):
        if p and all(isinstance(x, int) for x in p):
            if any(x < 0 for x in p):
                raise _bad("prompt", "token ids must be >= 0")
            return p
        if len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise AdmissionError(
                "batch prompts not supported: send one prompt per request",
                "prompt",
                "unsupported_value",
            )
        if len(p) == 1 and not isinstance(p[0], int):
            return _normalize_prompt(p[0])
        if p:
            raise _bad("prompt", "a list prompt must be all token ids or one string")
    if not p:
        raise _bad("prompt", "the prompt must be non-empty")
    return p


def requested_max_tokens(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """The completion length the client asked for (max_completion_tokens first), if any."""
    return getattr(req, "max_completion_tokens", None) or req.max_tokens
