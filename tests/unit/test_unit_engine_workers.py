"""microsvc.workers.engine: gunicorn's settings turned into the engine's, and the hooks a
worker runs around each request (max_requests, access log, pre_request and
post_request), on a real connection served by `serve_connection`."""

from __future__ import annotations

import datetime
import socket
import threading
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
    def __init__(self, cfg: Config, max_requests: int = 1000) -> None:
        self.cfg = cfg
        self.log = FakeLog()
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

    from microsvc.http import RequestRecord
    from microsvc.workers.gevent import EngineGeventWorker

    worker = EngineGeventWorker.__new__(EngineGeventWorker)
    worker._log_access = False
    worker._post_request = None
    record = RequestRecord("GET / HTTP/1.1", "GET", "/", "200 OK", 200, 2, 0.001, None)
    ran: list[str] = []

    def serve_two() -> None:
        for _ in range(2):
            ran.append("request")
            worker._after_request({}, record)

    gevent.joinall([gevent.spawn(serve_two), gevent.spawn(ran.append, "other connection")])
    assert ran == ["request", "other connection", "request"]
