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
import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError

from cluster import responses
from cluster.admission import Admission
from cluster.channels import DecodeChannels
from cluster.config import HEAD_RESOURCE, Config
from cluster.edge import SLOW_CLIENT
from cluster.lifecycle import Lifecycle, RequestState, Unavailable
from cluster.metrics import RouterMetrics
from cluster.peers import report_ttl
from cluster.pool import WorkerPool
from cluster.protocol import AdmissionError
from wire.api import XFER_BUCKETS, SequenceFailed
from wire.host import process_usage

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
app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None)


ROUTER_HEADER = "pdcluster-router"  # on every completion response: the replica that served it
PEER_TIMEOUT_S = 2.0  # a call to the router replicas' shared actor (cluster/peers.py)


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
        self._admission_threads = ThreadPoolExecutor(
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
        self._report_task = loop.create_task(self._keep_reporting())

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
            "router_requests_in_flight": len(self.lifecycle.requests),
            "router_admitting": self._admitting,
            "router_channels": len(self.channels.open),
            "router_channels_opened": self.channels.opened,
            "router_channel_queues": self.channels.queues(),
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
                sum(1 for r in self.lifecycle.requests.values() if r.stage == stage)
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
    async def metrics_endpoint(self) -> Response:
        self._count_stages()
        # The others' series carry the time of their report: a scrape that reaches a
        # replica with an older report cannot move a counter back in Prometheus.
        routers = {rid: (st["reported_at"], m) for rid, (st, m) in self._peers().items()}
        routers[self.replica_id] = (None, self.metrics.own_families())
        return Response(self.metrics.render(routers), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self) -> Response:
        return _json(responses.models_list(self.model_name))

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

    # ---- a completion request -------------------------------------------

    async def _handle(self, request: Request, chat: bool) -> Response:
        # The queue check comes first: a full router spends nothing on the request.
        r = self.cfg.router
        queued = len(self.lifecycle.requests) + self._admitting
        if queued >= r.max_queued:
            return _error(
                429,
                f"{queued} requests in flight, the limit is {r.max_queued}; retry later",
                "rate_limit_error",
                "queue_full",
                headers={"Retry-After": "1", ROUTER_HEADER: self.replica_id},
            )
        self._admitting += 1  # holds a slot while it is read and admitted
        rid = uuid.uuid4().hex
        try:
            try:
                body = await asyncio.wait_for(self.admission.read_body(request), r.body_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                raise AdmissionError(
                    f"request body not received within {r.body_timeout_s}s (router.body_timeout_s)",
                    code="request_timeout",
                    status=408,
                ) from None
            # Parsing, chat templating and tokenizing run on a small pool of threads,
            # never on this event loop (other streams, /health and the watchdog).
            req, prompt_ids, params = await asyncio.get_running_loop().run_in_executor(
                self._admission_threads, self.admission.admit, body, chat
            )
        except AdmissionError as e:
            return _json(e.to_json(), e.status)
        except Exception as e:  # noqa: BLE001 - never a bare 500: logged, in OpenAI's shape
            return self._failure(e, rid)
        finally:
            self._admitting -= 1
        # The slot is taken now, before any await, so a burst cannot overrun
        # max_queued. The lifecycle's finally gives it back; a generator that is
        # dropped unstarted (client gone before the body) gives it back when collected.
        state = self.lifecycle.admit(rid, len(prompt_ids))
        events = self.lifecycle.run(state, prompt_ids, params)
        weakref.finalize(events, self.lifecycle.requests.pop, rid, None)
        headers = {"pdcluster-request-id": rid, ROUTER_HEADER: self.replica_id}
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(
                self._stream(cid, rid, events, chat, len(prompt_ids), include_usage),
                state,
                media_type="text/event-stream",
                headers=headers,
            )
        text, reason, n_out = "", None, 0
        try:
            async for piece, reason, n_out in events:
                text += piece
        except Exception as e:  # noqa: BLE001 - typed failures become HTTP errors
            return self._failure(e, rid)
        usage = responses.usage(len(prompt_ids), n_out)
        body = responses.completion(chat, cid, self.model_name, text, reason, usage)
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
        self,
        cid: str,
        rid: str,
        events: AsyncIterator,
        chat: bool,
        prompt_len: int,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        model, n_out = self.model_name, 0
        try:
            if chat:
                yield responses.sse(
                    responses.chunk(chat, cid, model, created, None, None, role="assistant")
                )
            async for piece, reason, n_out in events:
                if piece or reason:
                    yield responses.sse(responses.chunk(chat, cid, model, created, piece, reason))
            if include_usage:
                usage = responses.usage(prompt_len, n_out)
                yield responses.sse(responses.usage_chunk(chat, cid, model, created, usage))
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            log.warning("stream %s failed: %r", rid, e)
            yield responses.sse(msgspec.json.decode(self._failure(e, rid).body))
        finally:
            await events.aclose()
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
