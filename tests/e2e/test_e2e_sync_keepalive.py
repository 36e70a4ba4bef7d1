"""The sync worker on microsvc's HTTP engine keeps connections alive without letting an
idle one hold the worker: requests in turn on one connection and pipelined, an idle
kept-alive client and a silent new one while another client is served, the close after
`--keep-alive`, `--keep-alive 0`, a graceful stop and `--max-requests` with connections
parked in the worker's poller.

The servers run one sync worker on microsvc's engine, whatever `--http-engine` pytest got.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

APP = """\
import os
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    time.sleep(30 if path == "/stuck" else 0)  # past any deadline of the test
    body = f"{path} {os.getpid()}".encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    start_response("200 OK", headers)
    return [body]
"""

#: The socket timeout of the test's clients: generous, and shorter than the engine's
#: 10 s wait for a new connection's first request (a worker held by a silent connection
#: would answer only after that).
CLIENT_TIMEOUT = 5.0
TRACEBACK = "Traceback (most recent call last)"


def start_sync(serve: ServeFactory, tmp_path: Path, *extra: str) -> Server:
    (tmp_path / "echo_app.py").write_text(APP)
    return serve(
        ["echo_app:app", "-k", "sync", "-w", "1", "--http-engine", "microsvc", *extra],
        ready_path="/ready",
    )


class Client:
    """One connection to the server: requests sent, responses (with Content-Length) read
    in order from one buffered reader, so pipelined answers are never lost."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT)
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def send(self, *paths: str, close: bool = False) -> None:
        extra = "Connection: close\r\n" if close else ""
        self.sock.sendall(
            b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode() for path in paths)
        )

    def read(self) -> tuple[str, str]:
        """The head of the next response and its body's path (the app echoes it)."""
        head = b""
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            head += line
        assert head.startswith(b"HTTP/1.1 200 "), f"closed or failed after {head!r}"
        length = 0
        for field in head.split(b"\r\n")[1:]:
            name, _, value = field.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = self.reader.read(length)
        return head.decode("latin-1"), body.decode().split()[0]

    def ask(self, path: str, *, close: bool = False) -> str:
        """GET `path`; the head of the answer, which is for `path`."""
        self.send(path, close=close)
        head, answered = self.read()
        assert answered == path, (path, head, answered)
        return head

    def wait_closed(self) -> float:
        """Seconds until the server closes the connection (sending nothing more)."""
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert self.reader.read(1) == b""
        return time.monotonic() - started


def test_sync_serves_requests_in_turn_and_pipelined_on_one_connection(
    serve: ServeFactory, tmp_path: Path
) -> None:
    server = start_sync(serve, tmp_path, "--keep-alive", "1")
    with Client(server) as client:
        for path in ("/one", "/two"):
            assert "Connection: close" not in client.ask(path)
        # Pipelined: every request sent before any answer; the answers come in order.
        client.send("/a", "/b", "/c", "/d")
        assert [client.read()[1] for _ in range(4)] == ["/a", "/b", "/c", "/d"]
        # Idle: closed after --keep-alive (1 s), not at once and not never.
        waited = client.wait_closed()
    assert 0.5 <= waited < CLIENT_TIMEOUT, waited
    assert TRACEBACK not in server.log_text(), server.describe()


def test_idle_connections_do_not_hold_the_sync_worker(serve: ServeFactory, tmp_path: Path) -> None:
    server = start_sync(serve, tmp_path, "--keep-alive", "30")
    # `idle` is kept alive after its answer; `silent` connected and sends nothing.
    with Client(server) as idle, Client(server) as silent:
        assert "Connection: close" not in idle.ask("/first")
        for round_ in range(3):
            with Client(server) as other:
                other.ask(f"/other{round_}", close=True)
        # The idle connection was kept all along; so was the silent one, whose late
        # request is served too.
        assert "Connection: close" not in idle.ask("/again")
        silent.ask("/late", close=True)
    assert TRACEBACK not in server.log_text(), server.describe()


def test_keep_alive_0_closes_each_sync_connection_after_its_answer(
    serve: ServeFactory, tmp_path: Path
) -> None:
    server = start_sync(serve, tmp_path, "--keep-alive", "0")
    with Client(server) as client:
        client.send("/one", "/two")
        head, answered = client.read()
        assert "Connection: close" in head and answered == "/one", head
        assert client.wait_closed() < CLIENT_TIMEOUT  # the second request is not answered


def test_sigterm_stops_a_sync_worker_with_parked_connections(
    serve: ServeFactory, tmp_path: Path
) -> None:
    server = start_sync(serve, tmp_path, "--keep-alive", "60")
    parked = [Client(server) for _ in range(3)]
    try:
        for index, client in enumerate(parked):
            assert "Connection: close" not in client.ask(f"/{index}")
        started = time.monotonic()
        # Well within --keep-alive: the worker does not wait for its idle connections.
        assert server.stop(timeout=20) == 0, server.describe()
        assert time.monotonic() - started < 20
        for client in parked:
            assert client.wait_closed() < CLIENT_TIMEOUT
    finally:
        for client in parked:
            client.close()
    assert TRACEBACK not in server.log_text(), server.describe()
    assert not server.orphans, server.orphans


def test_max_requests_recycles_a_sync_worker_that_keeps_connections(
    serve: ServeFactory, tmp_path: Path
) -> None:
    server = start_sync(serve, tmp_path, "--keep-alive", "30", "--max-requests", "5")
    answers: list[tuple[str, str]] = []
    with requests.Session() as session:  # one kept-alive connection while it lasts
        for index in range(12):
            response = session.get(f"{server.url}/r{index}", timeout=30)
            assert response.status_code == 200, server.describe()
            answers.append((response.text.split()[1], response.headers.get("Connection", "")))
    pids = [pid for pid, _ in answers]
    assert len(set(pids)) >= 2, answers
    # The last answer of each worker said Connection: close, the others kept the connection.
    for (pid, connection), (next_pid, _) in itertools.pairwise(answers):
        assert (connection == "close") == (pid != next_pid), answers
    server.wait_log(r"Autorestarting worker after current request\.")
    assert TRACEBACK not in server.log_text(), server.describe()


def test_a_request_past_its_deadline_retires_a_sync_worker_at_once_despite_parked_connections(
    serve: ServeFactory, tmp_path: Path
) -> None:
    # The stuck request holds the only thread that serves: the worker does not wait for
    # its idle connections (nor --graceful-timeout) before it exits.
    server = start_sync(serve, tmp_path, "--keep-alive", "60", "--request-timeout", "1s")
    with Client(server) as parked, Client(server) as stuck:
        assert "Connection: close" not in parked.ask("/first")
        stuck.send("/stuck")
        head = stuck.reader.readline()
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert parked.wait_closed() < CLIENT_TIMEOUT
    server.wait_log(r"Worker exiting \(pid: \d+\): 1 request\(s\) past their deadline")
    assert TRACEBACK not in server.log_text(), server.describe()
