"""Request deadlines: the registry of in-flight requests on a fake clock, the answer to
a client (over a socket pair), the tracking of the response's start, the record with the
stack of a real thread, the retirement of a thread worker, and the log of a worker that
gunicorn aborts (--timeout).

A fake worker stands in for gunicorn's: the mixin reads only `log`, `cfg`, `app`,
`alive`, `pid` (and `nr_conns` for gthread)."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from microsvc.config.options import Settings
from microsvc.observe.jsonlog import JsonFormatter
from microsvc.workers.deadlines import (
    MIN_WAIT,
    UNAVAILABLE,
    GreenDeadlines,
    InFlight,
    InFlightRequests,
    RequestDeadlineExceeded,
    RequestDeadlines,
    ThreadDeadlines,
    emit,
    find_request,
    format_stack,
    request_id_of,
    tracking_app,
)


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class Capture(logging.Handler):
    """Keeps the records and their JSON lines."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.lines: list[dict[str, Any]] = []
        self.formatter_json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(json.loads(self.formatter_json.format(record)))


@pytest.fixture
def error_log() -> Iterator[tuple[SimpleNamespace, Capture]]:
    """gunicorn's logger object as the mixin sees it: `error_log` and the methods."""
    logger = logging.getLogger("test.deadlines.error")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    capture = Capture()
    logger.addHandler(capture)
    log = SimpleNamespace(
        error_log=logger,
        info=logger.info,
        warning=logger.warning,
        error=logger.error,
        exception=logger.exception,
        log=logger.log,
    )
    yield log, capture
    logger.removeHandler(capture)


# --- the registry -------------------------------------------------------------------


def test_a_request_is_overdue_once_at_its_deadline_and_the_wait_follows_the_earliest() -> None:
    clock = Clock()
    requests = InFlightRequests(2.0, clock)
    assert requests.next_check(clock()) == 2.0  # nothing runs: a new request is due later
    first = requests.start(1, "owner-1", "GET", "/slow", "abc", None)
    clock.now += 0.5
    requests.start(2, "owner-2", "GET", "/fast", None, None)
    assert requests.overdue(clock()) == []
    assert requests.next_check(clock()) == pytest.approx(1.5)

    clock.now = first.since + 2.0
    assert requests.overdue(clock()) == [first]
    assert first.expired
    assert requests.overdue(clock() + 0.1) == []  # reported once
    assert requests.next_check(clock()) == pytest.approx(0.5)  # the second one's deadline
    assert requests.counts() == (1, 1)

    assert requests.end(2) is not None
    assert requests.end(2) is None
    assert requests.counts() == (0, 1)
    assert requests.next_check(clock()) == 2.0
    clock.now += 100
    requests.start(3, "owner-3", "GET", "/", None, None)
    clock.now += 5
    assert requests.next_check(clock()) == MIN_WAIT  # already due: never a busy loop


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_a_client_whose_response_has_not_started_gets_503_then_the_close(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = socket_pair
    requests = InFlightRequests(1.0, Clock())
    entry = requests.start(1, None, "GET", "/slow", None, server)
    assert requests.answer(entry) == "503"
    assert read_all(client) == UNAVAILABLE
    assert UNAVAILABLE.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    head, _, body = UNAVAILABLE.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert requests.answer(entry) == "closed"  # once


def test_a_client_whose_response_has_started_only_sees_the_close(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = socket_pair
    requests = InFlightRequests(1.0, Clock())
    entry = requests.start(1, None, "GET", "/stream", None, server)
    server.sendall(b"HTTP/1.1 200 OK\r\n")
    requests.response_started(entry)
    assert requests.answer(entry) == "closed"
    assert read_all(client) == b"HTTP/1.1 200 OK\r\n"


def not_called(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    raise AssertionError("start_response was called")


def test_the_response_starts_when_the_app_returns_or_writes() -> None:
    requests = InFlightRequests(1.0, Clock())
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entry = requests.get(7)
        assert entry is not None
        seen["before"] = entry.response_started
        write = start_response("200 OK", [])
        seen["after start_response"] = entry.response_started
        write(b"x")
        seen["after write"] = entry.response_started
        return []

    written: list[bytes] = []
    tracked = tracking_app(app, requests, lambda: 7)
    entry = requests.start(7, None, "GET", "/", None, None)
    tracked({"HTTP_X_REQUEST_ID": "rid"}, lambda status, headers, exc_info=None: written.append)
    assert seen == {"before": False, "after start_response": False, "after write": True}
    assert written == [b"x"]
    assert entry.request_id == "rid"

    entry = requests.start(8, None, "GET", "/", None, None)
    tracking_app(lambda environ, start: [b"ok"], requests, lambda: 8)({}, not_called)
    assert entry.response_started
    # Not registered (the request started before the option applied): passed through.
    assert tracking_app(lambda environ, start: [b"ok"], requests, lambda: 9)({}, not_called) == [
        b"ok"
    ]


def test_request_id_is_read_from_gunicorns_upper_case_headers() -> None:
    assert request_id_of([("HOST", "x"), ("X-REQUEST-ID", "r-1")]) == "r-1"
    assert request_id_of([("HOST", "x")]) is None


def test_the_deadline_exception_is_not_an_application_error() -> None:
    assert not issubclass(RequestDeadlineExceeded, Exception)
    from greenlet import GreenletExit  # type: ignore[import-untyped,unused-ignore]

    assert issubclass(RequestDeadlineExceeded, GreenletExit)


# --- the worker mixin (threads) ---------------------------------------------------------


class FakeWorker(ThreadDeadlines):
    """gunicorn's worker as the mixin reads it; `stop_overdue` is the real one."""

    def __init__(self, log: Any, requests: InFlightRequests) -> None:
        self.log = log
        self.pid = 4321
        self.alive = True
        self.cfg = SimpleNamespace(graceful_timeout=30, timeout=30)
        self.told: list[str] = []
        self.app = SimpleNamespace(worker_recycling=self.told.append)
        self._deadlines = requests
        self.woken = 0
        self.nr_conns = 0  # gthread's open connections; the mixin reads it where there is one

    def _wake(self) -> None:
        self.woken += 1


def blocked_in_the_app(
    environ: dict[str, Any], started: threading.Event, release: threading.Event
) -> None:
    started.set()
    release.wait(10)


@pytest.fixture
def stuck_thread() -> Iterator[tuple[threading.Thread, threading.Event]]:
    """A thread waiting inside `blocked_in_the_app` until released."""
    started, release = threading.Event(), threading.Event()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/orders", "HTTP_X_REQUEST_ID": "r-9"}
    thread = threading.Thread(target=blocked_in_the_app, args=(environ, started, release))
    thread.start()
    started.wait(5)
    yield thread, release
    release.set()
    thread.join(5)


def test_a_request_past_its_deadline_is_logged_with_its_stack_and_retires_a_thread_worker(
    error_log: tuple[SimpleNamespace, Capture],
    stuck_thread: tuple[threading.Thread, threading.Event],
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    log, capture = error_log
    thread, _ = stuck_thread
    server, client = socket_pair
    clock = Clock()
    requests = InFlightRequests(2.0, clock)
    worker = FakeWorker(log, requests)
    requests.start(thread.ident or 0, thread.ident, "POST", "/orders", "r-9", server)
    worker.check_deadlines()
    assert capture.records == [] and worker.alive

    clock.now += 2.5
    assert worker.check_deadlines() == 2.0  # nothing else runs
    record = capture.records[0]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        "Request past its deadline: POST /orders (request id r-9) running 2.5s "
        "(--request-timeout 2s); answered 503"
    )
    assert record.stack_info is not None
    assert record.stack_info.startswith("Stack (most recent call last):")
    assert "in blocked_in_the_app" in record.stack_info
    line = capture.lines[0]
    assert line["method"] == "POST" and line["path"] == "/orders"
    assert line["request_id"] == "r-9" and line["elapsed"] == 2.5
    assert line["request_timeout"] == 2.0 and line["response"] == "503"
    assert "in blocked_in_the_app" in line["stack_info"]
    assert read_all(client) == UNAVAILABLE

    # The worker stops taking requests (once), tells why, and is woken.
    assert not worker.alive and worker.told == ["timeout"] and worker.woken == 1
    assert "stops taking requests" in capture.records[1].getMessage()
    worker.check_deadlines()
    assert len(capture.records) == 2


def test_a_retiring_thread_worker_exits_once_only_stuck_requests_are_left() -> None:
    clock = Clock()
    requests = InFlightRequests(1.0, clock)
    worker = FakeWorker(SimpleNamespace(), requests)
    stuck = requests.start(1, 1, "GET", "/slow", None, None)
    requests.start(2, 2, "GET", "/fast", None, None)
    stuck.expired = True
    worker._deadline_retire_by = clock.now + 30
    assert not worker.retire_done(clock.now)  # the other request still runs
    requests.end(2)
    worker.nr_conns = 2  # gthread: another connection is still open
    assert not worker.retire_done(clock.now)
    worker.nr_conns = 1
    assert worker.retire_done(clock.now)
    worker.nr_conns = 5
    assert worker.retire_done(clock.now + 30)  # graceful_timeout has passed
    requests.end(1)
    assert not worker.retire_done(clock.now + 30)  # it ended: the worker's loop exits


class _Base:
    """gunicorn's Worker, as far as load_wsgi and handle_request go."""

    def load_wsgi(self) -> None:
        pass

    def handle_request(self, *args: Any) -> Any:
        return self.inner(*args)  # type: ignore[attr-defined]


class SetUpWorker(ThreadDeadlines, _Base):
    def __init__(self, request_timeout: float | None) -> None:
        self.app = SimpleNamespace(settings=replace(Settings(), request_timeout=request_timeout))
        self.wsgi = object()
        self.watchdogs = 0

    def start_watchdog(self) -> None:
        self.watchdogs += 1


def test_with_the_option_off_nothing_is_installed() -> None:
    worker = SetUpWorker(None)
    app = worker.wsgi
    worker.load_wsgi()
    assert worker._deadlines is None
    assert worker.wsgi is app
    assert "handle_request" not in vars(worker)
    assert worker.watchdogs == 0


def gunicorn_request(request_id: str | None = None) -> Any:
    headers = [("HOST", "x")] + ([("X-REQUEST-ID", request_id)] if request_id else [])
    return SimpleNamespace(method="GET", path="/p", headers=headers)


def test_with_the_option_on_gunicorns_requests_are_registered_while_they_run() -> None:
    worker = SetUpWorker(2.0)
    worker.load_wsgi()
    requests = worker._deadlines
    assert requests is not None and requests.timeout == 2.0 and worker.watchdogs == 1
    seen: list[Any] = []

    def inner(*args: Any) -> str:
        (entry,) = requests.entries()
        seen.append((entry.method, entry.path, entry.request_id, entry.sock, entry.key))
        return "kept"

    worker.inner = inner  # type: ignore[attr-defined]
    # sync and the async classes: (listener, req, client, addr)
    assert worker.handle_request("listener", gunicorn_request("r"), "client", "addr") == "kept"
    # gthread: (req, conn)
    conn = SimpleNamespace(sock="conn-sock")
    assert worker.handle_request(gunicorn_request(), conn) == "kept"
    ident = threading.get_ident()
    assert seen == [("GET", "/p", "r", "client", ident), ("GET", "/p", None, "conn-sock", ident)]
    assert requests.entries() == []


def test_a_stopped_greenlet_ends_its_connection_on_gunicorns_engine() -> None:
    worker = SetUpWorker(2.0)
    worker.load_wsgi()
    requests = worker._deadlines
    assert requests is not None

    def thrown(*args: Any) -> None:
        requests.entries()[0].stopped = True
        raise RequestDeadlineExceeded

    def swallowed(*args: Any) -> None:  # gunicorn's gevent worker catches GreenletExit
        requests.entries()[0].stopped = True

    def graceful_kill(*args: Any) -> None:  # not the deadline's: passed on
        raise RequestDeadlineExceeded

    for inner in (thrown, swallowed):
        worker.inner = inner  # type: ignore[attr-defined]
        with pytest.raises(StopIteration):  # gunicorn's async loop closes the connection
            worker.handle_request("listener", gunicorn_request(), "client", "addr")
    worker.inner = graceful_kill  # type: ignore[attr-defined]
    with pytest.raises(RequestDeadlineExceeded):
        worker.handle_request("listener", gunicorn_request(), "client", "addr")
    assert requests.entries() == []


# --- logging ------------------------------------------------------------------------


def test_a_record_goes_through_a_logger_object_without_error_log_too() -> None:
    calls: list[tuple[Any, ...]] = []
    log = SimpleNamespace(log=lambda *args: calls.append(args))
    emit(log, logging.ERROR, "x %s", ("y",), {}, "Stack (most recent call last):\n  here")
    assert calls == [(logging.ERROR, "x %s\n%s", "y", "Stack (most recent call last):\n  here")]


def serving(environ: dict[str, Any]) -> Any:
    return sys._getframe()


def test_the_request_of_a_stack_is_found_in_its_environ() -> None:
    frame = serving({"REQUEST_METHOD": "GET", "PATH_INFO": "/x"})
    assert find_request(frame) == {"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}
    assert find_request(sys._getframe()) is None


class AbortWorker(RequestDeadlines):
    def __init__(self, log: Any) -> None:
        self.log = log
        self.pid = 99
        self.cfg = SimpleNamespace(timeout=2)


def test_an_aborted_worker_logs_the_interrupted_stack_and_every_thread_serving_a_request(
    error_log: tuple[SimpleNamespace, Capture],
    stuck_thread: tuple[threading.Thread, threading.Event],
) -> None:
    log, capture = error_log

    def interrupted(environ: dict[str, Any]) -> Any:
        return sys._getframe()

    frame = interrupted({"REQUEST_METHOD": "GET", "PATH_INFO": "/busy", "HTTP_X_REQUEST_ID": "q"})
    AbortWorker(log).log_abort(frame)
    messages = [record.getMessage() for record in capture.records]
    assert messages[0].startswith("Worker timeout (pid: 99): ")
    assert messages[0].endswith("serving GET /busy (request id q)")
    assert "in interrupted" in (capture.records[0].stack_info or "")
    thread, _ = stuck_thread
    assert (
        f"Worker timeout (pid: 99): thread {thread.ident}, serving POST /orders (request id r-9)"
        in (messages)
    )
    other = capture.lines[messages.index(next(m for m in messages if "/orders" in m))]
    assert other["method"] == "POST" and other["path"] == "/orders" and other["timeout"] == 2
    assert "in blocked_in_the_app" in other["stack_info"]


def test_in_flight_entries_are_small() -> None:
    assert not hasattr(InFlight(1, None, 0.0, "GET", "/", None, None), "__dict__")


# --- the worker mixin (greenlets) ---------------------------------------------------------


class FakeGreenWorker(GreenDeadlines):
    def __init__(self, requests: InFlightRequests) -> None:
        from greenlet import getcurrent

        self._getcurrent = getcurrent
        self._deadlines = requests


def test_the_deadline_is_thrown_into_the_greenlet_only_while_it_runs_that_request() -> None:
    from greenlet import greenlet

    requests = InFlightRequests(1.0, Clock())
    worker = FakeGreenWorker(requests)
    seen: list[str] = []

    def serve() -> None:
        worker.deadline_begin({"HTTP_X_REQUEST_ID": "g-1"}, "GET", "/slow")
        try:
            greenlet.getcurrent().parent.switch()  # waits, as in a sleep
            seen.append("resumed")
        except Exception:
            seen.append("caught as an application error")
        except RequestDeadlineExceeded:
            seen.append("stopped")
        finally:
            worker.deadline_end()

    green = greenlet(serve)
    green.switch()
    (entry,) = requests.entries()
    assert entry.owner is green and entry.key == id(green) and entry.request_id == "g-1"
    assert worker.deadline_frame(entry) is green.gr_frame is not None
    worker.throw_if_running(entry)
    assert seen == ["stopped"] and entry.stopped and green.dead
    assert requests.entries() == []

    # A greenlet that has moved on (its request ended) is left alone.
    green = greenlet(serve)
    green.switch()
    (entry,) = requests.entries()
    requests.end(entry.key)
    worker.throw_if_running(entry)
    assert not entry.stopped and not green.dead
    green.switch()
    assert seen == ["stopped", "resumed"]


def test_a_workers_stack_starts_at_gunicorns_init_process() -> None:
    namespace: dict[str, Any] = {}
    source = "def init_process(inner):\n    return inner()\n"
    exec(compile(source, "/venv/site-packages/gunicorn/workers/base.py", "exec"), namespace)
    frame = namespace["init_process"](sys._getframe)
    stack = format_stack(frame)
    lines = stack.splitlines()
    assert lines[0] == "Stack (most recent call last):"
    assert re.fullmatch(r"  \(\d+ outer frames of the master, before the fork\)", lines[1])
    assert lines[2].startswith(
        '  File "/venv/site-packages/gunicorn/workers/base.py", line 2, in init_process'
    )
    assert "test_a_workers_stack_starts_at_gunicorns_init_process" not in stack
    # Outside a worker the whole stack is shown.
    assert "test_a_workers_stack_starts" in format_stack(sys._getframe())
    assert format_stack(None) == "Stack (most recent call last):\n  (not available)"
