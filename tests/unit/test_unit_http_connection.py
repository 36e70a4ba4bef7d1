"""microsvc.http: one connection served over a real socket pair, request by request."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import httptools
import pytest

from microsvc.http import Hooks, HTTPConfig, RequestRecord, serve_connection
from microsvc.http.body import RequestBody

CLIENT = ("127.0.0.1", 40000)
SERVER = ("127.0.0.1", 8000)

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Trickle:
    """A socket whose reads return a few bytes at a time (1, 2, 3, 5, 8, 13, then again):
    every request is parsed across many reads."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sizes = [1, 2, 3, 5, 8, 13]
        self._next = 0

    def recv(self, size: int) -> bytes:
        self._next = (self._next + 1) % len(self._sizes)
        return self._sock.recv(min(size, self._sizes[self._next]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Connection:
    """A client end of a socket pair whose other end a thread serves with serve_connection."""

    def __init__(
        self,
        app: App,
        config: HTTPConfig | None = None,
        hooks: Hooks | None = None,
        trickle: bool = False,
    ):
        self.sock, server_sock = socket.socketpair()
        self.sock.settimeout(5)
        served: Any = Trickle(server_sock) if trickle else server_sock

        def serve() -> None:
            try:
                serve_connection(
                    served, CLIENT, SERVER, app, config or HTTPConfig(), hooks or Hooks()
                )
            finally:
                server_sock.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_some(self) -> bytes:
        return self.sock.recv(65536)

    def read_all(self) -> bytes:
        """Half-closes, then reads until the server closes."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.sock.close()
        return b"".join(chunks)


def exchange(app: App, data: bytes, config: HTTPConfig | None = None, **kw: Any) -> bytes:
    """Sends `data` (from a thread: the server may answer and close before reading it all),
    half-closes, and returns all the server sent."""
    connection = Connection(app, config, **kw)

    def send() -> None:
        # The server may refuse the request and close before reading it all.
        with contextlib.suppress(OSError):
            connection.send(data)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(5)
    return connection.read_all()


class Parsed:
    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []

    def on_message_begin(self) -> None:
        self.responses.append({"headers": {}, "body": b""})

    def on_header(self, name: bytes, value: bytes) -> None:
        self.responses[-1]["headers"][name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.responses[-1]["body"] += body


def responses(raw: bytes) -> list[dict[str, Any]]:
    """The responses in `raw`, each with status, headers (lower-case names) and body."""
    parsed = Parsed()
    parser = httptools.HttpResponseParser(parsed)
    parser.feed_data(raw)
    statuses = [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]
    for response, status in zip(parsed.responses, statuses, strict=False):
        response["status"] = status
    return parsed.responses


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = environ["wsgi.input"].read()
    reply = b"%s %s %s|%s" % (
        environ["REQUEST_METHOD"].encode(),
        environ["PATH_INFO"].encode(),
        environ["QUERY_STRING"].encode(),
        body,
    )
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [reply]


def hello_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def no_error_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- keep-alive, pipelining, HTTP/1.0 ---------------------------------------------------


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    raw = exchange(
        echo_app,
        b"GET /one?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    got = responses(raw)
    assert [r["body"] for r in got] == [b"GET /one a=1|", b"POST /two |abc", b"GET /three |"]
    assert all("connection" not in r["headers"] for r in got)


def test_connection_close_ends_the_connection_after_its_response() -> None:
    raw = exchange(
        echo_app,
        b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
    )
    got = responses(raw)
    assert [r["body"] for r in got] == [b"GET /a |"]
    assert got[0]["headers"]["connection"] == "close"


def test_http10_keeps_the_connection_only_when_asked() -> None:
    got = responses(exchange(echo_app, b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n"))
    assert [r["body"] for r in got] == [b"GET /a |"]
    raw = exchange(
        hello_app,
        b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
    )
    got = responses(raw)
    assert len(got) == 2
    assert got[0]["headers"]["connection"] == "keep-alive"
    assert got[1]["headers"]["connection"] == "close"


def test_http10_response_without_length_is_delimited_by_close() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"ab"
        yield b"cd"

    raw = exchange(app, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert body == b"abcd"


def test_http10_connection_close_from_the_app_holds_when_the_engine_adds_a_length() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Connection", "close")])
        return [b"hello"]

    raw = exchange(app, b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 ") == 1
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"Content-Length: 5" in head and b"Connection: close" in head


def test_date_and_server_headers_are_sent() -> None:
    got = responses(
        exchange(hello_app, b"GET / HTTP/1.1\r\n\r\n", HTTPConfig(server_software="x/1"))
    )
    assert got[0]["headers"]["server"] == "x/1"
    assert got[0]["headers"]["date"].endswith(" GMT")


# --- request bodies -------------------------------------------------------------------------


def test_chunked_request_body_is_streamed_to_wsgi_input() -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        seen.append(stream.read(3))
        seen.append(stream.readline())
        seen.append(list(stream))
        seen.append(stream.read())
        seen.append(environ.get("CONTENT_LENGTH"))
        seen.append(environ["wsgi.input_terminated"])
        start_response("204 No Content", [])
        return []

    raw = exchange(
        app,
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nline\r\n5\r\n one\n\r\n7;ext=1\r\nline tw\r\n3\r\no\nx\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 204 ")
    assert seen == [b"lin", b"e one\n", [b"line two\n", b"x"], b"", None, True]


def test_content_length_body_read_in_every_pep3333_way() -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        seen.append(stream.readline(2))
        seen.append(stream.readlines())
        seen.append(stream.read(10))
        start_response("200 OK", [])
        return []

    exchange(app, b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab\ncd\nef\ng")
    assert seen == [b"ab", [b"\n", b"cd\n", b"ef\n", b"g"], b""]


def test_a_large_body_is_not_buffered_before_the_app_reads_it() -> None:
    sizes: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body: RequestBody = environ["wsgi.input"]
        total = 0
        while chunk := body.read(65536):
            total += len(chunk)
            sizes.append(body.consumed - total)  # bytes received but not yet read
        start_response("200 OK", [])
        return [str(total).encode()]

    size = 8 * 1024 * 1024
    got = responses(
        exchange(app, b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
    )
    assert got[0]["body"] == str(size).encode()
    assert max(sizes) <= 65536


def test_an_unread_body_is_drained_before_the_next_request() -> None:
    raw = exchange(
        hello_app,
        b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nxxxxxGET /b HTTP/1.1\r\n\r\n",
    )
    assert len(responses(raw)) == 2


def test_an_unread_body_over_the_drain_limit_closes_the_connection() -> None:
    raw = exchange(
        hello_app,
        b"POST /a HTTP/1.1\r\nContent-Length: 300000\r\n\r\n"
        + b"x" * 300000
        + b"GET /b HTTP/1.1\r\n\r\n",
        HTTPConfig(drain_limit=10),
    )
    assert len(responses(raw)) == 1


def test_expect_continue_is_answered_only_when_the_app_reads_the_body() -> None:
    connection = Connection(echo_app)
    connection.send(b"POST /r HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert connection.recv_some() == b"HTTP/1.1 100 Continue\r\n\r\n"
    connection.send(b"abc")
    got = responses(connection.read_all())
    assert got[0]["body"] == b"POST /r |abc"

    connection = Connection(hello_app)
    connection.send(b"POST /r HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    first = connection.recv_some()
    assert first.startswith(b"HTTP/1.1 200 ")
    # The body was never asked for: the connection closes instead of waiting for it.
    assert b"Connection: close" in first
    connection.read_all()


def test_an_expectation_other_than_100_continue_is_417() -> None:
    raw = exchange(hello_app, b"GET / HTTP/1.1\r\nExpect: teapot\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 417 ")


def test_a_malformed_chunk_met_while_the_app_reads_is_400_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "microsvc.http")
    raw = exchange(
        echo_app,
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert no_error_logged(caplog)
    assert len(caplog.records) == 1


def test_a_truncated_body_is_400(caplog: pytest.LogCaptureFixture) -> None:
    raw = exchange(echo_app, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert no_error_logged(caplog)


def test_a_malformed_body_after_the_response_started_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"first"
        yield environ["wsgi.input"].read()

    raw = exchange(app, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nq\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert not raw.endswith(b"0\r\n\r\n")
    assert no_error_logged(caplog)


# --- responses ------------------------------------------------------------------------------


def test_a_response_without_length_is_chunked_on_http11() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"ab"
        yield b""
        yield b"cde"

    raw = exchange(app, b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert raw.count(b"Transfer-Encoding: chunked") == 2
    assert raw.count(b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n") == 2
    assert [r["body"] for r in responses(raw)] == [b"abcde", b"abcde"]


def test_head_gets_the_headers_without_the_body() -> None:
    raw = exchange(hello_app, b"HEAD / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 ") == 2
    assert b"hello" not in raw
    assert raw.count(b"Content-Length: 5") == 2


def test_the_write_callable_sends_before_the_iterable() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        write = start_response("200 OK", [("Content-Length", "6")])
        write(b"abc")
        return [b"def"]

    assert responses(exchange(app, b"GET / HTTP/1.1\r\n\r\n"))[0]["body"] == b"abcdef"


def test_exc_info_before_the_headers_are_sent_replaces_the_response() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("X-First", "1")])
        try:
            raise ValueError("boom")
        except ValueError:
            start_response("503 Unavailable", [("Content-Length", "2")], sys.exc_info())
        return [b"no"]

    got = responses(exchange(app, b"GET / HTTP/1.1\r\n\r\n"))
    assert got[0]["status"] == 503
    assert "x-first" not in got[0]["headers"]


def test_exc_info_after_the_headers_are_sent_reraises_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caught: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        try:
            raise ValueError("late")
        except ValueError:
            try:
                start_response("500 Oops", [], sys.exc_info())
            except ValueError as exc:
                caught.append(exc)
                raise

    raw = exchange(app, b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 1
    assert not raw.endswith(b"0\r\n\r\n")
    assert len(caught) == 1
    assert len([r for r in caplog.records if r.exc_info]) == 1


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        ("200 OK", [("X-Bad", "a\r\nSet-Cookie: injected=1")]),
        ("200 OK", [("X-Bad", "a\nb")]),
        ("200 OK", [("X-Bad", "a\x00b")]),
        ("200 OK", [("Bad Name", "v")]),
        ("200 OK", [("Bad:Name", "v")]),
        ("200 OK\r\nX-Injected: 1", []),
        ("20 OK", []),
        ("200OK", []),
    ],
)
def test_an_invalid_status_or_header_from_the_app_is_500_logged_once(
    status: str, headers: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(status, headers)
        return [b"body"]

    raw = exchange(app, b"GET / HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500 ")
    assert b"injected" not in raw.lower()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_an_app_that_raises_before_the_response_gets_500(caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise RuntimeError("broken")

    raw = exchange(app, b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500 ")
    assert raw.count(b"HTTP/1.1 ") == 1
    assert "GET /x HTTP/1.1" in caplog.text


@pytest.mark.parametrize("result", [["text"], [b"a", "text"]])
def test_an_app_that_yields_str_gets_500_or_a_closed_connection(
    result: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[Any]:
        start_response("200 OK", [])
        return result

    raw = exchange(app, b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 1
    if len(result) == 1:
        assert raw.startswith(b"HTTP/1.1 500 ")
    else:
        assert not raw.endswith(b"0\r\n\r\n")
    assert "not bytes" in caplog.text


def test_an_oserror_of_the_app_is_its_error_not_a_lost_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise FileNotFoundError("/missing")

    assert exchange(app, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500 ")
    assert "/missing" in caplog.text


def test_a_client_gone_mid_response_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    sent = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"x" * 65536
        sent.wait(5)
        for _ in range(100):
            yield b"y" * 65536

    connection = Connection(app)
    connection.send(b"GET / HTTP/1.1\r\n\r\n")
    connection.recv_some()
    connection.sock.close()
    sent.set()
    connection.thread.join(5)
    assert not connection.thread.is_alive()
    assert caplog.records == []


def test_file_wrapper_sends_a_real_file_with_sendfile(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789" * 1000)
    calls: list[int] = []
    original = socket.socket.sendfile

    def spy(self: socket.socket, file: Any, offset: int = 0, count: int | None = None) -> int:
        calls.append(count or 0)
        return original(self, file, offset, count)

    monkeypatch.setattr(socket.socket, "sendfile", spy)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the server through the wrapper
        handle.seek(10)
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](handle)

    got = responses(exchange(app, b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"))
    assert [r["body"] for r in got] == [path.read_bytes()[10:]] * 2
    assert got[0]["headers"]["content-length"] == "9990"
    assert calls == [9990, 9990]


def test_file_wrapper_of_a_file_like_object_is_iterated() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"x" * 20000), 4096)

    assert responses(exchange(app, b"GET / HTTP/1.1\r\n\r\n"))[0]["body"] == b"x" * 20000


def test_hooks_see_each_request_and_its_numbers() -> None:
    before: list[str] = []
    after: list[RequestRecord] = []
    hooks = Hooks(
        before=lambda environ, message: before.append(environ["PATH_INFO"]),
        after=lambda environ, record: after.append(record),
    )
    exchange(hello_app, b"GET /a?q=1 HTTP/1.1\r\n\r\nHEAD /b HTTP/1.0\r\n\r\n", hooks=hooks)
    assert before == ["/a", "/b"]
    assert [(r.request_line, r.status, r.status_code, r.response_bytes) for r in after] == [
        ("GET /a?q=1 HTTP/1.1", "200 OK", 200, 5),
        ("HEAD /b HTTP/1.0", "200 OK", 200, 0),
    ]
    assert all(r.duration >= 0 and r.client == CLIENT for r in after)


def test_keep_serving_false_closes_after_the_current_response() -> None:
    answers = iter([True, False])
    raw = exchange(
        hello_app,
        b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
        hooks=Hooks(keep_serving=lambda: next(answers)),
    )
    assert raw.count(b"HTTP/1.1 200 ") == 2
    assert raw.count(b"Connection: close") == 1
    assert raw.index(b"Connection: close") > raw.index(b"hello")  # in the second response


# --- environ and trust ----------------------------------------------------------------------


def environ_of(data: bytes, config: HTTPConfig | None = None) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(dict(environ))
        start_response("200 OK", [])
        return []

    exchange(app, data, config)
    return seen[0]


def test_environ_has_the_pep3333_keys() -> None:
    environ = environ_of(
        b"GET /a%20b/c?x=1&y=%20 HTTP/1.1\r\nHost: h:1\r\nX-A: 1\r\nX-A: 2\r\n"
        b"Content-Type: text/x\r\n\r\n"
    )
    assert environ["PATH_INFO"] == "/a b/c"
    assert environ["QUERY_STRING"] == "x=1&y=%20"
    assert environ["RAW_URI"] == "/a%20b/c?x=1&y=%20"
    assert environ["HTTP_X_A"] == "1,2"
    assert environ["CONTENT_TYPE"] == "text/x"
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("127.0.0.1", "40000")
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", "8000")
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_scheme_headers_count_only_from_trusted_peers() -> None:
    request = b"GET / HTTP/1.1\r\nX-Forwarded-Proto: https\r\n\r\n"
    assert environ_of(request)["wsgi.url_scheme"] == "https"  # CLIENT is 127.0.0.1
    untrusted = HTTPConfig(forwarded_allow_ips=("10.0.0.0/8",))
    assert environ_of(request, untrusted)["wsgi.url_scheme"] == "http"
    assert environ_of(b"GET / HTTP/1.1\r\n\r\n", HTTPConfig(is_ssl=True))["wsgi.url_scheme"] == (
        "https"
    )
    raw = exchange(
        hello_app,
        b"GET / HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400 ")


def test_peer_trust_is_decided_once_per_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection's peer is checked against forwarded_allow_ips once per address, not
    parsed again for every connection; the memory of addresses stays bounded."""
    import ipaddress

    from microsvc.http import config as http_config

    config = HTTPConfig(forwarded_allow_ips=("10.0.0.0/8", "::1"))
    parsed: list[object] = []
    real = ipaddress.ip_address

    def counting(text: Any) -> Any:
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(ipaddress, "ip_address", counting)
    for port in (1000, 1001, 1002):
        assert config.peer_is_trusted(("10.1.2.3", port))
        assert not config.peer_is_trusted(("203.0.113.9", port))
        assert config.peer_is_trusted(("::1", port, 0, 0))
        assert not config.peer_is_trusted(("not an address", port))
    assert parsed == ["10.1.2.3", "203.0.113.9", "::1", "not an address"]
    assert config.peer_is_trusted("/run/app.sock")  # a Unix socket peer
    monkeypatch.setattr(http_config, "TRUST_CACHE_SIZE", 3)
    for last in range(10):
        assert config.peer_is_trusted((f"10.0.0.{last}", 1))
        assert not config.peer_is_trusted((f"192.0.2.{last}", 1))
    assert len(config._trust_by_address) <= 3


def test_script_name_header_counts_only_from_a_trusted_peer() -> None:
    request = b"GET /app/x HTTP/1.1\r\nSCRIPT_NAME: /app\r\n\r\n"
    environ = environ_of(request)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/app", "/x")
    environ = environ_of(request, HTTPConfig(forwarded_allow_ips=("10.0.0.1",)))
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("", "/app/x")
    assert "HTTP_SCRIPT_NAME" not in environ


# --- refused requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"GET / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
        (b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 20 + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX(A): x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/0.9\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\n\r\n", 400),
        (b"GET a.example:80 HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x7f HTTP/1.1\r\n\r\n", 400),
        (b"get / HTTP/1.1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nHost: evil\r\n\r\n", 400),
    ],
)
def test_malformed_and_smuggling_requests_are_refused(
    request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    raw = exchange(echo_app, request_bytes + b"GET /next HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 %d " % status)
    assert raw.count(b"HTTP/1.1 ") == 1
    assert b"Connection: close" in raw
    assert no_error_logged(caplog)


def test_a_header_name_with_underscore_is_dropped_or_refused() -> None:
    request = b"GET / HTTP/1.1\r\nX_Forwarded_For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n"
    assert environ_of(request)["HTTP_X_FORWARDED_FOR"] == "5.6.7.8"
    raw = exchange(hello_app, request, HTTPConfig(header_map="refuse"))
    assert raw.startswith(b"HTTP/1.1 400 ")


def test_limits_refuse_long_targets_and_large_or_many_headers() -> None:
    config = HTTPConfig(limit_request_line=50, limit_request_fields=3, limit_request_field_size=40)
    assert exchange(hello_app, b"GET /" + b"a" * 60 + b" HTTP/1.1\r\n\r\n", config).startswith(
        b"HTTP/1.1 414 "
    )
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(4))
    assert exchange(hello_app, b"GET / HTTP/1.1\r\n" + many + b"\r\n", config).startswith(
        b"HTTP/1.1 431 "
    )
    large = b"X-Large: " + b"v" * 40 + b"\r\n"
    assert exchange(hello_app, b"GET / HTTP/1.1\r\n" + large + b"\r\n", config).startswith(
        b"HTTP/1.1 431 "
    )
    fine = b"GET /" + b"a" * 40 + b" HTTP/1.1\r\nX-1: 1\r\nX-2: 2\r\nX-3: 3\r\n\r\n"
    assert exchange(hello_app, fine, config).startswith(b"HTTP/1.1 200 ")


def test_an_idle_connection_closes_after_the_keepalive_timeout() -> None:
    connection = Connection(hello_app, HTTPConfig(keepalive_timeout=0.2))
    connection.send(b"GET / HTTP/1.1\r\n\r\n")
    data = b""
    while chunk := connection.sock.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    connection.thread.join(5)
    assert not connection.thread.is_alive()
    connection.sock.close()


def test_the_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="limit_request_line"):
        HTTPConfig(limit_request_line=0)
    with pytest.raises(ValueError, match="forwarded_allow_ips"):
        HTTPConfig(forwarded_allow_ips=("not an ip",))


def test_the_engine_uses_no_file_descriptors_it_does_not_close() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        exchange(hello_app, b"GET / HTTP/1.1\r\n\r\n")
    assert len(os.listdir("/proc/self/fd")) <= before + 2


GREEN_SCRIPT = r"""
import sys
if sys.argv[1] == "gevent":
    from gevent import monkey
    monkey.patch_all()
    from gevent import spawn
    def result(green): return green.get()
else:
    import warnings
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    import eventlet
    eventlet.monkey_patch()
    from eventlet import spawn
    def result(green): return green.wait()
import socket
from microsvc.http import HTTPConfig, serve_connection

CONFIG = HTTPConfig(keepalive_timeout=0.2)

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]

def serve(sock):
    serve_connection(sock, ("127.0.0.1", 1), ("127.0.0.1", 2), app, CONFIG)
    sock.close()

def client(request):
    ours, theirs = socket.socketpair()
    server = spawn(serve, theirs)
    ours.sendall(request)  # no half-close: the keep-alive timeout ends the connection
    data = b""
    while chunk := ours.recv(65536):
        data += chunk
    result(server)
    return data

pipelined = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n"
chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
first, second = spawn(client, pipelined), spawn(client, chunked)
for data in (result(first), result(second)):
    print(data.count(b"HTTP/1.1 200 "), data.split(b"\r\n\r\n")[1][:5].decode())
"""


@pytest.mark.parametrize("library", ["gevent", "eventlet"])
def test_serves_green_threads_under_monkey_patching(library: str) -> None:
    """Two connections served at once in green threads, each closed by the keep-alive
    timeout (in a child process: monkey-patching this one would change every test)."""
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", GREEN_SCRIPT, library],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "hello", "1", "hi"]


# --- the request line: exactly one space between its parts, as gunicorn requires --------


@pytest.mark.parametrize(
    "line",
    [
        b"GET  /data HTTP/1.1",
        b"GET /data  HTTP/1.1",
        b"GET   /data   HTTP/1.1",
    ],
)
@pytest.mark.parametrize("trickle", [False, True])
def test_repeated_spaces_in_the_request_line_are_refused(line: bytes, trickle: bool) -> None:
    raw = exchange(hello_app, line + b"\r\nHost: x\r\n\r\n", trickle=trickle)
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b"hello" not in raw


def test_a_pipelined_request_with_repeated_spaces_is_refused_after_the_good_ones() -> None:
    raw = exchange(
        echo_app,
        b"POST /a HTTP/1.1\r\nContent-Length: 19\r\n\r\nGET /x HTTP/1.1\r\n\r\n"
        b"GET /b HTTP/1.1\r\n\r\nGET  /c HTTP/1.1\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert raw.count(b"HTTP/1.1 400 Bad Request\r\n") == 1
    assert [r["body"] for r in responses(raw)][:2] == [
        b"POST /a |GET /x HTTP/1.1\r\n\r\n",
        b"GET /b |",
    ]


# --- serving in turns (a poller holds the idle connection) ------------------------------


def test_serve_hands_back_an_idle_connection_and_resumes() -> None:
    from microsvc.http import HTTPConnection

    client, server_sock = socket.socketpair()
    with client, server_sock:
        client.settimeout(5)
        connection = HTTPConnection(server_sock, CLIENT, SERVER, echo_app, HTTPConfig())
        client.sendall(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
        assert connection.serve(hand_back=True) is True  # both served, nothing buffered
        first = client.recv(65536)
        while first.count(b"HTTP/1.1 200") < 2:
            first += client.recv(65536)
        client.sendall(b"GET /3 HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert connection.serve(hand_back=True) is False  # Connection: close
        assert [r["body"] for r in responses(first + client.recv(65536))] == [
            b"GET /1 |",
            b"GET /2 |",
            b"GET /3 |",
        ]


class _Wrapped:
    """A middleware's wrapper of the app's list: iterable, with len() and close()."""

    def __init__(self, body: list[bytes]) -> None:
        self.body = body
        self.closed = False

    def __iter__(self) -> Any:
        return iter(self.body)

    def __len__(self) -> int:
        return len(self.body)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("body", "framing"), [([b"hello"], "content-length"), ([b"he", b"llo"], "transfer-encoding")]
)
def test_an_iterable_of_len_1_gets_a_content_length(body: list[bytes], framing: str) -> None:
    wrapped: list[_Wrapped] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> _Wrapped:
        start_response("200 OK", [])
        wrapped.append(_Wrapped(body))
        return wrapped[0]

    (got,) = responses(exchange(app, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"))
    assert got["body"] == b"hello" and framing in got["headers"]
    assert wrapped[0].closed


# --- green threads on the worker's channels (no timer per wait, see microsvc.http.green) --

CHANNEL_SCRIPT = r"""
import sys, time
if sys.argv[1] == "gevent":
    import gevent, gevent.socket
    from microsvc.workers.gevent import GeventIO as IO
    socketpair, spawn, sleep = gevent.socket.socketpair, gevent.spawn, gevent.sleep
    def result(green): return green.get()
else:
    import warnings
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    import eventlet, eventlet.green.socket
    from microsvc.workers.eventlet import EventletIO as IO
    socketpair, spawn, sleep = eventlet.green.socket.socketpair, eventlet.spawn, eventlet.sleep
    def result(green): return green.wait()
from microsvc.http import HTTPConfig, serve_connection

GREEN = IO()
CONFIG = HTTPConfig(keepalive_timeout=0.3, header_timeout=0.5, read_timeout=0.3)
BIG = b"x" * (8 * 1024 * 1024)

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Length", str(len(BIG)))])
        return [BIG]
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]

def serve(sock):
    serve_connection(sock, ("127.0.0.1", 1), ("127.0.0.1", 2), app, CONFIG, green=GREEN)
    sock.close()

def client(request, pause=0.0, close=False):
    ours, theirs = socketpair()
    assert GREEN.channel(theirs) is not None
    server = spawn(serve, theirs)
    ours.sendall(request)
    if pause:
        sleep(pause)  # a client that stops reading: the response waits for it
    if close:
        ours.close()
        return result(server)
    data = b""
    started = time.monotonic()
    while chunk := ours.recv(65536):
        data += chunk
    result(server)
    return data, time.monotonic() - started

pipelined = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n"
chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
stalled_body = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nhel"
stalled_head = b"GET / HTTP/1.1\r\nHost: x\r\n"
big = b"GET /big HTTP/1.1\r\n\r\n"
calls = [spawn(client, r) for r in (pipelined, chunked, stalled_body, stalled_head)]
calls.append(spawn(client, big, pause=0.5))
for data, took in map(result, calls):
    answers = data.count(b"HTTP/1.1 200 "), data.count(b"HTTP/1.1 400 ")
    print(*answers, len(data) > len(BIG), round(took, 1))
result(spawn(client, b"GET / HTTP/1.1\r\n", close=True))  # a client that goes away
print(len(GREEN._waiting))
"""


@pytest.mark.parametrize("library", ["gevent", "eventlet"])
def test_green_channels_serve_and_time_out_without_a_timer_per_wait(library: str) -> None:
    """A worker's channels (gevent's, eventlet's) serve pipelined and chunked requests,
    a response larger than the socket buffers to a client that reads late, and end an
    idle connection (keep-alive timeout), a stalled body (read timeout, 400) and a
    stalled head (header timeout) through the sweeper."""
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", CHANNEL_SCRIPT, library],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    pipelined, chunked, stalled_body, stalled_head, big, waiting = lines
    # Each idle connection ends 0.3 s (the keep-alive timeout, and one sweep) after its
    # last response; the stalled ones after their timeouts. Not before them; after them,
    # within a bound loose enough for a busy machine (without the sweeper they would
    # never end).
    assert pipelined[:3] == ["2", "0", "False"] and 0.2 <= float(pipelined[3]) <= 5.0
    assert chunked[:3] == ["1", "0", "False"] and 0.2 <= float(chunked[3]) <= 5.0
    assert stalled_body[:3] == ["0", "1", "False"] and 0.2 <= float(stalled_body[3]) <= 5.0
    assert stalled_head[:3] == ["0", "0", "False"] and 0.4 <= float(stalled_head[3]) <= 5.0
    assert big[:3] == ["1", "0", "True"]
    assert waiting == ["0"]
