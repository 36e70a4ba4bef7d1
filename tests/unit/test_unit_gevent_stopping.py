"""The gevent worker serves every connection it accepted, even when the worker closes its
listening socket before the connection's greenlet first runs.

The event loop accepts a batch of connections and spawns a greenlet for each; a greenlet
first runs on a later turn of the loop. If the worker's run loop wakes in between and
sees that the worker is stopping, it closes the listening sockets, and only then do
those greenlets run: gunicorn's handler asks the listening socket for its address, which
a closed socket cannot tell. These tests make that order happen on purpose: they call
the accept callback the loop would call, close the server, then let the greenlets run.
"""

from __future__ import annotations

import socket
import time
from functools import partial
from typing import Any

import pytest

REQUEST = b"GET /data HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
CLIENTS = 5


class RecordingLog:
    """gunicorn's logger, as far as the connection handler uses it."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def exception(self, message: str, *args: Any) -> None:
        self.errors.append(message % args)

    error = critical = exception

    def debug(self, *args: Any) -> None:
        pass

    info = warning = debug

    def access(self, *args: Any) -> None:
        pass


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = b'{"ok": true}'
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def make_worker(log: RecordingLog, class_name: str) -> Any:
    from gunicorn.config import Config

    from microsvc.workers import gevent as workers

    worker_class = getattr(workers, class_name)
    worker = worker_class.__new__(worker_class)
    worker.cfg = Config()
    worker.log = log
    worker.wsgi = app
    worker.alive = False  # stopping, as when the run loop closes the listeners
    worker.nr = 0
    worker.max_requests = 10**9
    worker._recycling_on = False
    if hasattr(worker, "setup_engine"):
        worker.setup_engine()
    return worker


def read_all(client: socket.socket) -> bytes:
    client.settimeout(10)
    chunks = []
    try:
        while chunk := client.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        chunks.append(b"<connection reset>")
    return b"".join(chunks)


def serve_after_close(
    listener: Any, class_name: str = "GeventWorker"
) -> tuple[list[bytes], list[str], int]:
    """Accept CLIENTS connections in one batch, close the server before their greenlets
    run, let them run; return what each client got, the errors logged, and how many
    greenlets were waiting to run when the server closed."""
    import gevent
    from gevent.pool import Pool

    from microsvc.observe.scoreboard import listen_queue
    from microsvc.workers.gevent import ACCEPT_BATCH, BatchAcceptServer

    log = RecordingLog()
    worker = make_worker(log, class_name)
    pool = Pool(100)
    server = BatchAcceptServer(listener, handle=partial(worker.handle, listener), spawn=pool)
    server.max_accept = ACCEPT_BATCH
    clients = [socket.create_connection(listener.getsockname(), timeout=10) for _ in range(CLIENTS)]
    try:
        for client in clients:
            client.sendall(REQUEST)
        # All of them in the accept queue before the batch (on a busy machine the kernel
        # may complete a loopback handshake a moment after connect returns).
        end = time.monotonic() + 10
        while (listen_queue(listener).queue or 0) < CLIENTS and time.monotonic() < end:
            time.sleep(0.01)
        server.start()
        server._do_read()  # what the loop calls when the listener is readable
        waiting = sum(1 for greenlet in pool if greenlet.gr_frame is None)
        server.close()
        pool.join(timeout=10)
        gevent.sleep(0)
        return [read_all(client) for client in clients], log.errors, waiting
    finally:
        for client in clients:
            client.close()


def gevent_listener() -> Any:
    from gevent import socket as gsocket

    sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


#: gevent workers on gunicorn's request path and on microsvc's HTTP engine.
WORKER_CLASSES = ["GeventWorker", "EngineGeventWorker"]


@pytest.mark.parametrize("class_name", WORKER_CLASSES)
def test_connections_accepted_before_the_listener_closes_are_served_after_it(
    class_name: str,
) -> None:
    pytest.importorskip("gevent")
    from microsvc.workers.gevent import ListeningSocket

    answers, errors, waiting = serve_after_close(
        ListeningSocket.take(gevent_listener()), class_name
    )

    assert waiting == CLIENTS  # the race: spawned in the batch, not run before the close
    assert errors == []
    assert all(answer.startswith(b"HTTP/1.1 200 OK\r\n") for answer in answers), answers
    assert all(answer.endswith(b'{"ok": true}') for answer in answers), answers


def test_a_listening_socket_tells_its_address_after_it_is_closed() -> None:
    pytest.importorskip("gevent")
    from microsvc.workers.gevent import ListeningSocket

    plain = gevent_listener()
    address = plain.getsockname()
    fileno = plain.fileno()
    listener = ListeningSocket.take(plain)
    assert listener.fileno() == fileno
    assert plain.fileno() == -1  # detached: the descriptor has one owner
    listener.close()
    assert listener.getsockname() == address
