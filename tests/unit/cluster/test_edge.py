"""cluster/edge.py's accounting of output a client has not read, on real sockets."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from cluster.edge import EdgeProtocol

pytestmark = pytest.mark.unit


class _Transport:
    """The two things `unread` asks of uvloop's transport."""

    def __init__(self, sock: socket.socket, buffered: int):
        self.sock, self.buffered = sock, buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None


def test_unread_counts_the_kernels_send_queue_and_survives_a_closed_socket():
    """Sent but unacknowledged bytes count (the peer never reads); and a connection whose
    socket is closed already (fileno -1: the idle timer fired after the client left) is
    just its transport buffer. Before, that raised ValueError inside the proxy's timer
    callback and the connection was never closed by it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()  # the client: it never reads
    try:
        a.setblocking(False)
        sent = 0
        try:
            while sent < 1 << 22:
                sent += a.send(b"x" * 65536)
        except BlockingIOError:
            pass
        unread = EdgeProtocol.unread(SimpleNamespace(transport=_Transport(a, 10)))
        assert 10 < unread <= sent + 10
    finally:
        a.close()
        b.close()
    assert a.fileno() == -1
    assert EdgeProtocol.unread(SimpleNamespace(transport=_Transport(a, 7))) == 7


def test_a_stream_whose_proxy_is_gone_ends_as_a_disconnect():
    """A stop kills Serve's proxy while streams are open: the stream's wait for a
    disconnect ends quietly instead of raising (a stack dump on Ctrl-C)."""
    import asyncio

    from cluster.router import EventStream

    async def gone():
        raise RuntimeError("The actor died unexpectedly before finishing this task.")

    async def body():
        yield b""

    stream = EventStream(body(), [], media_type="text/event-stream")
    asyncio.run(asyncio.wait_for(stream.listen_for_disconnect(gone), 5))
