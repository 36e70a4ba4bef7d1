"""microsvc.workers.engine: gunicorn's settings turned into the engine's, and the hooks a
worker runs around each request (max_requests, access log, pre_request and
post_request), on a real connection served by `serve_connection`; and the sync and
gthread workers' connections (`QuickSocket`: blocking, timeouts as a Python socket's)."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from gunicorn.config import Config

from microsvc.errors import UsageError
from microsvc.http import serve_connection
from microsvc.workers.engine import (
    DEFAULT_FIELD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    EngineWorker,
    http_config,
)
from microsvc.workers.quicksocket import Acceptor, LingeringCloses, QuickSocket, has_data


def gunicorn_cfg(**settings: Any) -> Config:
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    return cfg


def test_limits_of_0_mean_gunicorns_maximum() -> None:
    config = http_config(
        gunicorn_cfg(limit_request_line=0, limit_request_fields=0, limit_request_field_size=0)
    )
    assert config.limit_request_line == MAX_REQUEST_LINE
    assert config.limit_request_fields == MAX_HEADERS
    assert config.limit_request_field_size == DEFAULT_FIELD_SIZE


def test_limits_above_gunicorns_maximum_are_capped_like_gunicorn() -> None:
    config = http_config(gunicorn_cfg(limit_request_line=20000, limit_request_fields=50000))
    assert (config.limit_request_line, config.limit_request_fields) == (8190, 32768)


def test_settings_are_carried_over() -> None:
    config = http_config(
        gunicorn_cfg(
            limit_request_line=100,
            limit_request_fields=7,
            limit_request_field_size=300,
            keepalive=9,
            forwarded_allow_ips="10.0.0.0/8,127.0.0.1",
            secure_scheme_headers={"X-SCHEME": "https"},
            forwarder_headers="SCRIPT_NAME",
            header_map="refuse",
            sendfile=False,
            workers=3,
        ),
        multithread=True,
    )
    assert (config.limit_request_line, config.limit_request_fields) == (100, 7)
    assert config.limit_request_field_size == 300
    assert config.keepalive_timeout == 9.0
    assert config.forwarded_allow_ips == ("10.0.0.0/8", "127.0.0.1")
    assert dict(config.secure_scheme_headers) == {"X-SCHEME": "https"}
    assert config.forwarder_headers == ("SCRIPT_NAME",)
    assert config.header_map == "refuse"
    assert not config.sendfile and not config.is_ssl
    assert config.multithread and config.multiprocess


def test_tls_settings_make_the_scheme_https(tmp_path: Any) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("")
    cfg = gunicorn_cfg(certfile=str(tmp_path / "cert.pem"), keyfile=str(tmp_path / "key.pem"))
    assert http_config(cfg).is_ssl


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("proxy_protocol", "v1"),
        ("protocol", "uwsgi"),
        ("strip_header_spaces", True),
        ("permit_unconventional_http_method", True),
        ("permit_unconventional_http_version", True),
        ("header_map", "dangerous"),
        ("http_parser", "fast"),
    ],
)
def test_what_the_engine_cannot_honour_is_refused(name: str, value: Any) -> None:
    with pytest.raises(UsageError, match=f"{name}=.*--http-engine gunicorn"):
        http_config(gunicorn_cfg(**{name: value}))


def test_a_bad_proxy_address_is_a_usage_error() -> None:
    cfg = gunicorn_cfg()
    cfg.settings["forwarded_allow_ips"].value = ["not an address"]
    with pytest.raises(UsageError, match="forwarded_allow_ips"):
        http_config(cfg)


# --- the hooks, on a real connection ----------------------------------------------------


class FakeLog:
    def __init__(self) -> None:
        self.access_calls: list[tuple[Any, Any, dict[str, Any], Any]] = []
        self.lines: list[str] = []
        self.access_log_enabled = True
        self.error_log = None

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        self.access_calls.append((resp, req, environ, request_time))

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)

    def exception(self, message: str, *args: Any) -> None:
        self.lines.append("exception: " + message % args)


class FakeWorker(EngineWorker):
    def __init__(self, cfg: Config, max_requests: int = 1000, access_log: bool = True) -> None:
        self.cfg = cfg
        self.log = FakeLog()
        self.log.access_log_enabled = access_log
        self.alive = True
        self.nr = 0
        self.max_requests = max_requests
        self.wsgi = self.app
        self.setup_engine()

    @staticmethod
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Answer", "42")])
        return [b"hello"]


def serve(worker: FakeWorker, data: bytes) -> bytes:
    client, server = socket.socketpair()
    client.settimeout(5)

    def run() -> None:
        try:
            serve_connection(
                server,
                ("10.1.2.3", 5555),
                ("127.0.0.1", 80),
                worker.wsgi,
                worker.http_config,
                worker.http_hooks,
            )
        finally:
            server.close()

    thread = threading.Thread(target=run)
    thread.start()
    with client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    thread.join(5)
    return received


def test_each_request_counts_and_is_access_logged_with_gunicorns_objects() -> None:
    worker = FakeWorker(gunicorn_cfg())
    raw = serve(worker, b"GET /a?b=1 HTTP/1.1\r\nX-Hook: yes\r\n\r\nGET /c HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert worker.nr == 2
    resp, req, environ, request_time = worker.log.access_calls[0]
    assert (resp.status, resp.status_code, resp.sent) == ("200 OK", 200, 5)
    assert ("X-Answer", "42") in resp.headers
    assert ("X-HOOK", "yes") in req  # the request headers, as gunicorn's atoms read them
    assert environ["PATH_INFO"] == "/a" and environ["QUERY_STRING"] == "b=1"
    assert isinstance(request_time, datetime.timedelta)
    assert environ["wsgi.errors"] is worker._wsgi_errors


def test_a_request_that_needs_no_hook_runs_none() -> None:
    """Without --max-requests, pre_request, post_request, an access log or a request
    timeout, nothing in Python runs around a request; wsgi.errors still writes to the
    error log."""
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.errors"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    worker = FakeWorker(gunicorn_cfg(), max_requests=sys.maxsize, access_log=False)
    assert (worker.http_hooks.before, worker.http_hooks.after) == (None, None)
    worker.wsgi = app
    assert serve(worker, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
    assert seen == [worker._wsgi_errors]
    logged = FakeWorker(gunicorn_cfg(), max_requests=sys.maxsize)
    assert logged.http_hooks.before is None and logged.http_hooks.after is not None
    counted = FakeWorker(gunicorn_cfg(), max_requests=10, access_log=False)
    assert counted.http_hooks.before is not None and counted.http_hooks.after is None


def test_max_requests_stops_the_worker_and_closes_after_that_response() -> None:
    worker = FakeWorker(gunicorn_cfg(), max_requests=2)
    raw = serve(worker, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.count(b"Connection: close") == 1
    assert not worker.alive and worker.nr == 2
    assert "Autorestarting worker after current request." in worker.log.lines


def test_pre_and_post_request_hooks_see_one_request_object(tmp_path: Any) -> None:
    seen: list[Any] = []

    def pre_request(worker: Any, req: Any) -> None:
        req.mark = "set in pre_request"
        seen.append((req.method, req.path, req.query, req.uri, req.version, req.headers))

    def post_request(worker: Any, req: Any, environ: dict[str, Any], resp: Any) -> None:
        seen.append((req.mark, resp.status, environ["PATH_INFO"]))

    worker = FakeWorker(gunicorn_cfg(pre_request=pre_request, post_request=post_request))
    serve(worker, b"POST /p?q=2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
    assert seen == [
        ("POST", "/p", "q=2", "/p?q=2", (1, 1), [("CONTENT-LENGTH", "2")]),
        ("set in pre_request", "200 OK", "/p"),
    ]


def test_keepalive_0_closes_after_each_response() -> None:
    worker = FakeWorker(gunicorn_cfg(keepalive=0))
    raw = serve(worker, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 1 and b"Connection: close" in raw


def test_the_gevent_engine_worker_lets_other_greenlets_run_after_each_response() -> None:
    import gevent
    import gevent.socket

    from microsvc.http import HTTPConfig
    from microsvc.workers.gevent import EngineGeventWorker, GeventIO

    assert not hasattr(EngineGeventWorker, "after_response")  # the engine's channel yields
    green = GeventIO()
    ran: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ran.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    def serve_two(name: str) -> None:
        # Both requests arrive at once: the second is served after the other
        # connection's first, not at once.
        ours, theirs = gevent.socket.socketpair()
        with ours, theirs:
            ours.sendall(
                f"GET /{name}1 HTTP/1.1\r\n\r\nGET /{name}2 HTTP/1.1\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            serve_connection(
                theirs, ("127.0.0.1", 1), ("127.0.0.1", 2), app, HTTPConfig(), green=green
            )

    gevent.joinall([gevent.spawn(serve_two, "a"), gevent.spawn(serve_two, "b")], raise_error=True)
    assert ran == ["/a1", "/b1", "/a2", "/b2"]


EVENTLET_IDLE_WAIT = """\
import socket
import eventlet, eventlet.hubs
from eventlet.greenio import GreenSocket
from microsvc.workers.eventlet import EventletIO

hub = eventlet.hubs.get_hub()
waits = []
send_when_waiting = []
add = hub.add
def counting_add(*args, **kwargs):
    waits.append(args[0])
    listener = add(*args, **kwargs)
    if send_when_waiting:  # the request comes once the channel waits for it
        hub.schedule_call_global(0, peer.sendall, send_when_waiting.pop())
    return listener
hub.add = counting_add

mine, peer = socket.socketpair()
channel = EventletIO().channel(GreenSocket(mine))
peer.sendall(b"GET /next")  # the next request came while the response was read
channel.idle = True
assert channel.recv(100) == b"GET /next"
print("waits with the request there:", len(waits))
channel.idle = True  # nothing there: it waits until the request comes
send_when_waiting.append(b"GET /later")
assert channel.recv(100) == b"GET /later"
print("waits with the request later:", len(waits))
"""


def test_an_idle_eventlet_channel_yields_and_waits_only_when_nothing_came() -> None:
    """eventlet registers a socket with its hub for each wait and unregisters it after
    (two system calls and the hub's bookkeeping): after a response, a channel yields
    once and reads; it waits only when the next request is not there yet."""
    done = subprocess.run(
        [sys.executable, "-c", EVENTLET_IDLE_WAIT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "waits with the request there: 0",
        "waits with the request later: 1",
    ], done.stdout


# --- QuickSocket: timeouts as a Python socket's, without a poll per call ------------------


def quick_pair() -> tuple[QuickSocket, socket.socket]:
    mine, peer = socket.socketpair()
    quick = QuickSocket(mine.family, mine.type, mine.proto, mine.detach())
    peer.settimeout(5)
    return quick, peer


def test_quick_socket_reads_and_writes_on_a_blocking_descriptor() -> None:
    quick, peer = quick_pair()
    with quick, peer:
        quick.settimeout(5)
        assert quick.gettimeout() == 5.0 and quick.getblocking()
        assert os.get_blocking(quick.fileno())  # no poll(2) before each call
        peer.sendall(b"request")
        assert quick.recv(100) == b"request"
        quick.sendall(b"response" * 10000)  # more than one send may take
        received = b""
        while len(received) < 80000:
            received += peer.recv(65536)
        assert received == b"response" * 10000
        buffer = bytearray(10)
        peer.sendall(b"into")
        assert quick.recv_into(buffer) == 4 and buffer[:4] == b"into"
        peer.shutdown(socket.SHUT_WR)
        assert quick.recv(100) == b""


def test_quick_socket_waits_for_data_that_comes_later() -> None:
    quick, peer = quick_pair()
    with quick, peer:
        quick.settimeout(None)
        later = threading.Timer(0.05, peer.sendall, args=(b"late",))
        later.start()
        assert quick.recv(100) == b"late"
        later.join()


def test_quick_socket_times_out_as_a_python_socket_does() -> None:
    quick, peer = quick_pair()
    with quick, peer:
        quick.settimeout(0.05)
        with pytest.raises(socket.timeout):
            quick.recv(100)
        buffer = bytearray(10)
        with pytest.raises(TimeoutError):
            quick.recv_into(buffer)
        with pytest.raises(TimeoutError):
            quick.sendall(b"x" * 50_000_000)  # the peer reads nothing
        quick.settimeout(0)
        assert not quick.getblocking()
        with pytest.raises(BlockingIOError):
            quick.recv(100)
        with pytest.raises(ValueError):
            quick.settimeout(-1)


def test_accepted_connections_are_quick_blocking_close_on_exec_and_nodelay() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    with listener:
        acceptor = Acceptor(listener)
        assert acceptor.name == listener.getsockname()
        with pytest.raises(BlockingIOError):
            acceptor.accept()
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            conn, addr = acceptor.accept()
            with conn:
                assert isinstance(conn, QuickSocket) and addr == client.getsockname()
                assert os.get_blocking(conn.fileno()) and not conn.get_inheritable()
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert not has_data(conn)
                client.sendall(b"GET / HTTP/1.1\r\n\r\n")
                while not has_data(conn):
                    time.sleep(0.01)
                assert conn.recv(100) == b"GET / HTTP/1.1\r\n\r\n"  # has_data read nothing


def test_lingering_close_closes_once_the_client_has_closed() -> None:
    lingering = LingeringCloses()
    quick, peer = quick_pair()
    quick.sendall(b"response")
    lingering.close(quick)
    assert len(lingering) == 1 and quick.fileno() != -1  # the client has not closed yet
    assert peer.recv(100) == b"response" and peer.recv(100) == b""  # the server's end
    peer.sendall(b"late bytes")  # read and dropped, not answered with a reset
    lingering.reap()
    assert len(lingering) == 1
    peer.close()
    lingering.reap(5)
    assert len(lingering) == 0 and quick.fileno() == -1
    already, peer = quick_pair()
    peer.close()
    lingering.close(already)  # the client closed first: closed at once
    assert len(lingering) == 0 and already.fileno() == -1
    lingering.close_all()


def test_lingering_close_gives_up_after_its_deadline_or_when_stopping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(LingeringCloses, "LINGER", 0.05)
    lingering = LingeringCloses()
    quick, peer = quick_pair()
    lingering.close(quick)
    assert lingering.next_deadline() is not None
    time.sleep(0.1)
    lingering.reap()
    assert len(lingering) == 0 and quick.fileno() == -1
    other, other_peer = quick_pair()
    lingering.close(other)
    lingering.close_all(wait=False)
    assert other.fileno() == -1
    peer.close()
    other_peer.close()


# --- gthread's request threads -------------------------------------------------------------


def test_serving_threads_hand_every_served_connection_back_to_the_main_thread() -> None:
    import select

    from microsvc.workers.gthread import ServingThreads

    def serve(conn: Any) -> bool:
        if conn == "fails":
            raise RuntimeError("the handler raised")
        return bool(conn != "closes")

    threads = ServingThreads(3, serve)
    try:
        for conn in ("a", "b", "closes", "fails", "c"):
            threads.submit(conn)  # type: ignore[arg-type]
        served: dict[Any, bool] = {}
        deadline = time.monotonic() + 5
        while len(served) < 5 and time.monotonic() < deadline:
            readable, _, _ = select.select([threads.fileno()], [], [], 1.0)
            if readable:  # woken: everything served meanwhile is handed back at once
                served.update(threads.drain())
        assert served == {"a": True, "b": True, "closes": False, "fails": False, "c": True}
        assert threads.drain() == []  # nothing twice
    finally:
        threads.shutdown(wait=True)
    assert not any(thread.is_alive() for thread in threads._threads)
