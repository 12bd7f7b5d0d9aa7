"""What the router sends back, in OpenAI's shapes: completion objects, stream
chunks, server-sent events, the model list, and the error body."""

from __future__ import annotations

import time
from typing import Any

import msgspec

SSE_DONE = b"data: [DONE]\n\n"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdcluster")
    except PackageNotFoundError:
        return "unknown"


VERSION = _version()  # GET /version

# The `type` string per HTTP status. OpenAI uses "invalid_request_error" for all
# 4xx request problems (including 404 model_not_found) and "server_error" for 5xx;
# its 429s carry code "rate_limit_exceeded". The official client maps exceptions
# by status code, never by `type`, so these are descriptive only.
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


def error_type_for(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str,
    type: str,  # noqa: A002 - OpenAI's name
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return msgspec.json.encode(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    )


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: <json>\\n\\n`."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: of the prompt, found in a prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _object(chat: bool, chunk: bool) -> str:
    if chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _response(
    id: str,  # noqa: A002 - OpenAI's name
    obj: str,
    model: str,
    created: int | None,
    choices: list,
    usage: dict | None = None,
) -> dict:
    out = {
        "id": id,
        "object": obj,
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def completion(
    chat: bool,
    id: str,  # noqa: A002
    model: str,
    choices: list[tuple],
    usage: dict,
    created: int | None = None,
) -> bytes:
    """A whole (non-streamed) `chat.completion` or `text_completion` object, encoded;
    `choices`: (text, finish reason, logprobs, vLLM's prompt_logprobs, tool calls) of
    each, in index order. Prompt logprobs are a completion choice's field, a chat
    response's own."""
    out, prompt_lps = [], None
    for index, (text, finish_reason, logprobs, prompt, calls) in enumerate(choices):
        choice: dict = {"index": index}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if calls:
                choice["message"]["tool_calls"] = calls
            prompt_lps = prompt_lps or prompt
        else:
            choice["text"] = text
            if prompt is not None:
                choice["prompt_logprobs"] = prompt
        choice |= {"finish_reason": finish_reason or "stop", "logprobs": logprobs}
        out.append(choice)
    body = _response(id, _object(chat, False), model, created, out, usage)
    if prompt_lps is not None:
        body["prompt_logprobs"] = prompt_lps
    return msgspec.json.encode(body)


def chunk(
    chat: bool,
    id: str,  # noqa: A002
    model: str,
    created: int,
    text: str | None,
    finish_reason: str | None,
    role: str | None = None,
    index: int = 0,
    logprobs: dict | None = None,
    tool_calls: list[dict] | None = None,
) -> dict:
    """One streamed chunk, of choice `index`. A chat stream's first chunk passes
    role="assistant" (delta {"role": "assistant", "content": ""}); a finishing chunk
    carries finish_reason and whatever text came with it (an empty delta when none);
    `tool_calls`: OpenAI's tool-call deltas."""
    choice: dict = {"index": index}
    if chat:
        delta: dict = {}
        if role is not None:
            delta = {"role": role, "content": text or ""}
        elif text:
            delta = {"content": text}
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    choice |= {"finish_reason": finish_reason, "logprobs": logprobs}
    return _response(id, _object(chat, True), model, created, [choice])


def usage_chunk(chat: bool, id: str, model: str, created: int, usage: dict) -> dict:  # noqa: A002
    """The final chunk sent when stream_options.include_usage: no choices, just usage."""
    return _response(id, _object(chat, True), model, created, [], usage)


def _model(model_id: str, created: int | None) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": int(time.time()) if created is None else created,
        "owned_by": "pdcluster",
    }


def models_list(model_id: str, created: int | None = None) -> bytes:
    """GET /v1/models."""
    return msgspec.json.encode({"object": "list", "data": [_model(model_id, created)]})


def model_card(model_id: str, created: int | None = None) -> bytes:
    """GET /v1/models/{id}."""
    return msgspec.json.encode(_model(model_id, created))


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


IGNORED_HEADER_CHARS = 1024


def ignored_fields_header(names: tuple[str, ...]) -> str:
    """Field names as one header value: printable ASCII only (they come from the client),
    at most IGNORED_HEADER_CHARS, with how many there were when some are left out."""
    kept: list[str] = []
    for n in names:
        if n.isascii() and n.isprintable() and "," not in n:
            if len(", ".join([*kept, n])) > IGNORED_HEADER_CHARS - 32:
                break
            kept.append(n)
    if len(kept) < len(names):
        kept.append(f"... ({len(names)} in all)")
    return ", ".join(kept)
