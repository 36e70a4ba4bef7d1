"""gthread and sync on microsvc's HTTP engine: a new client is served while kept-alive
clients keep every thread of the worker (sync: its one thread) busy; they do not starve
the accept."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

APP = """\
import time


def app(environ, start_response):
    if environ["PATH_INFO"] == "/work":
        time.sleep(0.005)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
"""

REQUEST = b"GET /work HTTP/1.1\r\nHost: localhost\r\n\r\n"
#: Kept-alive clients, each sending its next request as soon as it has a response.
BUSY_CLIENTS = 5
#: How long the kept-alive clients go on at most. A fair worker serves a new client
#: after the few requests that were in line before it; an unfair one serves it only
#: once the others stop, which they do at this bound.
BUSY_FOR = 10.0


def read_response(sock: socket.socket) -> bytes:
    """One response (with Content-Length) from `sock`: its status line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed inside a body")
        body += chunk
    assert len(body) == length, "a response came before its request was sent"
    return head.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(
    "worker_class",
    [("-k", "gthread", "--threads", "1"), ("-k", "sync")],
    ids=["gthread", "sync"],
)
def test_new_clients_are_served_while_kept_alive_clients_keep_every_thread_busy(
    serve: ServeFactory, tmp_path: Path, worker_class: tuple[str, ...]
) -> None:
    (tmp_path / "fair_app.py").write_text(APP)
    server = serve(
        ["fair_app:app", *worker_class, "-w", "1", "--keep-alive", "30"],
        env={"MICROSVC_HTTP_ENGINE": "microsvc"},
    )
    stop = threading.Event()
    timer = threading.Timer(BUSY_FOR, stop.set)
    served = [0] * BUSY_CLIENTS
    errors: list[str] = []
    clients: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def keep_busy(index: int, sock: socket.socket) -> None:
        try:
            # At least one request each, even a client whose thread starts as the test ends.
            while True:
                sock.sendall(REQUEST)
                read_response(sock)
                served[index] += 1
                if stop.is_set():
                    break
        except OSError as exc:
            errors.append(f"client {index}: {exc!r}")

    timer.start()
    try:
        for index in range(BUSY_CLIENTS):
            # A new client, while the ones before it keep the thread busy.
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=BUSY_FOR * 3)
            clients.append(sock)
            sock.sendall(REQUEST)
            assert read_response(sock) == b"HTTP/1.1 200 OK"
            assert not stop.is_set(), (
                f"new client {index + 1} was served only after the {index} kept-alive "
                f"clients before it stopped (they were served {served} times)"
            )
            thread = threading.Thread(target=keep_busy, args=(index, sock), daemon=True)
            thread.start()
            threads.append(thread)
    finally:
        stop.set()
        timer.cancel()
        for thread in threads:
            thread.join(BUSY_FOR)
        for sock in clients:
            sock.close()
    assert not errors, errors
    assert all(served), served
    assert "Traceback" not in server.log_text(), server.describe()
