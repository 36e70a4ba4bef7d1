"""The eventlet worker under conditions the demo app does not meet: accept errors, TLS,
websockets that take the connection over, and stopping while busy.

- Out of file descriptors, the worker fails to accept; once descriptors are free again
  it accepts again (it logs the trouble once, not once per failed accept).
- With certfile/keyfile it speaks TLS, tells the app the scheme is https, and does not
  answer plain HTTP.
- `eventlet.websocket` answers the upgrade and the frames on the socket itself; after
  the close frame nothing more is written (no `HTTP/1.1 500`), nothing is logged as an
  error, and the metrics count the session as status 101.
- A stopping worker closes its listening sockets at once: a new connection is refused
  (or served by a live worker), it never hangs; the request in flight still gets 200.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from microsvc.observe.scoreboard import Scoreboard, ScoreboardError, scoreboard_path

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = [
    pytest.mark.e2e,
    # Not imported here: eventlet warns at every fork of the test process.
    pytest.mark.skipif(importlib.util.find_spec("eventlet") is None, reason="needs eventlet"),
]

SCHEME_APP = """\
def app(environ, start_response):
    body = environ["wsgi.url_scheme"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""

WEBSOCKET_APP = """\
from eventlet import websocket


@websocket.WebSocketWSGI
def echo_once(ws):
    # Echo one message and end the session: the server sends the close frame.
    message = ws.wait()
    if message is not None:
        ws.send(message)


@websocket.WebSocketWSGI
def echo_until_closed(ws):
    # Echo until the client sends its close frame.
    while (message := ws.wait()) is not None:
        ws.send(message)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/ws/once":
        return echo_once(environ, start_response)
    if environ["PATH_INFO"] == "/ws/echo":
        return echo_until_closed(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
"""

TRACEBACK = "Traceback (most recent call last)"
ACCEPT_ERROR = "cannot accept a connection on"


def limit_open_files(count: int) -> Callable[[], None]:
    def limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))

    return limit


def open_requests(port: int, path: str, count: int) -> list[socket.socket]:
    """`count` connections, each with a GET `path` sent and not read."""
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        connections.append(connection)
    return connections


def get_until_ok(url: str, deadline: float, **kwargs: object) -> requests.Response | None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            response = requests.get(url, timeout=2, **kwargs)  # type: ignore[arg-type]
        except requests.RequestException:
            time.sleep(0.2)
            continue
        if response.status_code == 200:
            return response
    return None


def test_worker_accepts_again_after_running_out_of_file_descriptors(serve: ServeFactory) -> None:
    server = serve(["-k", "eventlet", "--workers", "1"], preexec_fn=limit_open_files(48))
    # 60 slow requests need more descriptors than the worker may open: accepts fail.
    held = open_requests(server.port, "/io?ms=1500", 60)
    server.wait_log(r"Too many open files")
    for connection in held:
        connection.close()

    response = get_until_ok(server.url + "/health", deadline=15)
    assert response is not None, f"no request served after the accept errors\n{server.describe()}"
    log = server.log_text()
    # Logged once per run of failures, not once per failed accept.
    assert 1 <= log.count(ACCEPT_ERROR) <= 3, log
    assert TRACEBACK not in log, log


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_certfile_and_keyfile_serve_tls(
    serve: ServeFactory, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    (tmp_path / "scheme.py").write_text(SCHEME_APP)
    server = serve(
        [
            *("scheme:app", "-k", "eventlet", "--workers", "1"),
            *("--set", f"certfile={cert}", "--set", f"keyfile={key}"),
        ],
        wait=False,
    )
    https = f"https://127.0.0.1:{server.port}/"
    response = get_until_ok(https, deadline=45, verify=str(cert))
    assert response is not None, f"no answer over TLS\n{server.describe()}"
    assert response.text == "https", server.describe()
    # A client that never starts its handshake holds up no one else.
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with requests.get(https, timeout=10, verify=str(cert)) as response:
        assert response.text == "https", server.describe()

    # Plain HTTP on the TLS port gets no HTTP answer.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = _read_to_end(plain)
    assert not received.startswith(b"HTTP/"), received[:200]
    # The worker still serves TLS afterwards.
    context = ssl.create_default_context(cafile=str(cert))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = _read_to_end(tls)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.endswith(b"https"), answer[-200:]
    stalled.close()
    assert TRACEBACK not in server.log_text(), server.describe()


def _read_to_end(connection: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, ssl.SSLError):
        pass
    return b"".join(chunks)


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (payload under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def _read_exactly(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def _websocket_session(port: int, path: str, client_closes: bool) -> bytes:
    """Handshake, one text frame echoed; the client sends a close frame if
    `client_closes`; return what the server sent after the echo, to the end."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = connection.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        )
        assert b"Sec-WebSocket-Accept: " + accept in head, head

        connection.sendall(_frame(0x1, b"hello"))
        assert _read_exactly(connection, 7) == b"\x81\x05hello"
        if client_closes:
            connection.sendall(_frame(0x8, struct.pack("!H", 1000)))
        return _read_to_end(connection)


@pytest.mark.both_engines
@pytest.mark.parametrize("closing", ["server", "client"])
def test_websocket_session_ends_without_a_500(
    serve: ServeFactory, tmp_path: Path, free_port: Callable[[], int], closing: str
) -> None:
    (tmp_path / "wsapp.py").write_text(WEBSOCKET_APP)
    metrics_port = free_port()
    server = serve(
        [
            *("wsapp:app", "-k", "eventlet", "--workers", "1"),
            *("--metrics", "--metrics-bind", f"127.0.0.1:{metrics_port}"),
        ],
    )
    if closing == "server":
        rest = _websocket_session(server.port, "/ws/once", client_closes=False)
    else:
        rest = _websocket_session(server.port, "/ws/echo", client_closes=True)

    # The server's close frame, then the end of the stream: no HTTP response after it.
    assert rest.startswith(b"\x88"), rest[:200]
    assert b"HTTP/" not in rest, rest[:200]
    # The worker serves on, and has logged no error.
    with requests.get(server.url + "/", timeout=10) as response:
        assert response.status_code == 200, server.describe()
    log = server.log_text()
    assert "AttributeError" not in log, log
    assert TRACEBACK not in log, log

    statuses = _request_statuses(f"http://127.0.0.1:{metrics_port}/metrics")
    assert statuses.get("101") == 1, statuses
    assert "500" not in statuses, statuses


def _request_statuses(url: str) -> dict[str, float]:
    """Requests counted by status, scraped once no request is in flight any more (the
    last response may reach the client a moment before it is counted)."""
    end = time.monotonic() + 10
    while True:
        with requests.get(url, timeout=10) as response:
            assert response.status_code == 200, response.text
            text = response.text
        statuses: dict[str, float] = {}
        in_flight = None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "microsvc_http_requests_total":
                    status = sample.labels["status"]
                    statuses[status] = statuses.get(status, 0) + sample.value
                elif sample.name == "microsvc_http_requests_in_flight":
                    in_flight = sample.value
        if in_flight == 0:
            return statuses
        assert time.monotonic() < end, f"requests in flight: {in_flight}\n{text}"
        time.sleep(0.1)


def _probe(port: int) -> str:
    """Open a new connection and ask for /health: 'refused', 'served', or what went wrong."""
    try:
        connection = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return "refused"
    with connection:
        try:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = connection.recv(65536)
        except TimeoutError:
            return "hung"
        except ConnectionResetError:
            return "reset"
    if answer.startswith(b"HTTP/1.1 200"):
        return "served"
    return f"answered {answer[:40]!r}"


def _listening(port: int) -> bool:
    """Whether an IPv4 TCP socket listens on `port`, read from the kernel's table
    (/proc/net/tcp: local address, then state, 0A for LISTEN) alone; psutil's
    net_connections also searches every process's file descriptors, which takes seconds
    on a machine busy with other servers."""
    wanted = f":{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and fields[1].endswith(wanted):
                return True
    return False


def _wait_in_flight(board: Scoreboard, wanted: int, deadline: float = 10.0) -> int:
    """Wait until the app runs `wanted` requests (as the workers note them in the
    scoreboard) or `deadline` seconds pass; return the last count."""
    end = time.monotonic() + deadline
    while True:
        try:
            running = sum(worker.in_flight for worker in board.snapshot().workers)
        except ScoreboardError:  # the header is being written: read again
            running = 0
        if running >= wanted or time.monotonic() > end:
            return running
        time.sleep(0.02)


#: The request in flight while the worker stops.
SLOW_MS = 4000


@pytest.mark.parametrize("stop", ["term", "recycle-reuse-port"])
def test_stopping_worker_stops_taking_new_connections_at_once(
    serve: ServeFactory, runtime_dir: Path, stop: str
) -> None:
    args = ["-k", "eventlet", "--workers", "1", "--graceful-timeout", "20"]
    if stop == "recycle-reuse-port":
        # The readiness probe is request 1; the slow request, number 2, recycles the
        # worker, and with reuse_port its listening socket is its own.
        args += ["--max-requests", "2", "--set", "reuse_port=true"]
    server = serve(args)

    slow: dict[str, object] = {}

    def slow_request() -> None:
        try:
            with requests.get(server.url + f"/io?ms={SLOW_MS}", timeout=30) as response:
                slow["status"] = response.status_code
        except requests.RequestException as exc:
            slow["error"] = repr(exc)

    thread = threading.Thread(target=slow_request, daemon=True)
    board = Scoreboard.open(scoreboard_path(server.pid, runtime_dir))
    thread.start()
    try:
        running = _wait_in_flight(board, 1)
        assert running == 1, f"the slow request is not in the app\n{server.describe()}"
        if stop == "term":
            server.proc.send_signal(signal.SIGTERM)
            server.wait_log(r"Handling signal: term")
        # Within moments, nothing listens on the port any more (the slow request goes on).
        end = time.monotonic() + SLOW_MS / 2000
        while _listening(server.port) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _listening(server.port), f"still listening\n{server.describe()}"
        assert thread.is_alive(), f"{slow}\n{server.describe()}"

        outcome = _probe(server.port)
        assert outcome in ("refused", "served"), f"new connection: {outcome}\n{server.describe()}"
    finally:
        thread.join(30)
        board.close()
    assert slow == {"status": 200}, f"{slow}\n{server.describe()}"


#: Signals sent in the storm: eventlet's own queue failed within a few hundred thousand.
STORM_SIGNALS = 600_000


def test_a_storm_of_signals_at_the_master_is_queued_and_served_on(serve: ServeFactory) -> None:
    """Workers that end together send SIGCHLDs that close together. Under eventlet the
    master's signal queue must take a signal that interrupts the handler of another:
    eventlet's SimpleQueue waited on its own lock there, and the master hung or died."""
    server = serve(["-k", "eventlet", "--workers", "2"])
    for _ in range(STORM_SIGNALS):
        os.kill(server.pid, signal.SIGCHLD)  # the master reaps nothing and serves on
    assert server.proc.poll() is None, server.describe()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert len(server.worker_pids()) == 2, server.describe()
    assert server.stop() == 0, server.describe()
    assert TRACEBACK not in server.log_text(), server.describe()
