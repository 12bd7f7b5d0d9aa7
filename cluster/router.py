"""The Ray Serve router: OpenAI HTTP API in front of prefill and decode groups.

It owns every request from arrival to last byte. The lifecycle of one request
is a readable sequence of awaits inside one try/finally (`Router._lifecycle`):
admit -> prefill -> transfer + decode (stream) -> finish, and whatever exits
that block (success, error, deadline, client gone) releases everything the
request holds on the workers and in the router's table.
"""


import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from cluster import protocol as P
from cluster.config import Config
from cluster.detokenizer import IncrementalDetokenizer, StopChecker
from workers.sampling_params import SamplingParams

log = logging.getLogger("pdcluster.router")

app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None)


@dataclass
class RequestState:
    """The router's entry for one request; removed in the lifecycle's finally."""

    request_id: str
    prompt_len: int
    deadline: float
    stage: str = "admitted"
    prefill_idx: int | None = None
    decode_idx: int | None = None
    created: float = field(default_factory=time.time)


def _json(body: bytes, status: int = 200, headers: dict | None = None) -> Response:
    return Response(content=body, status_code=status, media_type="application/json",
                    headers=headers)


def _error(status: int, message: str, type_: str, code: str | None = None,
           headers: dict | None = None) -> Response:
    return _json(P.error_body(message, type_, None, code), status, headers)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1_000_000,
                  health_check_period_s=5)
@serve.ingress(app)
class Router:
    def __init__(self, cfg_json: bytes, model_dir: str, prefill: list, decode: list):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.cfg = msgspec.json.decode(cfg_json, type=Config)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.prefill = prefill
        self.decode = decode
        # Router-side load: prompt tokens sent and not yet answered / open streams.
        self.prefill_load = [0] * len(prefill)
        self.decode_load = [0] * len(decode)
        self.requests: dict[str, RequestState] = {}
        self.model_name = self.cfg.served_model_name

    # ---- HTTP endpoints -------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(asyncio.gather(
                *[w.stats.remote() for w in self.prefill + self.decode]), timeout=5)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            return _error(503, f"workers unhealthy: {e!r}", "service_unavailable")
        return _json(b'{"status":"ok"}')

    @app.get("/v1/models")
    async def models(self) -> Response:
        return _json(P.models_list(self.model_name))

    @app.get("/debug/state")
    async def debug_state(self) -> Response:
        if not self.cfg.router.debug_state:
            return _error(404, "debug state is disabled (router.debug_state)", "not_found")
        return _json(msgspec.json.encode(await self.state()))

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    # ---- state and accounting ------------------------------------------

    async def state(self) -> dict:
        """Counts that must return to zero when load ends."""
        stats = await asyncio.gather(*[w.stats.remote() for w in self.prefill + self.decode],
                                     return_exceptions=True)
        p = [s for s in stats[: len(self.prefill)] if isinstance(s, dict)]
        d = [s for s in stats[len(self.prefill):] if isinstance(s, dict)]
        return {
            "requests_in_flight": len(self.requests),
            "prefill_leases": sum(s["leases"] for s in p),
            "prefill_pinned_blocks": sum(s["pinned_blocks"] for s in p),
            "transfer_pending": sum(s["transfers_pending"] for s in d),
            "decode_blocks_used": sum(s["used_blocks"] for s in d),
            "workers": [s if isinstance(s, dict) else {"error": repr(s)} for s in stats],
        }

    # ---- admission -------------------------------------------------------

    async def _handle(self, request: Request, chat: bool) -> Response:
        body = await request.body()
        try:
            req = P.parse_chat(body) if chat else P.parse_completion(body)
            prompt_ids = self._tokenize(req, chat)
            params = P.to_sampling_params(
                req, prompt_len=len(prompt_ids), max_model_len=self.cfg.model.max_model_len,
                default_max_tokens=self.cfg.router.default_max_tokens,
                strict=self.cfg.router.strict_max_tokens)
        except P.AdmissionError as e:
            return _json(e.to_json(), e.status)
        if len(self.requests) >= self.cfg.router.max_queued:
            return _error(429, f"{len(self.requests)} requests in flight, the limit is "
                          f"{self.cfg.router.max_queued}; retry later", "rate_limit_error",
                          "queue_full", headers={"Retry-After": "1"})
        rid = uuid.uuid4().hex
        state = RequestState(rid, len(prompt_ids),
                             time.time() + self.cfg.router.request_timeout_s)
        # The entry exists from here on; the lifecycle's finally removes it.
        self.requests[rid] = state
        events = self._lifecycle(state, prompt_ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(rid, events, chat, len(prompt_ids),
                                                  include_usage),
                                     media_type="text/event-stream")
        text, reason, n_out = "", None, 0
        try:
            async for piece, reason, n_out in events:
                text += piece
        except Exception as e:  # noqa: BLE001 - typed failures become HTTP errors
            return self._failure(e)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                 "total_tokens": len(prompt_ids) + n_out}
        build = P.chat_completion if chat else P.text_completion
        return _json(build(f"{'chatcmpl' if chat else 'cmpl'}-{rid}", self.model_name, text,
                           reason, usage))

    def _tokenize(self, req, chat: bool) -> list[int]:
        if chat:
            messages = [{"role": m.role, "content": P.message_text(m)} for m in req.messages]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
            return list(ids)
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            vocab = len(self.tokenizer)
            bad = [t for t in req.prompt if not 0 <= t < vocab]
            if bad:
                raise P.AdmissionError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}",
                                       param="prompt", code="invalid_token_id")
            return list(req.prompt)
        text = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
        return self.tokenizer.encode(text)

    def _failure(self, e: BaseException) -> Response:
        if isinstance(e, P.AdmissionError):
            return _json(e.to_json(), e.status)
        if isinstance(e, TimeoutError):
            return _error(504, f"request timed out: {e}", "timeout", "request_timeout")
        log.warning("request failed: %r", e)
        return _error(503, f"request failed: {e}", "service_unavailable", "worker_unavailable")

    async def _stream(self, rid: str, events: AsyncIterator, chat: bool, prompt_len: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        chunk = P.chat_chunk if chat else P.completion_chunk
        n_out = 0
        try:
            if chat:
                yield P.sse(chunk(cid, self.model_name, created, None, None, role="assistant"))
            async for piece, reason, n_out in events:
                if piece or reason:
                    yield P.sse(chunk(cid, self.model_name, created, piece, reason))
            if include_usage:
                yield P.sse(P.usage_chunk(cid, self.model_name, created, chat, {
                    "prompt_tokens": prompt_len, "completion_tokens": n_out,
                    "total_tokens": prompt_len + n_out}))
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            log.warning("stream %s failed: %r", rid, e)
            yield P.sse(msgspec.json.decode(self._failure(e).body))
        finally:
            await events.aclose()
        yield P.SSE_DONE

    # ---- the request lifecycle ------------------------------------------

    def _remaining(self, state: RequestState) -> float:
        left = state.deadline - time.time()
        if left <= 0:
            raise TimeoutError(f"request {state.request_id} passed its deadline "
                               f"({self.cfg.router.request_timeout_s}s) during {state.stage}")
        return left

    async def _lifecycle(self, state: RequestState, prompt_ids: list[int],
                         params: SamplingParams) -> AsyncIterator[tuple[str, str | None, int]]:
        """Yield (text delta, finish_reason, completion tokens so far)."""
        rid = state.request_id
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        stops = StopChecker(params.stop, params.include_stop_str_in_output)
        n_out, finished = 0, False
        try:
            state.stage = "prefill"
            res = await self._prefill(state, prompt_ids, params)
            token_stream = self._decode_stream(state, prompt_ids, params, res)
            async for tokens, reason in token_stream:
                n_out += len(tokens)
                # `finished`: the worker itself ended the sequence and freed it;
                # a stop string ends it here, so the worker must still be told.
                finished = reason is not None
                text = detok.push(tokens)
                if reason is not None:
                    text += detok.flush()
                text, stopped = stops.push(text, final=reason is not None)
                if stopped:
                    reason = "stop"
                yield text, reason, n_out
                if reason is not None:
                    break
        finally:
            self.requests.pop(rid, None)
            self._release(state, finished)

    async def _prefill(self, state: RequestState, prompt_ids: list[int],
                       params: SamplingParams):
        i = min(range(len(self.prefill)), key=lambda k: self.prefill_load[k])
        state.prefill_idx = i
        self.prefill_load[i] += len(prompt_ids)
        try:
            return await asyncio.wait_for(
                self.prefill[i].prefill.remote(state.request_id, prompt_ids, params),
                self._remaining(state))
        finally:
            self.prefill_load[i] -= len(prompt_ids)

    async def _decode_stream(self, state: RequestState, prompt_ids: list[int],
                             params: SamplingParams, res) -> AsyncIterator[tuple[list[int], str | None]]:
        yield [res.first_token], res.finish_reason
        if res.finish_reason is not None:
            return
        state.stage = "decode"
        i = max(range(len(self.decode)), key=lambda k: -self.decode_load[k])
        state.decode_idx = i
        self.decode_load[i] += 1
        try:
            gen = self.decode[i].generate.options(num_returns="streaming").remote(
                state.request_id, prompt_ids, res.first_token, params, res.handle,
                state.deadline)
            while True:
                try:
                    ref = await asyncio.wait_for(gen.__anext__(), self._remaining(state))
                except StopAsyncIteration:
                    return
                tokens, reason = await ref
                yield tokens, reason
                if reason is not None:
                    return
        finally:
            self.decode_load[i] -= 1

    def _release(self, state: RequestState, finished: bool) -> None:
        """Backstop release on the workers; both calls are idempotent."""
        rid = state.request_id
        if state.prefill_idx is not None:
            self.prefill[state.prefill_idx].release.remote(rid)
        if state.decode_idx is not None and not finished:
            self.decode[state.decode_idx].abort.remote(rid)


def build_app(cfg: Config, model_dir: str, prefill: list, decode: list):
    """The Serve application for `serve.run`."""
    return Router.bind(msgspec.json.encode(cfg), model_dir, prefill, decode)


__all__ = ["Router", "build_app"]
