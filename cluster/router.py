"""The Ray Serve router: OpenAI HTTP API in front of prefill and decode groups.

It owns every request from arrival to last byte. The lifecycle of one request
is a readable sequence of awaits inside one try/finally (`Router._lifecycle`):
admit -> prefill -> transfer + decode (stream) -> finish, and whatever exits
that block (success, error, deadline, client gone) releases everything the
request holds on the workers and in the router's table.
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
from dataclasses import dataclass, field

import jinja2
import msgspec
import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, TaskCancelledError

from cluster import protocol as P
from cluster.config import HEAD_RESOURCE, Config
from cluster.detokenizer import IncrementalDetokenizer, StopChecker
from cluster.edge import SLOW_CLIENT
from cluster.health import WorkerPool, WorkerStalled
from cluster.metrics import RouterMetrics
from cluster.peers import report_ttl
from transfer.handle import TransferError
from workers.api import XFER_BUCKETS, SequenceFailed, WorkerError, process_usage
from workers.channel import OutputChannel
from workers.sampling_params import SamplingParams

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
    cmd = [sys.executable, "-m", "cluster.cli", "fetch-model", cfg.model.source, "--print-path"]
    if cfg.model.cache_dir:
        cmd += ["--cache-dir", cfg.model.cache_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"could not resolve {cfg.model.source}: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


# Note: Serve's ingress pickles the Router class when it is decorated, so every
# module-level name its methods use must be defined above the class.
app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None)


CHANNEL_RETRY_S = 0.1  # how often a request looks for, and the router reopens, a dead channel
RETIRED_GRACE_S = 1.0  # a replaced channel stays open this long at least, for requests given it
ROUTER_HEADER = "pdcluster-router"  # on every completion response: the replica that served it
PEER_TIMEOUT_S = 2.0  # a call to the router replicas' shared actor (cluster/peers.py)


class Unavailable(Exception):
    """No worker could serve the request (after retries/migrations): HTTP 503."""


class NoPrefillWorker(Exception):
    """No prefill replica is healthy: the decode worker prefills locally."""


# A worker that died, is restarting, was found stalled, or refused the work.
_WORKER_LOST = (RayActorError, ActorUnavailableError, WorkerError, WorkerStalled)


@dataclass
class RequestState:
    """The router's entry for one request; exists while its lifecycle runs."""

    request_id: str
    prompt_len: int
    deadline: float  # this router's time.monotonic()
    stage: str = "admitted"
    # (replica, attempt id) pairs that may hold a lease / a decode sequence. Each
    # prefill attempt has its own id, so a late release can never hit a newer attempt.
    prefills: set[tuple[int, str]] = field(default_factory=set)
    decodes: set[tuple[int, str]] = field(default_factory=set)
    attempts: int = 0
    worker_done: bool = False  # the decode worker finished (and freed) the last attempt
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None
    slow_client: bool = False  # the edge cut its client off for leaving output unread


class EventStream(StreamingResponse):
    """An SSE response that also ends when Serve's proxy reports its client as a slow
    reader (cluster/edge.py), marking the request so that it is counted as one."""

    def __init__(self, content, state: RequestState, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.state = state

    async def listen_for_disconnect(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == SLOW_CLIENT:
                self.state.slow_client = True
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
    return _json(P.error_body(message, type_, None, code), status, headers)


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
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        self.vocab_size = P.model_vocab_size(model_dir, len(self.tokenizer))
        # Longest text one token can stand for (byte-level BPE: its string's length).
        self._max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        self._admission = ThreadPoolExecutor(
            self.cfg.router.admission_threads, thread_name_prefix="admission"
        )
        self._admitting = 0  # requests being read and admitted (they count as queued)
        self.metrics = RouterMetrics()
        # This replica (of router.replicas), and what the others last reported.
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.peers = peers
        self._peer_reports: dict[str, tuple[dict, list]] = {}
        self._peer_ttl_s = report_ttl(self.cfg.router.health_period_s)
        self._peers_failing = False
        r = self.cfg.router
        self.prefill_pool = WorkerPool(
            "prefill", prefill, r.watchdog_s, self.metrics, r.health_period_s, self._restart
        )
        self.decode_pool = WorkerPool(
            "decode", decode, r.watchdog_s, self.metrics, r.health_period_s, self._restart
        )
        self.metrics.watch_workers(
            lambda: self.prefill_pool.stats, lambda: self.decode_pool.stats, XFER_BUCKETS
        )
        self.requests: dict[str, RequestState] = {}
        # One output stream per decode replica carries all this router's requests there.
        self._channels: dict[int, OutputChannel] = {}
        # Replaced channels (when, channel) that requests still stream on (_keep_channels).
        self._retired: list[tuple[float, OutputChannel]] = []
        self._channels_opened = 0
        self.model_name = self.cfg.served_model_name
        loop = asyncio.get_event_loop()
        self._health_task = loop.create_task(self._poll_health())
        self._channels_wanted = asyncio.Event()
        self._channels_task = loop.create_task(self._keep_channels())
        self._report_task = loop.create_task(self._keep_reporting())

    async def _keep_channels(self) -> None:
        """Open every decode replica's output channel, and reopen one that failed (its
        actor died or restarted). Only this task of the router's own opens channels: a
        channel carries every request on its replica, so it must not be the child of a
        request's task, whose cancellation (client gone) Ray may pass on to it.

        A channel that has carried router.channel_max_messages is replaced: Ray keeps
        state for every item of a streaming call on both ends until the call ends (Ray
        2.60: about 120 bytes an item here, 40 in the worker), so one channel for the
        replica's lifetime grows both processes with every step. Requests on the old
        channel finish there; it is closed once none is left."""
        opened: dict[int, float] = {}
        while True:
            now = time.monotonic()
            for i, h in enumerate(self.decode_pool.handles):
                chan = self._channels.get(i)
                if chan is not None and chan.messages >= self.cfg.router.channel_max_messages:
                    self._retired.append((now, self._channels.pop(i)))
                    chan = None
                    opened.pop(i, None)  # its successor opens now
                # A dead actor's channel fails at once: reopened every CHANNEL_RETRY_S at most.
                if (chan is None or not chan.alive) and (
                    time.monotonic() - opened.get(i, -CHANNEL_RETRY_S) >= CHANNEL_RETRY_S
                ):
                    opened[i] = time.monotonic()
                    try:
                        self._channels[i] = OutputChannel(h, f"router-decode{i}")
                        self._channels_opened += 1
                    except Exception:  # noqa: BLE001 - tried again next pass
                        log.exception("opening the output channel to decode-%d", i)
            for retired in [r for r in self._retired if not len(r[1]) or not r[1].alive]:
                # The grace covers a request given the channel just before it was replaced
                # that has not opened its queue on it yet.
                if now - retired[0] >= RETIRED_GRACE_S:
                    self._retired.remove(retired)
                    if retired[1].alive:  # a failed one has ended already
                        retired[1].shutdown()
            self._channels_wanted.clear()
            try:
                await asyncio.wait_for(
                    self._channels_wanted.wait(), self.cfg.router.health_period_s
                )
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def _channel(self, i: int) -> OutputChannel:
        """Decode replica i's live output channel, once the router's task has one open."""
        while True:
            chan = self._channels.get(i)
            if chan is not None and chan.alive:
                return chan
            self._channels_wanted.set()
            await asyncio.sleep(CHANNEL_RETRY_S)

    async def _restart(self, worker: str, handle, incarnation: str | None) -> bool:
        """Have a stalled worker killed once across the router replicas."""
        return await asyncio.wait_for(
            self.peers.restart.remote(worker, handle, incarnation), PEER_TIMEOUT_S
        )

    def _own_counts(self) -> dict:
        return {
            "router_id": self.replica_id,
            "router_pid": os.getpid(),
            "router_node_id": ray.get_runtime_context().get_node_id(),
            "router_requests_in_flight": len(self.requests),
            "router_admitting": self._admitting,
            "router_channels": len(self._channels),
            "router_channels_opened": self._channels_opened,
            "router_channel_queues": sum(
                len(c) for c in [*self._channels.values(), *(c for _, c in self._retired)]
            ),
            **{f"router_{k}": v for k, v in process_usage().items()},
            "reported_at": time.time(),
        }

    def _peers(self) -> dict[str, tuple[dict, list]]:
        """The other replicas' last reports, while recent (this replica may have failed
        to refresh them)."""
        now = time.time()
        return {
            rid: rep
            for rid, rep in self._peer_reports.items()
            if now - rep[0]["reported_at"] <= self._peer_ttl_s
        }

    def _count_stages(self) -> None:
        """pdcluster_requests_in_flight{stage} from this replica's request table."""
        for stage in ("admitted", "prefill", "decode"):
            self.metrics.in_flight.labels(stage).set(
                sum(1 for r in self.requests.values() if r.stage == stage)
            )

    async def _keep_reporting(self) -> None:
        """Every health period: this replica's counts and request metrics to the other
        router replicas (through cluster/peers.py), and theirs back."""
        while True:
            self._count_stages()
            try:
                self._peer_reports = await asyncio.wait_for(
                    self.peers.report.remote(
                        self.replica_id, self._own_counts(), self.metrics.own_families()
                    ),
                    PEER_TIMEOUT_S,
                )
                self._peers_failing = False
            except Exception:  # noqa: BLE001 - reported again next period
                if not self._peers_failing:  # once per outage, not every period
                    log.exception("router peers unreachable")
                self._peers_failing = True
            await asyncio.sleep(self.cfg.router.health_period_s)

    async def _poll_health(self) -> None:
        """Watchdog loop: stats from every worker, bounded by a timeout each."""
        while True:
            try:
                await asyncio.gather(self.prefill_pool.poll(), self.decode_pool.poll())
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one bad poll
                log.exception("health poll failed")
            await asyncio.sleep(self.cfg.router.health_period_s)

    # ---- HTTP endpoints -------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        body = {
            "prefill_healthy": sum(self.prefill_pool.healthy),
            "decode_healthy": sum(self.decode_pool.healthy),
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
    async def metrics_endpoint(self) -> Response:
        self._count_stages()
        # The others' series carry the time of their report: a scrape that reaches a
        # replica with an older report cannot move a counter back in Prometheus.
        routers = {rid: (st["reported_at"], m) for rid, (st, m) in self._peers().items()}
        routers[self.replica_id] = (None, self.metrics.own_families())
        return Response(self.metrics.render(routers), media_type="text/plain; version=0.0.4")

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
        """Counts that must return to zero when load ends, read fresh from the workers."""
        pools = (self.prefill_pool, self.decode_pool)
        stats = await asyncio.gather(*[p.fresh_stats() for p in pools])
        p, d = ([s for s in ss if s] for ss in stats)
        own = self._own_counts()
        routers = [own, *(s for s, _ in self._peers().values())]
        return {
            # The replica that answered (router_*), and every live replica (routers).
            **own,
            "routers": sorted(routers, key=lambda r: r["router_id"]),
            "requests_in_flight": sum(r["router_requests_in_flight"] for r in routers),
            "prefill_pending": sum(s.pending for s in p),
            "prefill_leases": sum(s.engine.leases for s in p),
            "prefill_pinned_blocks": sum(s.pinned_blocks for s in p),
            # Held by requests and leases (a block shared by two leases counts once).
            "prefill_blocks_used": sum(s.engine.used_blocks for s in p),
            # Prefix cache: blocks no request holds (free for new work; not a leak).
            "prefill_cached_blocks": sum(s.engine.cached_blocks for s in p),
            "transfer_pending": sum(s.transfers_pending for s in d),
            "decode_waiting_for_blocks": sum(s.engine.waiting_for_blocks for s in d),
            "decode_streams": sum(s.streams for s in d),
            "decode_blocks_used": sum(s.engine.used_blocks for s in d),
            "decode_cached_blocks": sum(s.engine.cached_blocks for s in d),
            "workers": [
                pool.describe(i, st) for pool, ss in zip(pools, stats) for i, st in enumerate(ss)
            ],
        }

    # ---- admission -------------------------------------------------------

    async def _handle(self, request: Request, chat: bool) -> Response:
        # The queue check comes first: a full router spends nothing on the request.
        r = self.cfg.router
        if len(self.requests) + self._admitting >= r.max_queued:
            return _error(
                429,
                f"{len(self.requests) + self._admitting} requests in flight, the limit is "
                f"{r.max_queued}; retry later",
                "rate_limit_error",
                "queue_full",
                headers={"Retry-After": "1", ROUTER_HEADER: self.replica_id},
            )
        self._admitting += 1  # holds a slot while it is read and admitted
        rid = uuid.uuid4().hex
        try:
            try:
                body = await asyncio.wait_for(self._read_body(request), r.body_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                raise P.AdmissionError(
                    f"request body not received within {r.body_timeout_s}s (router.body_timeout_s)",
                    code="request_timeout",
                    status=408,
                ) from None
            # Parsing, chat templating and tokenizing run on a small pool of threads,
            # never on this event loop (other streams, /health and the watchdog).
            req, prompt_ids, params = await asyncio.get_running_loop().run_in_executor(
                self._admission, self._admit, body, chat
            )
        except P.AdmissionError as e:
            return _json(e.to_json(), e.status)
        except Exception as e:  # noqa: BLE001 - never a bare 500: logged, in OpenAI's shape
            return self._failure(e, rid)
        finally:
            self._admitting -= 1
        state = RequestState(
            rid, len(prompt_ids), time.monotonic() + self.cfg.router.request_timeout_s
        )
        # The slot is taken now, before any await, so a burst cannot overrun
        # max_queued. The lifecycle's finally gives it back; a generator that is
        # dropped unstarted (client gone before the body) gives it back when collected.
        self.requests[rid] = state
        events = self._lifecycle(state, prompt_ids, params)
        weakref.finalize(events, self.requests.pop, rid, None)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(
                self._stream(rid, events, chat, len(prompt_ids), include_usage),
                state,
                media_type="text/event-stream",
                headers={"pdcluster-request-id": rid, ROUTER_HEADER: self.replica_id},
            )
        text, reason, n_out = "", None, 0
        try:
            async for piece, reason, n_out in events:
                text += piece
        except Exception as e:  # noqa: BLE001 - typed failures become HTTP errors
            return self._failure(e, rid)
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": n_out,
            "total_tokens": len(prompt_ids) + n_out,
        }
        build = P.chat_completion if chat else P.text_completion
        return _json(
            build(f"{'chatcmpl' if chat else 'cmpl'}-{rid}", self.model_name, text, reason, usage),
            headers={"pdcluster-request-id": rid, ROUTER_HEADER: self.replica_id},
        )

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it passes router.max_body_bytes:
        by its Content-Length before reading, or while it is read."""
        limit = self.cfg.router.max_body_bytes
        too_big = P.AdmissionError(
            f"request body is larger than {limit} bytes (router.max_body_bytes)",
            code="request_too_large",
            status=413,
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _admit(self, body: bytes, chat: bool):  # admission thread
        """Parse, check and tokenize one request: (request, prompt ids, sampling params)."""
        r = self.cfg.router
        req = P.parse_chat(body, r.max_messages) if chat else P.parse_completion(body)
        prompt_ids = self._tokenize(req, chat)
        params = P.to_sampling_params(
            req,
            prompt_len=len(prompt_ids),
            max_model_len=self.cfg.model.max_model_len,
            default_max_tokens=self.cfg.router.default_max_tokens,
            strict=self.cfg.router.strict_max_tokens,
            vocab_size=self.vocab_size,
        )
        return req, prompt_ids, params

    def _too_long_to_tokenize(self, chars: int, chat: bool) -> None:
        """No token is longer than `_max_token_chars` characters, so a text longer than
        max_model_len times that cannot fit: refused without tokenizing it (a huge
        prompt would hold a tokenizer thread for seconds)."""
        if chars > self.cfg.model.max_model_len * self._max_token_chars:
            where = "messages" if chat else "prompt"
            raise P.AdmissionError(
                f"This model's maximum context length is {self.cfg.model.max_model_len} "
                f"tokens, and the {where} ({chars} characters) is longer than that can hold. "
                "Please shorten it.",
                where,
                "context_length_exceeded",
            )

    def _tokenize(self, req, chat: bool) -> list[int]:
        if chat:
            messages = [{"role": m.role, "content": P.message_text(m)} for m in req.messages]
            # Everything the template gets counts, not only the content.
            self._too_long_to_tokenize(
                sum(len(m["role"]) + len(m["content"]) for m in messages), chat
            )
            try:
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            except jinja2.TemplateSyntaxError:
                raise  # the model's template is broken: a server error
            except jinja2.TemplateError as e:  # it refused these messages (raise_exception)
                raise P.AdmissionError(
                    f"The model's chat template refused the messages: {e}",
                    "messages",
                    "invalid_value",
                ) from None
            return list(ids)
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            vocab = len(self.tokenizer)
            bad = [t for t in req.prompt if not 0 <= t < vocab]
            if bad:
                raise P.AdmissionError(
                    f"prompt token ids out of range [0, {vocab}): {bad[:5]}",
                    param="prompt",
                    code="invalid_token_id",
                )
            return list(req.prompt)
        text = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
        self._too_long_to_tokenize(len(text), chat)
        return self.tokenizer.encode(text)

    def _failure(self, e: BaseException, rid: str) -> Response:
        """The client's error for a failed request: a short message naming the request
        id, a stable `code`, never internals (tracebacks, actor ids, addresses); the
        router log has the details under the same id."""
        if isinstance(e, P.AdmissionError):
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
        return _error(status, f"{msg} (request {rid})", P.error_type_for(status), code, headers)

    async def _stream(
        self, rid: str, events: AsyncIterator, chat: bool, prompt_len: int, include_usage: bool
    ) -> AsyncIterator[bytes]:
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
                yield P.sse(
                    P.usage_chunk(
                        cid,
                        self.model_name,
                        created,
                        chat,
                        {
                            "prompt_tokens": prompt_len,
                            "completion_tokens": n_out,
                            "total_tokens": prompt_len + n_out,
                        },
                    )
                )
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            log.warning("stream %s failed: %r", rid, e)
            yield P.sse(msgspec.json.decode(self._failure(e, rid).body))
        finally:
            await events.aclose()
        yield P.SSE_DONE

    # ---- the request lifecycle ------------------------------------------

    def _remaining(self, state: RequestState) -> float:
        left = state.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"request {state.request_id} passed its deadline "
                f"({self.cfg.router.request_timeout_s}s) during {state.stage}"
            )
        return left

    async def _lifecycle(
        self, state: RequestState, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[tuple[str, str | None, int]]:
        """Yield (text delta, finish_reason, completion tokens so far).

        The one try/finally that owns the request: its table entry (made at
        admission) goes when this generator ends, and every worker it touched
        is told to let go on the way out, whatever the exit."""
        rid = state.request_id
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        stops = StopChecker(params.stop, params.include_stop_str_in_output)
        n_out, outcome = 0, "error"
        try:
            async for tokens, reason in self._tokens(state, prompt_ids, params):
                if n_out == 0:
                    state.first_token_at = time.time()
                    self.metrics.ttft.observe(state.first_token_at - state.created)
                n_out += len(tokens)
                text = detok.push(tokens)
                if reason is not None:
                    text += detok.flush()
                    state.worker_done = True  # the worker ended and freed the sequence itself
                text, stopped = stops.push(text, final=reason is not None)
                if stopped:
                    reason = "stop"
                yield text, reason, n_out
                if reason is not None:
                    outcome = "ok"
                    break
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except GeneratorExit:
            outcome = "cancelled"
            raise
        except TimeoutError:
            outcome = "timeout"
            raise
        finally:
            if state.slow_client:
                outcome = "slow_client"
            self.requests.pop(rid, None)
            self._release(state)
            now = time.time()
            self.metrics.requests.labels(outcome).inc()
            self.metrics.e2e.observe(now - state.created)
            if n_out > 1 and state.first_token_at:
                self.metrics.tpot.observe((now - state.first_token_at) / (n_out - 1))

    async def _tokens(
        self, state: RequestState, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        """Token ids as they are produced, surviving worker loss: a failed
        prefill is retried elsewhere, a failed transfer re-prefills (`router.max_retries`), and a
        decode lost mid-stream is migrated (re-prefill prompt + tokens so far on
        a prefill worker, continue on another decode worker)."""
        produced: list[int] = []
        re_prefills = migrations = 0
        avoid: set[int] = set()  # prefill replicas whose KV transfer failed
        lost: set[int] = set()  # decode replicas this request was lost on
        while True:
            # A migration re-prefills prompt + tokens so far; the workers count those
            # tokens as output (max_tokens, min_tokens, a seeded draw's index).
            before = list(produced)
            state.stage = "prefill"
            wid = f"{state.request_id}-{state.attempts}"
            state.attempts += 1
            res = p = None  # None: the decode worker prefills itself
            got_at = 0.0  # when prefill's result came (router clock)
            if len(prompt_ids) + len(before) <= self.cfg.router.max_local_prefill_tokens:
                self.metrics.local_prefills.inc()  # short: no transfer is worth its cost
            else:
                try:
                    res, p = await self._prefill(state, wid, prompt_ids, before, params, avoid)
                    got_at = time.monotonic()
                except NoPrefillWorker:  # decode-only fallback
                    self.metrics.retries.labels("decode_local").inc()
            if res is not None:
                produced.append(res.first_token)
                yield [res.first_token], res.finish_reason
                if res.finish_reason is not None:
                    return
            state.stage = "decode"
            got_tokens = False
            try:
                async for tokens, reason in self._decode(
                    state, wid, prompt_ids, before, res, got_at, p, params, lost
                ):
                    got_tokens = True
                    produced.extend(tokens)
                    yield tokens, reason
                    if reason is not None:
                        return
                raise WorkerError("decode stream ended without a finish reason")
            except TransferError as e:
                if got_tokens or re_prefills >= max(1, self.cfg.router.max_retries):
                    log.warning(
                        "request %s: KV transfer failed %d times: %r",
                        state.request_id,
                        re_prefills + 1,
                        e,
                    )
                    raise Unavailable(f"KV transfer failed {re_prefills + 1} times") from None
                re_prefills += 1
                if p is not None:
                    avoid.add(p)  # re-prefill elsewhere while another replica is healthy
                self.metrics.retries.labels("transfer").inc()
                log.warning("request %s: transfer failed (%r); re-prefilling", state.request_id, e)
            except _WORKER_LOST as e:
                if migrations >= self.cfg.router.max_migrations:
                    log.warning(
                        "request %s: decode lost after %d migrations: %r",
                        state.request_id,
                        migrations,
                        e,
                    )
                    raise Unavailable(f"decode failed after {migrations} migrations") from None
                migrations += 1
                self.metrics.migrations.inc()
                log.warning(
                    "request %s: decode lost after %d tokens (%r); migrating",
                    state.request_id,
                    len(produced),
                    e,
                )

    async def _prefill(
        self,
        state: RequestState,
        wid: str,
        prompt_ids: list[int],
        before: list[int],
        sp: SamplingParams,
        avoid: set[int],
    ):
        """Prefill prompt + `before` (tokens produced so far) on the least-loaded
        healthy replica (other than those in `avoid` while there are others), retrying
        others on failure. Returns (result, replica)."""
        n = len(prompt_ids) + len(before)
        tried: set[int] = set()
        last: BaseException | None = None
        for attempt in range(self.cfg.router.max_retries + 1):
            i = self.prefill_pool.pick(exclude=tried, avoid=avoid)
            if i is None:
                if not any(self.prefill_pool.healthy):
                    raise NoPrefillWorker()
                break
            state.prefills.add((i, wid))
            self.prefill_pool.load[i] += n
            try:
                left = self._remaining(state)  # before submitting: it may raise
                h = self.prefill_pool.handles[i]
                res = await self.prefill_pool.call(
                    i, h.prefill.remote(wid, prompt_ids, sp, before), left
                )
                return res, i
            except _WORKER_LOST + (TransferError,) as e:
                last = e
                tried.add(i)
                self.prefill_pool.handles[i].release.remote(wid)
                self.metrics.retries.labels("prefill").inc()
                log.warning("request %s: prefill-%d failed (%r)", state.request_id, i, e)
            finally:
                self.prefill_pool.load[i] -= n
        log.warning("request %s: no prefill worker could take it: %r", state.request_id, last)
        raise Unavailable("no prefill worker could take the request")

    async def _decode(
        self,
        state: RequestState,
        wid: str,
        prompt_ids: list[int],
        before: list[int],
        res,
        got_at: float,
        p: int | None,
        sp: SamplingParams,
        lost: set[int],
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        """Decode on the healthy replica with the most free blocks, other than those
        this request was lost on (`lost`, added to here) while another is healthy: a
        migration must not land on the replica that just failed it, which this
        router's health poller may not have marked yet."""
        i = self.decode_pool.pick(avoid=lost)
        if i is None:
            raise Unavailable("no healthy decode worker")
        state.decodes.add((i, wid))
        h = self.decode_pool.handles[i]

        def wait(fn):
            left = self._remaining(state)  # before fn(): it may raise
            return self.decode_pool.call(i, fn(), left)

        def submit():
            # Time left, not a time stamp: the worker's clock is never compared with ours.
            left = self._remaining(state)
            if res is None:
                return h.generate_local.remote(wid, chan.id, prompt_ids, sp, left, before)
            handle = res.handle
            if handle.ttl_s > 0:  # what is left of the lease, counted on our clock
                handle = msgspec.structs.replace(
                    handle, ttl_s=max(0.0, handle.ttl_s - (time.monotonic() - got_at))
                )
            return h.generate.remote(
                wid,
                chan.id,
                prompt_ids,
                res.first_token,
                sp,
                handle,
                left,
                self.prefill_pool.handles[p],
                before,
            )

        self.decode_pool.load[i] += 1  # given back by the finally below
        try:
            chan = await wait(lambda: self._channel(i))
            async for item in chan.stream(wid, submit, wait):
                yield item
        except _WORKER_LOST:
            lost.add(i)
            raise
        finally:
            self.decode_pool.load[i] -= 1

    def _release(self, state: RequestState) -> None:
        """Backstop release on every worker the request touched; idempotent there."""
        last = f"{state.request_id}-{state.attempts - 1}"
        for i, wid in state.prefills:
            self.prefill_pool.handles[i].release.remote(wid)
        for i, wid in state.decodes:
            if not (state.worker_done and wid == last):
                self.decode_pool.handles[i].abort.remote(wid)


def build_app(cfg: Config, model_dir: str, prefill: list, decode: list, peers, pin_to_head: bool):
    """The Serve application for `serve.run`: `router.replicas` replicas of the router."""
    options = {"num_replicas": cfg.router.replicas}
    if pin_to_head:
        options["ray_actor_options"] = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    return Router.options(**options).bind(
        msgspec.json.encode(cfg), model_dir, prefill, decode, peers
    )


__all__ = ["Router", "build_app"]
