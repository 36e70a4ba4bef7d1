"""Request deadlines (`--request-timeout`) and gunicorn's `--timeout` kill on real servers.

One request to an endpoint that sleeps 30 s while other clients keep sending fast
requests: the deadline record (with the app's frame in its stack) is in the log within
4 s, the slow client gets 503 within 5 s, and no fast request fails. Each worker class
runs so that the claim means something: gevent and eventlet with one worker (the fast
requests share the worker with the stuck greenlet, which is stopped), gthread with one
worker of 4 threads (the fast requests share it, then go to its replacement), sync with
2 workers (a sync worker serves one request at a time: the other worker serves the fast
requests while the stuck one retires and is replaced).

Each test prints its figures (`pytest -s` shows them).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
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
import sys
import time


def slow_view(environ, start_response):
    try:
        time.sleep(30)
    finally:
        print("slow view unwound", file=sys.stderr, flush=True)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slow"]


def spin_view(environ, start_response):
    end = time.monotonic() + 30
    while time.monotonic() < end:
        pass
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"spun"]


def stream_body():
    yield b"first part"
    time.sleep(30)
    yield b"never sent"


def stream_view(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return stream_body()


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/slow":
        return slow_view(environ, start_response)
    if path == "/stream":
        return stream_view(environ, start_response)
    if path == "/spin":
        return spin_view(environ, start_response)
    body = str(os.getpid()).encode()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]
"""

#: The deadline record's first line (the text log).
RECORD = (
    r"\[(?P<pid>\d+)\] \[ERROR\] Request past its deadline: GET /slow \(request id "
    r"deadline-e2e\) running (?P<elapsed>[\d.]+)s \(--request-timeout 2s\); answered 503"
)
#: Fast clients keep sending until this long after the slow request was sent (the
#: replacement of a thread worker happens in this window).
WINDOW = 5.0
FAST_CLIENTS = 3


@pytest.fixture
def deadline_app(tmp_path: Path) -> str:
    (tmp_path / "deadline_app.py").write_text(APP)
    return "deadline_app:app"


@dataclass
class FastClients:
    """Clients that GET /fast on new connections until stopped, counting failures."""

    url: str
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, count: int) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self._run)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = requests.get(
                    self.url + "/fast", timeout=10, headers={"Connection": "close"}
                )
                outcome = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
                response = None
            with self._lock:
                self.sent += 1
                if outcome is not None:
                    self.failures.append(outcome)
                elif response is not None:
                    self.pids.add(int(response.text))
            time.sleep(0.05)


@dataclass
class SlowRequest:
    """GET /slow in a thread: when and how it ended."""

    url: str
    status: int | None = None
    error: str | None = None
    after: float | None = None
    started: float = 0.0
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(40)

    def _run(self) -> None:
        try:
            response = requests.get(
                self.url + "/slow", timeout=30, headers={"X-Request-ID": "deadline-e2e"}
            )
            self.status = response.status_code
        except requests.RequestException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        self.after = time.monotonic() - self.started


def wait_for(
    server: Server, pattern: str, since: float, deadline: float
) -> tuple[re.Match[str], float]:
    """Polls the server's log for `pattern`; returns the match and when it was seen,
    in seconds after `since`."""
    compiled = re.compile(pattern)
    end = since + deadline
    while True:
        match = compiled.search(server.log_text())
        if match:
            return match, time.monotonic() - since
        if time.monotonic() > end:
            pytest.fail(f"no log line matches {pattern!r}: {server.describe()}")
        time.sleep(0.02)


CLASSES = [
    pytest.param("microsvc", "sync", ["--workers", "2"], id="microsvc-sync"),
    pytest.param(
        "microsvc", "gthread", ["--workers", "1", "--threads", "4"], id="microsvc-gthread"
    ),
    pytest.param("microsvc", "gevent", ["--workers", "1"], id="microsvc-gevent"),
    pytest.param("microsvc", "eventlet", ["--workers", "1"], id="microsvc-eventlet"),
    pytest.param("gunicorn", "sync", ["--workers", "2"], id="gunicorn-sync"),
    pytest.param("gunicorn", "gevent", ["--workers", "1"], id="gunicorn-gevent"),
]


@pytest.mark.parametrize(
    ("http_engine", "worker_class", "extra"), CLASSES, indirect=["http_engine"]
)
def test_a_request_past_its_deadline_is_logged_answered_and_stopped_without_failing_others(
    serve: ServeFactory, deadline_app: str, http_engine: str, worker_class: str, extra: list[str]
) -> None:
    server = serve([deadline_app, "-k", worker_class, *extra, "--request-timeout", "2s"])
    fast = FastClients(server.url)
    fast.start(FAST_CLIENTS)
    time.sleep(0.5)
    slow = SlowRequest(server.url)
    try:
        slow.start()
        match, logged_after = wait_for(server, RECORD, slow.started, 10.0)
        slow.join()
        remaining = WINDOW - (time.monotonic() - slow.started)
        if remaining > 0:
            time.sleep(remaining)
    finally:
        fast.stop()
        slow.join()

    print(
        f"\n{http_engine}-{worker_class}: record after {logged_after:.2f}s, slow client "
        f"answered after {slow.after:.2f}s ({slow.status or slow.error}), fast requests "
        f"{fast.sent} sent, {len(fast.failures)} failed"
    )
    log = server.log_text()
    assert logged_after <= 4.0, server.describe()
    assert slow.status == 503, f"{slow.error}\n{server.describe()}"
    assert slow.after is not None and slow.after <= 5.0, server.describe()
    assert fast.failures == [], server.describe()
    assert fast.sent >= 20, server.describe()

    # The stack is the slow request's, down to the app's frame.
    stack = log[match.end() :].split("\n[", 1)[0]
    assert stack.startswith("\nStack (most recent call last):"), stack
    assert re.search(r'deadline_app\.py", line \d+, in slow_view\n\s+time\.sleep\(30\)', stack), (
        stack
    )
    stuck_pid = int(match["pid"])

    if worker_class in ("gevent", "eventlet"):
        # Only the stuck greenlet was stopped: the app unwound, the worker kept serving.
        assert "slow view unwound" in log, server.describe()
        assert "stops taking requests" not in log
        assert fast.pids == {stuck_pid}, server.describe()
    else:
        # The worker retired, served its other requests, and was replaced.
        assert f"Worker (pid: {stuck_pid}) stops taking requests" in log, server.describe()
        server.wait_log(rf"Worker exiting \(pid: {stuck_pid}\): 1 request\(s\) past their deadline")
        # The worker logs that line just before it exits: give the kernel a moment.
        gone_by = time.monotonic() + 10
        while stuck_pid in [worker.pid for worker in server.app_workers()]:
            assert time.monotonic() < gone_by, server.describe()
            time.sleep(0.05)
        assert len(fast.pids - {stuck_pid}) >= 1, server.describe()
    assert "Traceback" not in log, server.describe()


def test_the_deadline_record_is_one_json_entry_with_its_fields(
    serve: ServeFactory, deadline_app: str
) -> None:
    server = serve(
        [
            deadline_app,
            "-k",
            "gevent",
            "--workers",
            "1",
            "--request-timeout",
            "1s",
            "--log-format",
            "json",
        ]
    )
    with requests.get(
        server.url + "/slow", timeout=30, headers={"X-Request-ID": "deadline-json"}
    ) as response:
        assert response.status_code == 503
    server.wait_log(r"Request past its deadline")
    entries = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    records = [entry for entry in entries if "past its deadline" in entry["message"]]
    assert len(records) == 1, server.describe()
    record = records[0]
    assert record["level"] == "error" and record["method"] == "GET" and record["path"] == "/slow"
    assert record["request_id"] == "deadline-json" and record["response"] == "503"
    assert 1.0 <= record["elapsed"] < 3.0 and record["request_timeout"] == 1.0
    assert record["pid"] in {worker.pid for worker in server.app_workers()}
    assert "in slow_view" in record["stack_info"]


ABORT_CASES = [
    pytest.param("microsvc", "sync", "/slow", "slow_view", id="microsvc-sync-sleep"),
    pytest.param("gunicorn", "sync", "/slow", "slow_view", id="gunicorn-sync-sleep"),
    # The response had begun: gunicorn's engine logs the abort on another path.
    pytest.param("microsvc", "sync", "/stream", "stream_body", id="microsvc-sync-streaming"),
    pytest.param("gunicorn", "sync", "/stream", "stream_body", id="gunicorn-sync-streaming"),
    pytest.param("microsvc", "gevent", "/spin", "spin_view", id="microsvc-gevent-spin"),
]


@pytest.mark.parametrize(
    ("http_engine", "worker_class", "path", "view"), ABORT_CASES, indirect=["http_engine"]
)
def test_the_timeout_kill_logs_the_stack_and_the_request_before_the_worker_dies(
    serve: ServeFactory,
    deadline_app: str,
    http_engine: str,
    worker_class: str,
    path: str,
    view: str,
) -> None:
    # --request-timeout is off: the record comes from the SIGABRT of gunicorn's arbiter.
    server = serve([deadline_app, "-k", worker_class, "--workers", "1", "--timeout", "2"])
    started = time.monotonic()
    # The client sees the connection closed (gunicorn's sync engine answers 500 first,
    # when the response has not begun).
    with contextlib.suppress(requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        requests.get(server.url + path, timeout=30, headers={"X-Request-ID": "abort-e2e"})
    match, logged_after = wait_for(
        server,
        r"\[(?P<pid>\d+)\] \[ERROR\] Worker timeout \(pid: (?P=pid)\): \S+ \S+, serving GET "
        + re.escape(path)
        + r" \(request id abort-e2e\)",
        started,
        15.0,
    )
    print(f"\n{http_engine}-{worker_class} {path}: timeout record after {logged_after:.2f}s")
    log = server.log_text()
    stack = log[match.end() :].split("\n[", 1)[0]
    assert re.search(rf'deadline_app\.py", line \d+, in {view}\n', stack), stack
    pid = int(match["pid"])
    gone = server.wait_log(rf"Worker exiting \(pid: {pid}\)")
    log = server.log_text()
    assert log.index(f"WORKER TIMEOUT (pid:{pid})") < match.start() < gone.start(), log
