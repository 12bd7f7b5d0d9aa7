"""Streaming load against any OpenAI-compatible endpoint.

Closed loop (`concurrency` clients, each with one request at a time) or open loop
(Poisson arrivals at `rate` per second). Every request is kept as a `Record`: when it
started, its first token, each chunk and its end, its HTTP status, any error message,
and its text. `pdcluster chaos` runs its faults under this load, and `pdcluster bench`
(bench/) measures with it, so both see requests the same way.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Record:
    index: int
    prompt: int  # index into LoadShape.prompts
    start: float  # time.time()
    first: float | None = None  # first chunk with text
    end: float | None = None
    status: int | None = None
    error: str | None = None  # status and message, or how the connection ended
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0  # from the endpoint's usage chunk
    finish_reason: str | None = None
    chunk_times: list[float] = field(default_factory=list)
    hung: bool = False  # no end by LoadShape.hung_after_s
    rejected: bool = False  # sent LoadShape.rejected_prompt, which must be refused
    # A structured request (LoadShape.formats): whether its text (a tool call's
    # arguments) parsed and validated against its schema; None for other requests.
    valid: bool | None = None

    @property
    def refused(self) -> bool:
        """A 400 for a prompt longer than the model's context, as a rejected request expects."""
        return self.status == 400 and (self.error or "").startswith("400 context_length_exceeded")

    @property
    def completed(self) -> bool:
        """A 200 that ran to its finish reason."""
        return self.status == 200 and self.error is None and self.finish_reason is not None

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start


@dataclass(frozen=True)
class LoadShape:
    prompts: list  # text prompts (or token id lists), cycled in order
    max_tokens: int
    model: str
    concurrency: int = 8  # closed loop: this many clients; open loop: the most in flight
    rate: float | None = None  # open loop: Poisson arrivals per second
    endpoint: str = "/v1/completions"
    hung_after_s: float = 130.0
    # Greedy and exactly max_tokens long, so every prompt's text is known in advance.
    body: dict = field(default_factory=lambda: {"temperature": 0, "ignore_eos": True})
    # Every other prompt (odd index) sampled with a seed of its own instead: a seeded
    # text must not change with the path or a migration either.
    seeded: dict | None = None
    seed: int = 0
    # max_tokens per prompt (same index), for output lengths drawn from a distribution;
    # empty: max_tokens for every request.
    lengths: tuple[int, ...] = ()
    total: int = 0  # send this many requests, then nothing more (0: until stop())
    stream: bool = True  # False: each answer is one JSON body
    # This share of the requests (evenly spread) send `rejected_prompt` instead, a prompt
    # over the context that must get a 400: refusals cost admission work and memory too.
    rejected_share: float = 0.0
    rejected_prompt: str = ""
    # Structured output: prompts whose index is 2 mod 4 ask for a JSON schema, 4 mod 8
    # for a forced tool call whose arguments follow it (both through the chat endpoint,
    # greedy, ended by their format): each answer must parse and validate.
    formats: bool = False


def format_schema(max_tokens: int, wrapped: bool) -> dict:
    """A JSON schema any model's answer fits in `max_tokens` (a token is at least one
    character): a list of one-letter directions, `{"way": [...]}` when `wrapped` (a
    tool's arguments)."""
    most = max(1, (max_tokens - (11 if wrapped else 2)) // 5)
    way = {"type": "array", "items": {"enum": ["n", "s", "e", "w"]}, "minItems": 1}
    way["maxItems"] = most
    if not wrapped:
        return way
    return {
        "type": "object",
        "properties": {"way": way},
        "required": ["way"],
        "additionalProperties": False,
    }


def format_kind(shape: LoadShape, prompt: int) -> str | None:
    if not shape.formats or prompt % 4 == 1 or prompt % 4 == 3:
        return None
    return "json" if prompt % 4 == 2 else "tool" if prompt % 8 == 4 else None


def format_fields(kind: str, max_tokens: int) -> dict:
    schema = format_schema(max_tokens, kind == "tool")
    if kind == "json":
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "way", "schema": schema},
            }
        }
    tool = {"type": "function", "function": {"name": "go", "parameters": schema}}
    return {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "go"}}}


def format_valid(kind: str, text: str, max_tokens: int) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), format_schema(max_tokens, kind == "tool"))
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def make_prompts(n: int, seed: int = 0, min_words: int = 4, max_words: int = 40) -> list[str]:
    """`n` distinct text prompts of varied length, the same for the same seed."""
    rng = random.Random(seed)
    words = (
        "river stone lamp cloud engine paper garden window silver orbit music harbor "
        "candle forest signal winter copper meadow thunder ladder mirror planet"
    ).split()
    return [
        f"Prompt {i}: "
        + " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n)
    ]


def over_long_prompt(max_model_len: int, seed: int = 0) -> str:
    """More than `max_model_len` tokens in any tokenizer (every space-separated letter is
    at least one), at about two characters a token: the router tokenizes it, then refuses it."""
    rng = random.Random(seed)
    return " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(max_model_len + 1))


def _message(body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return f"{err.get('code') or err.get('type')}: {err.get('message')}"
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


class Load:
    """Runs in its own thread (its own event loop) until `stop()`."""

    def __init__(self, url: str, shape: LoadShape):
        self.url = url.rstrip("/")
        self.shape = shape
        self.records: list[Record] = []
        self._next = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random(shape.seed)

    # ---- control (any thread) ---------------------------------------------------

    def start(self) -> Load:
        self.started_at = time.time()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Record]:
        """Send nothing new; wait for what is in flight (each bounded by hung_after_s)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.shape.hung_after_s + 30)
        self.stopped_at = time.time()
        return self.records

    @property
    def done(self) -> int:
        return sum(1 for r in self.records if r.end is not None)

    @property
    def failed(self) -> int:
        """Ended without completing, other than the refusals a rejected request expects."""
        return sum(
            1
            for r in self.records
            if r.end is not None and not r.completed and not (r.rejected and r.refused)
        )

    # ---- the event loop ---------------------------------------------------------

    async def _main(self) -> None:
        s = self.shape
        limits = httpx.Limits(
            max_connections=s.concurrency + 8, max_keepalive_connections=s.concurrency
        )
        timeout = httpx.Timeout(s.hung_after_s, connect=30)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            if s.rate is None:
                await asyncio.gather(*[self._client(client) for _ in range(s.concurrency)])
            else:
                await self._arrivals(client)

    def _more(self) -> bool:
        return not self._stopping.is_set() and not (
            self.shape.total and self._next >= self.shape.total
        )

    @property
    def finished(self) -> bool:
        """Every request it will send has been sent and has ended (`total` reached)."""
        return self._thread is not None and not self._thread.is_alive()

    async def _client(self, client: httpx.AsyncClient) -> None:
        while self._more():
            await self._one(client)

    async def _arrivals(self, client: httpx.AsyncClient) -> None:
        sem = asyncio.Semaphore(self.shape.concurrency)
        tasks = set()
        while self._more():
            await asyncio.sleep(self._rng.expovariate(self.shape.rate))
            await sem.acquire()  # at the in-flight cap, the arrival waits for a slot
            if not self._more():
                sem.release()
                break

            async def run():
                try:
                    await self._one(client)
                finally:
                    sem.release()

            t = asyncio.create_task(run())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient) -> None:
        s = self.shape
        i = self._next
        self._next += 1
        share = s.rejected_share
        rec = Record(
            index=i,
            prompt=i % len(s.prompts),
            start=time.time(),
            rejected=int((i + 1) * share) > int(i * share),
        )
        self.records.append(rec)
        kind = None if rec.rejected else format_kind(s, rec.prompt)
        endpoint = "/v1/chat/completions" if kind else s.endpoint
        chat = endpoint.endswith("/chat/completions")
        prompt = s.rejected_prompt if rec.rejected else s.prompts[rec.prompt]
        max_tokens = s.lengths[rec.prompt] if s.lengths else s.max_tokens
        body = {
            "model": s.model,
            "max_tokens": max_tokens,
            "stream": s.stream,
            **({"stream_options": {"include_usage": True}} if s.stream else {}),
            **s.body,
        }
        if s.seeded is not None and rec.prompt % 2:
            body.update(s.seeded, seed=rec.prompt)
        if kind is not None:  # ended by its format, not at max_tokens
            body.pop("ignore_eos", None)
            body.update(format_fields(kind, max_tokens))
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        try:
            async with asyncio.timeout(s.hung_after_s):
                run = self._stream if s.stream else self._whole
                await run(client, endpoint, body, rec, chat)
            if kind is not None and rec.completed:
                rec.valid = format_valid(kind, rec.text, max_tokens)
        except TimeoutError:
            rec.hung = True
            rec.error = f"hung: no end after {s.hung_after_s:.0f}s"
        except (httpx.HTTPError, httpx.StreamError) as e:
            rec.error = f"connection: {type(e).__name__}"
        except Exception as e:  # noqa: BLE001 - a malformed answer fails this request alone
            rec.error = f"bad response: {type(e).__name__}: {e}"[:300]
        finally:
            rec.end = time.time()

    async def _whole(
        self, client: httpx.AsyncClient, endpoint: str, body: dict, rec: Record, chat: bool
    ) -> None:
        r = await client.post(self.url + endpoint, json=body)
        rec.status = r.status_code
        if r.status_code != 200:
            rec.error = f"{r.status_code} {_message(r.content)}"
            return
        msg = r.json()
        choice = msg["choices"][0]
        if chat:  # a tool call's arguments count as its text
            calls = choice["message"].get("tool_calls") or []
            rec.text = choice["message"]["content"] or "".join(
                c["function"]["arguments"] for c in calls
            )
        else:
            rec.text = choice["text"]
        rec.finish_reason = choice.get("finish_reason")
        rec.tokens = msg["usage"]["completion_tokens"]
        rec.prompt_tokens = msg["usage"]["prompt_tokens"]
        rec.first = time.time()  # the whole text comes at once
        if rec.finish_reason is None:
            rec.error = "answer without a finish reason"

    async def _stream(
        self, client: httpx.AsyncClient, endpoint: str, body: dict, rec: Record, chat: bool
    ) -> None:
        async with client.stream("POST", self.url + endpoint, json=body) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error = f"{r.status_code} {_message(await r.aread())}"
                return
            buf, parts = "", []
            async for chunk in r.aiter_text():
                buf += chunk
                while "\n\n" in buf:
                    event, buf = buf.split("\n\n", 1)
                    if not event.startswith("data: "):
                        continue
                    data = event[6:]
                    if data == "[DONE]":
                        rec.text = "".join(parts)
                        if rec.finish_reason is None:
                            rec.error = "stream ended without a finish reason"
                        return
                    msg = json.loads(data)
                    if "error" in msg:
                        err = msg["error"]
                        rec.error = f"stream error {err.get('code')}: {err.get('message')}"
                        rec.text = "".join(parts)
                        return
                    if msg.get("usage"):
                        rec.tokens = msg["usage"].get("completion_tokens", rec.tokens)
                        rec.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
                    for ch in msg.get("choices") or []:
                        piece = _delta_text(ch) if chat else ch.get("text")
                        now = time.time()
                        if piece:
                            parts.append(piece)
                            rec.chunk_times.append(now)
                            if rec.first is None:
                                rec.first = now
                        if ch.get("finish_reason"):
                            rec.finish_reason = ch["finish_reason"]
            rec.text = "".join(parts)
            rec.error = "stream cut off"


def _delta_text(choice: dict) -> str:
    """A chat chunk's text: its content, and its tool calls' argument deltas."""
    delta = choice.get("delta") or {}
    calls = delta.get("tool_calls") or []
    return (delta.get("content") or "") + "".join(
        c.get("function", {}).get("arguments") or "" for c in calls
    )


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))
    return v[k]
