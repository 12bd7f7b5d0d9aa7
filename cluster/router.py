"""The Ray Serve router: the OpenAI HTTP API in front of prefill and decode groups.

The Serve deployment and its routes. A completion request goes through admission
(cluster/admission.py: body, parse, template, tokenize, limits), then its lifecycle
(cluster/lifecycle.py: prefill -> transfer + decode -> release, retries and
migration), and its tokens go back as one JSON object or a stream of chunks
(cluster/responses.py). Each replica watches the workers (cluster/pool.py), keeps
one output channel per decode replica (cluster/channels.py), and shares its counts
with the other router replicas (cluster/peers.py).
"""

import asyncio
import faulthandler
import logging
import os
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError

from cluster import responses
from cluster.admission import Admission, check_model
from cluster.answer import Answer, merged
from cluster.auth import ApiKeys
from cluster.channels import DecodeChannels
from cluster.config import HEAD_RESOURCE, Config
from cluster.edge import SLOW_CLIENT
from cluster.lifecycle import Fork, Lifecycle, RequestState, Unavailable
from cluster.logprobs import LogprobFormat
from cluster.metrics import RouterMetrics
from cluster.pool import WorkerPool
from cluster.protocol import AdmissionError
from cluster.reports import PEER_TIMEOUT_S, Reports
from wire.api import XFER_BUCKETS, SequenceFailed

log = logging.getLogger("pdcluster.router")


def _serve_grpc_on_loopback() -> None:
    """Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on
    "[::]:0", every interface, whatever the node's address; this replica's goes on
    the loopback interface instead (a local cluster listens on 127.0.0.1 only). It
    is started after the constructor, through the name patched here."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server

    def on_loopback(server, address: str):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    replica.add_port_to_grpc_server = on_loopback


def _resolve_model_here(cfg: Config) -> str:
    """The model's directory on this node, fetched and converted into its cache if
    needed, by a child process: converting imports torch, which this process never
    loads."""
    cmd = [sys.executable, "-m", "pdcluster.cli", "fetch-model", cfg.model.source, "--print-path"]
    if cfg.model.cache_dir:
        cmd += ["--cache-dir", cfg.model.cache_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"could not resolve {cfg.model.source}: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


# Note: Serve's ingress pickles the Router class when it is decorated, so every
# module-level name its methods use must be defined above the class.
app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None, openapi_url=None)


ROUTER_HEADER = "pdcluster-router"  # on every completion response: the replica that served it
IGNORED_HEADER = "pdcluster-ignored-fields"  # the request's unknown fields, ignored


class EventStream(StreamingResponse):
    """An SSE response that also ends when Serve's proxy reports its client as a slow
    reader (cluster/edge.py), marking the request so that it is counted as one."""

    def __init__(self, content, states: list[RequestState], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.states = states

    async def listen_for_disconnect(self, receive) -> None:
        while True:
            try:
                message = await receive()
            except Exception:  # noqa: BLE001 - the proxy is gone (a stop): as a disconnect
                return
            if message["type"] == SLOW_CLIENT:
                for state in self.states:
                    state.slow_client = True
                return
            if message["type"] == "http.disconnect":
                return


def _json(body: bytes, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        content=body, status_code=status, media_type="application/json", headers=headers
    )


def _error(
    status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None
) -> Response:
    return _json(responses.error_body(message, type_, None, code), status, headers)


@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1_000_000, health_check_period_s=5
)
@serve.ingress(app)
class Router:
    def __init__(self, cfg_json: bytes, model_dir: str, prefill: list, decode: list, peers):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # A fatal signal dumps every thread's stack to the replica's log, not only the
        # crashing one (Ray enables the crashing thread's only): admission decodes in a
        # thread pool, and a crash there is read against what the others were doing.
        try:
            faulthandler.enable(all_threads=True)
        except (OSError, AttributeError):  # stderr without a file descriptor
            pass
        # The fast tokenizer class by name: AutoTokenizer imports torch, and the
        # router process loads neither torch nor nixl.
        from transformers import PreTrainedTokenizerFast

        self.cfg = msgspec.json.decode(cfg_json, type=Config)
        if not model_dir:  # not a local cluster: this node's copy of the model
            model_dir = _resolve_model_here(self.cfg)
        if self.cfg.cluster.address == "local":
            _serve_grpc_on_loopback()
        self.admission = Admission(
            self.cfg, PreTrainedTokenizerFast.from_pretrained(model_dir), model_dir
        )
        self.logprob_format = LogprobFormat(self.admission.tokenizer)
        self.keys = ApiKeys(self.cfg.router)
        self._admission_threads = ThreadPoolExecutor(
            self.cfg.router.admission_threads, thread_name_prefix="admission"
        )
        self._admitting = 0  # requests being read and admitted (they count as queued)
        self.metrics = RouterMetrics(self.cfg.served_model_name)
        # This replica (of router.replicas), and what the others last reported.
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.peers = peers
        r = self.cfg.router
        self.prefill_pool = WorkerPool(
            "prefill", prefill, r.watchdog_s, self.metrics, r.health_period_s, self._restart
        )
        self.decode_pool = WorkerPool(
            "decode", decode, r.watchdog_s, self.metrics, r.health_period_s, self._restart
        )
        for pool in (self.prefill_pool, self.decode_pool):
            pool.find_by_name()  # the given handles may be of actors replaced since
        self.metrics.watch_workers(self.prefill_pool.stats, self.decode_pool.stats, XFER_BUCKETS)
        self.channels = DecodeChannels(self.decode_pool, r.channel_max_messages, r.health_period_s)
        self.lifecycle = Lifecycle(
            r,
            self.admission.tokenizer,
            self.prefill_pool,
            self.decode_pool,
            self.channels.get,
            self.metrics,
        )
        self.model_name = self.cfg.served_model_name
        loop = asyncio.get_event_loop()
        self._health_task = loop.create_task(self._poll_health())
        self._channels_task = loop.create_task(self.channels.keep())
        self.reports = Reports(self)
        self._report_task = loop.create_task(self.reports.keep())

    async def _restart(self, worker: str, handle, incarnation: str | None) -> bool:
        """Have a stalled worker killed once across the router replicas."""
        return await asyncio.wait_for(
            self.peers.restart.remote(worker, handle, incarnation), PEER_TIMEOUT_S
        )

    async def _poll_health(self) -> None:
        """Watchdog loop: stats from every worker, bounded by a timeout each."""
        while True:
            try:
                await asyncio.gather(self.prefill_pool.poll(), self.decode_pool.poll())
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one bad poll
                log.exception("health poll failed")
            await asyncio.sleep(self.cfg.router.health_period_s)

    # ---- HTTP endpoints -------------------------------------------------

    def _refused(self, request: Request) -> Response | None:
        """401 for a route that needs an API key and a request without a valid one."""
        if not self.keys.required(request.url.path):
            return None
        if self.keys.allows(request.headers.get("authorization")):
            return None
        return _error(
            401,
            "Invalid or missing API key: send 'Authorization: Bearer <key>'",
            "invalid_request_error",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/health")
    async def health(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = {
            "prefill_healthy": self.prefill_pool.healthy_count(),
            "decode_healthy": self.decode_pool.healthy_count(),
            # Replicas silent for long enough to be taken as gone (their node died).
            "lost": self.prefill_pool.lost() + self.decode_pool.lost(),
        }
        # Without prefill the cluster still serves (decode-only fallback), degraded.
        status = (
            "unhealthy"
            if body["decode_healthy"] == 0
            else "ok"
            if body["prefill_healthy"] > 0
            else "degraded"
        )
        return _json(
            msgspec.json.encode({"status": status, **body}), 503 if status == "unhealthy" else 200
        )

    @app.get("/metrics")
    async def metrics_endpoint(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        self.reports.count_stages()
        # The others' series carry the time of their report: a scrape that reaches a
        # replica with an older report cannot move a counter back in Prometheus.
        routers = {rid: (st["reported_at"], m) for rid, (st, m) in self.reports.peers().items()}
        routers[self.replica_id] = (None, self.metrics.own_families())
        return Response(self.metrics.render(routers), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        return _json(responses.models_list(self.model_name))

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            check_model(model_id, self.model_name)
        except AdmissionError as e:
            return _json(e.to_json(), e.status)
        return _json(responses.model_card(self.model_name))

    @app.get("/version")
    async def version(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        return _json(msgspec.json.encode({"version": responses.VERSION}))

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._off_loop(request, self.admission.tokenize_body)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await self._off_loop(request, self.admission.detokenize_body)

    async def _off_loop(self, request: Request, work) -> Response:
        """A small request answered by `work(body)` on an admission thread."""
        if (refused := self._refused(request) or self._queue_full()) is not None:
            return refused
        try:
            out = await self._admitted(request, work)
        except AdmissionError as e:
            return _json(e.to_json(), e.status)
        except Exception as e:  # noqa: BLE001 - in OpenAI's shape, logged
            return self._failure(e, uuid.uuid4().hex)
        return _json(out)

    @app.get("/debug/state")
    async def debug_state(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        if not self.cfg.router.debug_state:
            return _error(404, "debug state is disabled (router.debug_state)", "not_found")
        return _json(msgspec.json.encode(await self.reports.state()))

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    # ---- a completion request -------------------------------------------

    def _queue_full(self, more: int = 1) -> Response | None:
        """429 when `more` requests would pass router.max_queued (those in flight and
        those being admitted): checked first, so a full router spends nothing."""
        r = self.cfg.router
        queued = len(self.lifecycle.requests) + self._admitting
        if queued + more <= r.max_queued:
            return None
        return _error(
            429,
            f"{queued} requests in flight, the limit is {r.max_queued}; retry later",
            "rate_limit_error",
            "queue_full",
            headers={"Retry-After": "1", ROUTER_HEADER: self.replica_id},
        )

    async def _admitted(self, request: Request, work):
        """`work(body)` on an admission thread, never on this event loop (other streams,
        /health and the watchdog), the body read within its bounds, holding a queue
        slot meanwhile. Raises AdmissionError."""
        r = self.cfg.router
        self._admitting += 1
        try:
            try:
                body = await asyncio.wait_for(self.admission.read_body(request), r.body_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                raise AdmissionError(
                    f"request body not received within {r.body_timeout_s}s (router.body_timeout_s)",
                    code="request_timeout",
                    status=408,
                ) from None
            return await asyncio.get_running_loop().run_in_executor(
                self._admission_threads, work, body
            )
        finally:
            self._admitting -= 1

    async def _handle(self, request: Request, chat: bool) -> Response:
        if (refused := self._refused(request) or self._queue_full()) is not None:
            return refused
        r = self.cfg.router
        rid = uuid.uuid4().hex
        try:
            admitted = await self._admitted(request, lambda body: self.admission.admit(body, chat))
        except AdmissionError as e:
            return _json(e.to_json(), e.status)
        except Exception as e:  # noqa: BLE001 - never a bare 500: logged, in OpenAI's shape
            return self._failure(e, rid)
        # The slots are taken now, before any await, so a burst cannot overrun
        # max_queued. Each lifecycle's finally gives its slot back; a generator that is
        # dropped unstarted (client gone before the body) gives it back when collected.
        req, choices = admitted.request, admitted.choices
        if len(choices) > r.max_queued:
            e = AdmissionError(
                f"Invalid 'prompt': {len(choices)} prompts, more than the {r.max_queued} "
                "requests a router replica queues (router.max_queued)",
                "prompt",
                "invalid_value",
            )
            return _json(e.to_json(), e.status)
        if len(choices) > 1 and (full := self._queue_full(len(choices))) is not None:
            return full
        states, runs = [], []
        per_prompt = len(choices) // len({c.prompt_index for c in choices})
        fork = None
        for i, choice in enumerate(choices):
            state = self.lifecycle.admit(
                rid if len(choices) == 1 else f"{rid}-c{i}", len(choice.prompt_ids)
            )
            if per_prompt > 1 and i % per_prompt == 0:  # n > 1: one prefill, one pull
                fork = Fork()
            events = self.lifecycle.run(
                state, choice.prompt_ids, choice.params, fork, i % per_prompt
            )
            weakref.finalize(events, self.lifecycle.requests.pop, state.request_id, None)
            states.append(state)
            runs.append(events)
        headers = {"pdcluster-request-id": rid, ROUTER_HEADER: self.replica_id}
        if admitted.ignored:
            headers[IGNORED_HEADER] = responses.ignored_fields_header(admitted.ignored)
            log.debug("request %s: unknown fields ignored: %s", rid, headers[IGNORED_HEADER])
        answer = Answer(rid, chat, states, admitted, self.logprob_format)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(
                self._stream(answer, runs, include_usage),
                states,
                media_type="text/event-stream",
                headers=headers,
            )
        try:
            async for i, piece, reason, n_out, lps in merged(runs):
                piece, n_out, lps = answer.visible(piece, n_out, lps)
                answer.add(i, piece, reason, n_out, lps)
        except Exception as e:  # noqa: BLE001 - typed failures become HTTP errors
            return self._failure(e, rid)
        body = responses.completion(
            chat, answer.id, self.model_name, answer.choices(), answer.usage()
        )
        return _json(body, headers=headers)

    def _failure(self, e: BaseException, rid: str) -> Response:
        """The client's error for a failed request: a short message naming the request
        id, a stable `code`, never internals (tracebacks, actor ids, addresses); the
        router log has the details under the same id."""
        if isinstance(e, AdmissionError):
            return _json(e.to_json(), e.status)
        if isinstance(e, TimeoutError):
            status, msg, code = (
                504,
                f"request passed its deadline of {self.cfg.router.request_timeout_s}s "
                "(router.request_timeout_s)",
                "request_timeout",
            )
        elif isinstance(e, Unavailable):
            status, msg, code = 503, str(e), "worker_unavailable"
        elif isinstance(e, SequenceFailed):  # this request alone; not retried elsewhere
            status, msg, code = e.status, str(e), "sampling_failed"
        elif isinstance(e, TaskCancelledError):  # the client left: its worker calls were cancelled
            log.info("request %s cancelled", rid)
            status, msg, code = 499, "request cancelled", "cancelled"
        else:
            log.error("request %s failed", rid, exc_info=e)
            status, msg, code = 500, "internal error; see the router log", "internal_error"
        headers = {"pdcluster-request-id": rid, ROUTER_HEADER: self.replica_id}
        if status == 503:
            headers["Retry-After"] = "1"
        return _error(
            status, f"{msg} (request {rid})", responses.error_type_for(status), code, headers
        )

    async def _stream(
        self, answer: Answer, runs: list[AsyncIterator], include_usage: bool
    ) -> AsyncIterator[bytes]:
        created, model, chat = int(time.time()), self.model_name, answer.chat
        events = merged(runs)
        try:
            async for i, piece, reason, n_out, lps in events:
                piece, n_out, lps = answer.visible(piece, n_out, lps)
                first = answer.first(i)
                if first:  # its first chunk goes out with its first token (vLLM)
                    piece = answer.echo[i] + piece
                    if chat:
                        role = responses.chunk(
                            chat, answer.id, model, created, None, None, role="assistant"
                        )
                        yield responses.sse(role)
                answer.add(i, "", reason, n_out)
                piece, calls, reason = answer.stream_tools(i, piece, reason)
                logprobs = answer.logprobs(i, lps, first) if lps or first else None
                if piece or reason or logprobs or calls:
                    chunk = responses.chunk(
                        chat,
                        answer.id,
                        model,
                        created,
                        piece,
                        reason,
                        index=i,
                        logprobs=logprobs,
                        tool_calls=calls,
                    )
                    yield responses.sse(chunk)
            if include_usage:
                usage = responses.usage_chunk(chat, answer.id, model, created, answer.usage())
                yield responses.sse(usage)
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            log.warning("stream %s failed: %r", answer.rid, e)
            yield responses.sse(msgspec.json.decode(self._failure(e, answer.rid).body))
        finally:
            await events.aclose()  # the client left: every choice's lifecycle ends now
        yield responses.SSE_DONE


def build_app(cfg: Config, model_dir: str, prefill: list, decode: list, peers, pin_to_head: bool):
    """The Serve application for `serve.run`: `router.replicas` replicas of the router."""
    options = {"num_replicas": cfg.router.replicas}
    if pin_to_head:
        options["ray_actor_options"] = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    return Router.options(**options).bind(
        msgspec.json.encode(cfg), model_dir, prefill, decode, peers
    )


__all__ = ["Router", "build_app"]
