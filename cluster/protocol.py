"""The OpenAI request format: request structs, and parsing a body into one.

A field that neither OpenAI's API nor vLLM's extensions define is ignored, as vLLM
does, and named back to the client (`Parsed.ignored`); with `strict` (the config's
`router.strict_fields`) it is a 400. What pdcluster accepts of the defined fields is
cluster/policy.py; the checks that need the model (tokens, context length) are in
cluster/admission.py; the response shapes in cluster/responses.py.

Every 4xx raised here is an ``AdmissionError``; ``to_json`` gives OpenAI's error
shape. Nothing in this module allocates anything on the cluster.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from cluster import policy
from cluster.responses import AdmissionError

__all__ = [
    "AdmissionError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "StreamOptions",
    "DetokenizeRequest",
    "Parsed",
    "TokenizeRequest",
    "parse_chat",
    "parse_completion",
    "parse_detokenize",
    "parse_tokenize",
]

# ---------------------------------------------------------------------------
# request structs
# ---------------------------------------------------------------------------


class _Wire(msgspec.Struct, kw_only=True):
    """Unknown fields are skipped by the decoder and found by `_unknown_fields`."""


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


class TokenizeRequest(_Wire, kw_only=True):
    """vLLM's `POST /tokenize`: a `prompt`, or chat `messages` run through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(_Wire, kw_only=True):
    """vLLM's `POST /detokenize`."""

    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------
# parsing and checks
# ---------------------------------------------------------------------------

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"missing required field `(?P<name>[^`]+)`")


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
    if "missing required field" in msg:
        code = "missing_required_parameter"
    return AdmissionError(msg, path or None, code)


# Built once, here, at import: a Decoder resolves its type's schema when constructed,
# so the admission threads only ever run decodes (thread-safe in msgspec), never a
# first-use schema build. (A router replica was seen to SIGSEGV inside msgspec's struct
# decoding under a burst of concurrent first requests; not reproduced standalone.)
_DECODERS = {
    t: msgspec.json.Decoder(t)
    for t in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)
}
_KEYS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_KEY_LIST = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_FIELDS = {
    t: frozenset(t.__struct_fields__)
    for t in (ChatCompletionRequest, CompletionRequest, ChatMessage, ContentPart, StreamOptions)
}


class Parsed(msgspec.Struct, frozen=True):
    """A checked request, and the fields of its body that were ignored (unknown ones)."""

    request: ChatCompletionRequest | CompletionRequest
    ignored: tuple[str, ...] = ()


def _decode(body: bytes, typ: type) -> Any:
    try:
        return _DECODERS[typ].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise _msgspec_error(e) from None
    except RecursionError:  # msgspec's depth limit is Python's recursion limit
        raise AdmissionError(
            "Request body is not accepted: its JSON is nested too deeply", None, "invalid_json"
        ) from None


def _unknown_fields(body: bytes, typ: type) -> tuple[str, ...]:
    """Paths of the body's fields that `typ` does not define (top level, stream_options,
    chat messages and their content parts), from the keys alone: values are skipped."""
    top = _KEYS.decode(body)  # the body decoded as `typ` already: an object
    out = [k for k in top if k not in _FIELDS[typ]]

    def objects(raw: msgspec.Raw, many: bool) -> list[dict]:
        try:
            return _KEY_LIST.decode(raw) if many else [_KEYS.decode(raw)]
        except (msgspec.ValidationError, msgspec.DecodeError):
            return []  # null, a string content, ...

    for so in objects(top["stream_options"], False) if "stream_options" in top else []:
        out += [f"stream_options.{k}" for k in so if k not in _FIELDS[StreamOptions]]
    messages = objects(top["messages"], True) if "messages" in top else []
    for i, m in enumerate(messages):
        out += [f"messages[{i}].{k}" for k in m if k not in _FIELDS[ChatMessage]]
        for j, part in enumerate(objects(m["content"], True) if "content" in m else []):
            where = f"messages[{i}].content[{j}]"
            out += [f"{where}.{k}" for k in part if k not in _FIELDS[ContentPart]]
    return tuple(out)


def _parse(body: bytes, typ: type, strict: bool):
    req = _decode(body, typ)
    ignored = _unknown_fields(body, typ)
    if ignored and strict:
        raise AdmissionError(
            f"Unknown field '{ignored[0]}': not a parameter of the OpenAI API or of vLLM's "
            "extensions (router.strict_fields)",
            ignored[0],
            "unknown_parameter",
        )
    return req, ignored


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


def parse_chat(body: bytes, max_messages: int = 1024, strict: bool = False) -> Parsed:
    """Decode and check a /v1/chat/completions body of at most `max_messages` messages
    and content parts; raises AdmissionError."""
    _check_message_count(body, max_messages)
    req, ignored = _parse(body, ChatCompletionRequest, strict)
    policy.apply_policy(req, policy.CHAT_POLICY)
    policy.check_ranges(req)
    policy.check_messages(req)
    return Parsed(req, ignored)


def parse_completion(body: bytes, strict: bool = False) -> Parsed:
    """Decode and check a /v1/completions body; raises AdmissionError.
    On return `request.prompt` is a non-empty list of prompts (at most
    `policy.MAX_PROMPTS`), each a non-empty `str` or `list[int]`."""
    req, ignored = _parse(body, CompletionRequest, strict)
    req.prompt = _normalize_prompt(req.prompt)
    policy.apply_policy(req, policy.COMPLETION_POLICY)
    policy.check_ranges(req)
    return Parsed(req, ignored)


def _normalize_prompt(p: Any) -> list[str | list[int]]:
    """The prompts of a completions body: one string, token ids, or a batch (a list of
    strings and token-id lists), each a choice of the answer."""
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        if len(p) > policy.MAX_PROMPTS:
            raise policy.bad("prompt", f"{len(p)} prompts; at most {policy.MAX_PROMPTS}")
        return [_one_prompt(x) for x in p]
    return [_one_prompt(p)]


def _one_prompt(p: Any) -> str | list[int]:
    if isinstance(p, list):
        if not all(isinstance(x, int) for x in p):
            raise policy.bad("prompt", "a list prompt must be all token ids, or all prompts")
        if any(x < 0 for x in p):
            raise policy.bad("prompt", "token ids must be >= 0")
    if not p:
        raise policy.bad("prompt", "the prompt must be non-empty")
    return p


def parse_tokenize(body: bytes, max_messages: int = 1024) -> TokenizeRequest:
    """Decode and check a /tokenize body: exactly one of `prompt` and `messages`."""
    _check_message_count(body, max_messages)
    req = _decode(body, TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise AdmissionError(
            "Give exactly one of 'prompt' and 'messages'", "prompt", "missing_required_parameter"
        )
    if req.messages is not None:
        policy.check_messages(req)
    return req


def parse_detokenize(body: bytes) -> DetokenizeRequest:
    req = _decode(body, DetokenizeRequest)
    if any(t < 0 for t in req.tokens):
        raise policy.bad("tokens", "token ids must be >= 0")
    return req
