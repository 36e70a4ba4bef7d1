"""The compiled request path behaves as the plain-Python one, on the wire and in the log.

The same misbehaving and edge-case WSGI application runs on two servers (one worker:
gevent, or gthread with two threads): one with the request path as compiled at install
time, one with MICROSVC_PURE_PYTHON=1. Each case is one request, followed on the same
connection by a plain request (whether the connection survives is part of the answer);
the bytes that come back (the Date header aside) and the lines the case adds to the log
(timestamps, pids, addresses and traceback frames aside) must be the same on both.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from microsvc.http import BUILD
from microsvc.http.build import PURE_PYTHON_ENV

if TYPE_CHECKING:
    from harness import Server
    from tests.conftest import ServeFactory

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not BUILD.compiled,
        reason=f"the request path is not compiled here ({BUILD.describe()}): nothing to compare",
    ),
]

APP = """\
import io
import sys


class LyingLength:
    # Says one item, yields two: the engine sends what len() promises, as PEP 3333 allows.
    def __init__(self, items, length):
        self.items = items
        self.length = length

    def __len__(self):
        return self.length

    def __iter__(self):
        return iter(self.items)


class Reader:
    # A file-like object whose read() gives bytearray, as some buffered readers do.
    def __init__(self, data):
        self.data = [bytearray(data)]

    def read(self, size=-1):
        return self.data.pop() if self.data else b""


def status(start_response, status):
    start_response(status, [])
    return [b"x"]


def headers(start_response, headers):
    start_response("200 OK", headers)
    return [b"x"]


def body(start_response, items):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return items


def write_bytearray(start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(bytearray(b"written "))
    write(memoryview(b"view "))
    return [b"end"]


def exc_info_before_send(start_response, as_list=False):
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("replaced")
    except ValueError:
        info = list(sys.exc_info()) if as_list else sys.exc_info()
        start_response("500 Oops", [("Content-Type", "text/plain")], info)
    return [b"oops"]


def exc_info_after_send(start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"partial")
    try:
        raise ValueError("too late")
    except ValueError:
        start_response("500 Oops", [], sys.exc_info())
    return [b"never"]


def twice(start_response):
    start_response("200 OK", [])
    start_response("201 Created", [])
    return [b"x"]


def read_input(environ, start_response, how):
    stream = environ["wsgi.input"]
    if how == "none":
        parts = [stream.read(None)]
    elif how == "minus":
        parts = [stream.read(-1)]
    elif how == "sizes":
        parts = [stream.read(3), stream.read(0), stream.read(100)]
    elif how == "readline":
        parts = [stream.readline(5), stream.readline(), stream.readline(None)]
    elif how == "readlines":
        parts = stream.readlines()
    elif how == "iterate":
        parts = list(stream)
    elif how == "float":
        parts = [stream.read(2.0)]
    elif how == "setattr":
        stream.seen = True
        parts = [b"set"]
    elif how == "stalled":
        # The client sent part of the body and waits: a green thread's timeout ends the
        # read where it waits, inside the engine.
        import gevent

        try:
            with gevent.Timeout(0.2):
                stream.read()
        except gevent.Timeout:
            start_response("408 Request Timeout", [("Connection", "close")])
            return [b"gave up"]
        raise AssertionError("the read ended before the timeout")
    elif how == "hasattr":
        parts = [repr(sorted(n for n in ("close", "read", "readline", "readlines", "__iter__")
                             if hasattr(stream, n))).encode()]
    else:
        raise LookupError(how)
    data = b"|".join(parts)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def file_wrapper(environ, start_response, how):
    wrapper = environ["wsgi.file_wrapper"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    if how == "bytesio":
        return wrapper(io.BytesIO(b"from bytesio " * 3), 4)
    if how == "file":
        return wrapper(open("payload.txt", "rb"))
    if how == "file-length":
        return wrapper(open("payload.txt", "rb"), 5)
    if how == "reader":
        return wrapper(Reader(b"from a reader"))
    if how == "blksize-none":
        return wrapper(io.BytesIO(b"all at once"), None)
    if how == "setattr":
        result = wrapper(io.BytesIO(b"tagged"))
        result.tag = "mine"
        return result
    if how == "subclass":
        class Counting(wrapper):
            pass
        return Counting(io.BytesIO(b"subclassed"))
    if how == "hasattr-close":
        result = wrapper(object())
        return [repr(hasattr(result, "close")).encode()]
    raise LookupError(how)


def app(environ, start_response):
    path = environ["PATH_INFO"]
    _, kind, name = path.split("/", 2) if path.count("/") >= 2 else ("", path[1:], "")
    if kind == "ok":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    if kind == "status":
        return status(start_response, {"bytes": b"200 OK", "int": 200, "none": None}[name])
    if kind == "headers":
        pair = ("Content-Type", "text/plain")
        given = {
            "tuple": (pair,),
            "generator": (h for h in [pair, ("X-A", "1")]),
            "list-pair": [["X-A", "1"]],
            "int-value": [("X-A", 1)],
            "bytes-name": [(b"X-A", "1")],
            "none": None,
            "dict": {"X-A": "1"},
            "three": [("X-A", "1", "2")],
        }[name]
        return headers(start_response, given)
    if kind == "body":
        items = {
            "str": ["text"],
            "bytearray": [bytearray(b"array")],
            "memoryview": [memoryview(b"view")],
            "none": [None],
            "str-later": [b"first ", "second"],
            "mixed": [b"a", bytearray(b"b"), memoryview(b"c")],
            "lying-one": LyingLength([b"one ", b"two"], 1),
            "lying-five": LyingLength([b"one"], 5),
            "lying-str": LyingLength(["one"], 1),
            "generator": (part for part in [b"gen", b"erated"]),
            "empty": [],
        }[name]
        return body(start_response, items)
    if kind == "write":
        return write_bytearray(start_response)
    if kind == "exc-info":
        if name == "before":
            return exc_info_before_send(start_response)
        if name == "list":
            return exc_info_before_send(start_response, as_list=True)
        if name == "after":
            return exc_info_after_send(start_response)
        return twice(start_response)
    if kind == "input":
        return read_input(environ, start_response, name)
    if kind == "file-wrapper":
        return file_wrapper(environ, start_response, name)
    if kind == "none":
        return None
    raise LookupError(path)
"""

#: One request per case: (path, body). Each is followed on the connection by GET /ok.
BODY = b"first line\nsecond line\nthird"
CASES: dict[str, bytes] = {
    **{f"status-{name}": b"" for name in ("bytes", "int", "none")},
    **{
        f"headers-{name}": b""
        for name in (
            "tuple",
            "generator",
            "list-pair",
            "int-value",
            "bytes-name",
            "none",
            "dict",
            "three",
        )
    },
    **{
        f"body-{name}": b""
        for name in (
            "str",
            "bytearray",
            "memoryview",
            "none",
            "str-later",
            "mixed",
            "lying-one",
            "lying-five",
            "lying-str",
            "generator",
            "empty",
        )
    },
    "write-bytearray": b"",
    **{f"exc-info-{name}": b"" for name in ("before", "list", "after", "twice")},
    **{
        f"input-{name}": BODY
        for name in (
            "none",
            "minus",
            "sizes",
            "readline",
            "readlines",
            "iterate",
            "float",
            "setattr",
            "hasattr",
        )
    },
    **{
        f"file-wrapper-{name}": b""
        for name in (
            "bytesio",
            "file",
            "file-length",
            "reader",
            "blksize-none",
            "setattr",
            "subclass",
            "hasattr-close",
        )
    },
    "none-none": b"",
}

_DATE = re.compile(rb"^Date: [^\r]*\r\n", re.MULTILINE)
_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \[\d+\] ")
_VARIABLE = re.compile(
    r"0x[0-9a-f]+|\b\d+\.\d+\b|127\.0\.0\.1:\d+|\bport \d+|\[\d{2}/\w+/\d{4}[^\]]*\]"
)


def _path(case: str) -> str:
    for prefix in ("exc-info", "file-wrapper"):
        if case.startswith(prefix + "-"):
            return f"/{prefix}/{case[len(prefix) + 1 :]}"
    kind, _, name = case.partition("-")
    return f"/{kind}/{name}"


#: Sent alone: 2 bytes of a 100-byte body, and then nothing (gevent only).
STALLED = "input-stalled"


def _request(case: str, body: bytes) -> bytes:
    if case == STALLED:
        return b"POST /input/stalled HTTP/1.1\r\nHost: builds\r\nContent-Length: 100\r\n\r\nab"
    method = b"POST" if body else b"GET"
    head = b"%s %s HTTP/1.1\r\nHost: builds\r\n" % (method, _path(case).encode())
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    follow = b"GET /ok HTTP/1.1\r\nHost: builds\r\nConnection: close\r\n\r\n"
    return head + b"\r\n" + body + follow


def _exchange(port: int, data: bytes) -> bytes:
    """Sends `data` and reads until the server closes (or resets) the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            chunks.append(b"<reset>")
    return _DATE.sub(b"Date: -\r\n", b"".join(chunks))


def _log_lines(text: str) -> list[str]:
    """The log lines of the requests, without what differs from run to run or between
    the builds' tracebacks (frames: compiled code reports its own). The master's start-up
    lines and the access lines of GET /ok (its answer is on the wire) come at times of
    their own: they are left out."""
    kept = []
    in_frames = False
    for line in text.splitlines():
        if "] [INFO] " in line or '"GET /ok HTTP/1.1" 200 ' in line:
            continue
        if line.startswith("Traceback (most recent call last)"):
            in_frames = True
            kept.append(line)
            continue
        if in_frames and (
            line.startswith("  ") or not line.strip() or set(line) <= {"^", "~", " "}
        ):
            continue
        in_frames = False
        kept.append(_VARIABLE.sub("-", _LOG_PREFIX.sub("", line)))
    return kept


def _run_cases(server: Server, worker_class: str) -> dict[str, tuple[bytes, list[str]]]:
    seen: dict[str, tuple[bytes, list[str]]] = {}
    cases = {**CASES, STALLED: b""} if worker_class == "gevent" else CASES
    for case, body in cases.items():
        before = len(server.log_text())
        wire = _exchange(server.port, _request(case, body))
        seen[case] = (wire, _log_lines(server.log_text()[before:]))
    return seen


@pytest.mark.server_tracebacks("the app sends a str body")
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_compiled_and_plain_python_builds_answer_alike(
    serve: ServeFactory, tmp_path: Path, worker_class: str
) -> None:
    (tmp_path / "builds_app.py").write_text(APP)
    (tmp_path / "payload.txt").write_bytes(b"a real file on disk\n" * 3)
    threads = ["--threads", "2"] if worker_class == "gthread" else []
    args = ["builds_app:app", "-k", worker_class, "-w", "1", *threads, "--access-log", "-"]
    results = {}
    for build, env in (("compiled", {}), ("python", {PURE_PYTHON_ENV: "1"})):
        server = serve(args, env=env, ready_path="/ok", name=build)
        expected = "microsvc (compiled)" if build == "compiled" else "microsvc (Python: "
        assert f"HTTP engine: {expected}" in server.log_text(), server.describe()
        results[build] = _run_cases(server, worker_class)

    differences = [
        f"{case}:\n  compiled: {results['compiled'][case]!r}\n  python:   {answer!r}"
        for case, answer in results["python"].items()
        if results["compiled"][case] != answer
    ]
    assert not differences, "\n".join(differences)
    # The cases did reach the application: the plain requests after them were answered.
    assert sum(b"\r\n\r\nok" in wire for wire, _ in results["python"].values()) >= 20
    if worker_class == "gevent":  # the timeout ended the read inside the engine
        assert results["python"][STALLED][0].startswith(b"HTTP/1.1 408 "), results["python"]
