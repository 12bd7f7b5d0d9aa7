"""The HTTP edge: bounds that Ray Serve's proxy (uvicorn) does not set, on every connection.

Serve 2.60 hands a replica's response to its proxy as a Ray object stream that never
blocks: output a client does not read piles up in the proxy, without a cap, while the
router sees the request end. uvicorn starts no timer on a connection that has not sent a
request (or stops inside its headers), caps nothing, and closes a `Connection: close`
request with its body unread, which resets the connection before a plain client (urllib)
reads the 413. HTTPOptions reaches none of it (only uvicorn's keep-alive timeout), so
`install` makes uvicorn serve every connection with `EdgeProtocol`. It runs in the proxy
process, before its server starts, as Serve's proxy callback: the launcher names it in
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH in the Serve controller's environment, which
the proxy the controller starts inherits.

* output is never held back in Ray's stream: it is written to the connection at once, and
  a stream whose unread bytes there pass `router.max_unread_bytes` is cut off (the client
  is a slow reader; the router ends and counts the request, see `SLOW_CLIENT`);
* a connection with no request in progress (before its first, between two, or stopped
  inside its headers) is closed after `router.idle_timeout_s`;
* past `router.max_connections` open connections a request is a 503;
* Serve's per-request `x-request-disconnect-disabled` / `x-request-timeout-seconds`
  headers are dropped: a client cannot keep its request running after it hangs up;
* a response sent before the request body was read (a 413) is followed by reading and
  discarding the rest of the body (for at most `router.body_timeout_s` and LINGER_BYTES)
  before the connection closes, so the client reads the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios

import msgspec
import uvicorn.config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cluster.responses import error_body

ENV = "PDCLUSTER_EDGE"  # the limits below, as JSON, in the proxy's environment
# The ASGI receive event the edge sends a request whose client it cut off for reading too
# slowly, before the disconnect: the router ends the stream itself and counts it.
SLOW_CLIENT = "pdcluster.slow_client"
SLOW_CLIENT_GRACE_S = 2.0  # the router's time to do so before Serve cancels the request
LINGER_BYTES = 256 * 1024 * 1024  # request body discarded after an early answer, at most
MAX_HEAD_BYTES = 64 * 1024  # request line and headers
_IGNORED_HEADERS = {b"x-request-disconnect-disabled", b"x-request-timeout-seconds"}


class EdgeLimits(msgspec.Struct, frozen=True):
    max_unread_bytes: int
    idle_timeout_s: float
    max_connections: int
    linger_s: float


def proxy_env(router) -> dict[str, str]:
    """The environment that installs the edge in Serve's proxy, for `router` (RouterConfig)."""
    limits = EdgeLimits(
        router.max_unread_bytes,
        router.idle_timeout_s,
        router.max_connections,
        router.body_timeout_s,
    )
    return {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}:install",
        ENV: msgspec.json.encode(limits).decode(),
    }


_limits: EdgeLimits | None = None


def install() -> list:
    """Serve's proxy callback, run before the proxy starts its HTTP server: uvicorn's
    "auto" protocol becomes EdgeProtocol. Returns no middlewares."""
    global _limits
    env = os.environ.get(ENV)
    if env is None:  # installed by the environment alone (Serve started by KubeRay): defaults
        from cluster.config import RouterConfig

        env = proxy_env(RouterConfig())[ENV]
    _limits = msgspec.json.decode(env, type=EdgeLimits)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:EdgeProtocol"
    return []


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with the edge's bounds (module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._head = 0  # bytes of a request whose headers are not complete yet
        self._draining = False  # discarding a request body after the response
        self._drained = 0
        self._close_after_body = False
        self._slow = False

    # -- timers: a connection with no request in progress has a deadline

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, self._close)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        # A transport closed with output still buffered stays open until the client reads
        # it, which a client that stopped reading never does: that output is dropped.
        if self.unread():
            self.drop()
        elif not self.transport.is_closing():
            self.transport.close()

    def drop(self) -> None:
        """Close at once, discarding unsent output here and in the kernel (a reset)."""
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def unread(self) -> int:
        """Output the client has not taken: in the transport, and sent but not acknowledged
        by the client (the kernel's send queue, which autotunes to hundreds of KB)."""
        n = self.transport.get_write_buffer_size()
        # ValueError: the socket is closed already (fileno -1), nothing left in the kernel.
        with contextlib.suppress(OSError, AttributeError, ValueError):
            fd = self.transport.get_extra_info("socket").fileno()
            n += struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return n

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(_limits.idle_timeout_s)

    def timeout_keep_alive_handler(self) -> None:
        self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the connection is the websocket protocol's from here
        super().handle_websocket_upgrade()

    # -- reading

    def data_received(self, data: bytes) -> None:
        if self._draining:
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self.drop()
                return
        heading = self._timer is not None and not self._draining  # no request in progress
        super().data_received(data)
        if heading and self._timer is not None:  # and still none: headers incomplete
            self._head += len(data)
            if self._head > MAX_HEAD_BYTES:
                self.send_400_response("Request headers too large.")

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head = 0
        super().on_headers_complete()
        has_body = any(
            (k == b"content-length" and v.strip() != b"0") or k == b"transfer-encoding"
            for k, v in self.headers
        )
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and not cycle.keep_alive and has_body:
            # uvicorn would close as soon as the response is sent, with the body unread:
            # the kernel then resets the connection, and the client never reads the answer.
            cycle.keep_alive = True
            self._close_after_body = True

    def on_message_complete(self) -> None:
        if self._draining:  # the rest of the body is read: the client reads the answer
            self._draining = False
            if self._close_after_body:
                self._finish()
            else:
                self._arm(_limits.idle_timeout_s)
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if pipelined or self.transport.is_closing():
            return
        if self.cycle.more_body:  # answered before its body was read (a 413)
            self._draining, self._drained = True, 0
            self._arm(_limits.linger_s)
        elif self._close_after_body:
            self._finish()
        else:
            self._arm(_limits.idle_timeout_s)

    def _finish(self) -> None:
        """Close once the answer is out; drop it if the client has not read it by then."""
        self.transport.close()
        self._arm(_limits.idle_timeout_s)

    # -- writing: never paused, so nothing waits in Ray's stream; the app checks what is unread

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def _start_asgi_task(self, cycle, app) -> None:
        super()._start_asgi_task(cycle, _Bounded(app, self))


class _Bounded:
    """The ASGI app of one request on an EdgeProtocol connection."""

    def __init__(self, app, conn: EdgeProtocol) -> None:
        self.app, self.conn = app, conn

    async def __call__(self, scope, receive, send) -> None:
        conn = self.conn
        scope["headers"] = [h for h in scope["headers"] if h[0] not in _IGNORED_HEADERS]
        if len(conn.connections) > _limits.max_connections:
            conn._close_after_body = True
            await _too_many_connections(send)
            return
        told = False

        async def bounded_send(message) -> None:
            await send(message)
            if message.get("more_body") and not conn.transport.is_closing():
                if conn.unread() > _limits.max_unread_bytes:
                    conn._slow = True
                    conn.drop()

        async def receive_or_slow():
            nonlocal told
            message = await receive()
            if conn._slow and message["type"] == "http.disconnect":
                if not told:
                    told = True
                    return {"type": SLOW_CLIENT}
                await asyncio.sleep(SLOW_CLIENT_GRACE_S)
            return message

        await self.app(scope, receive_or_slow, bounded_send)


async def _too_many_connections(send) -> None:
    body = error_body(
        f"more than {_limits.max_connections} open connections (router.max_connections); "
        "retry later",
        "service_unavailable",
        None,
        "too_many_connections",
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
