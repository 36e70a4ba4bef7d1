"""Request deadlines (`--request-timeout`) and the log of a worker killed by `--timeout`.

With `--request-timeout DURATION`, each worker keeps a registry of the requests it is
running (`InFlightRequests`: start time, the thread or greenlet running it, method, path,
X-Request-ID, whether the response has started, the client socket) and a watchdog that
wakes at the earliest deadline. A request running longer than DURATION is:

1. logged as one error record in gunicorn's error log, with the method, path, request
   id, elapsed time, and the Python stack of the thread or greenlet running it (the
   record's `stack_info`; with `--log-format json` the fields are keys of the entry);
2. answered: its client gets `503 Service Unavailable` (`Connection: close`) when no
   response has started, else the connection is shut down;
3. stopped, without failing the worker's other requests:
   - gevent, eventlet: `RequestDeadlineExceeded` (a `GreenletExit`) is thrown into the
     greenlet running it, which unwinds the application (its `finally` blocks run, an
     `except Exception` does not catch it) and ends the connection;
   - sync, gthread: a thread cannot be stopped from Python, so the worker stops taking
     new requests (gunicorn's graceful stop, `alive = False`), lets its other requests
     finish (at most `graceful_timeout`), and then exits without waiting for the stuck
     thread (`os._exit`: the interpreter's exit would wait for it, and gunicorn's
     `worker_exit` hook does not run); the arbiter starts a replacement. The exit
     counts as a `timeout` in the metrics and the scoreboard.

A request is registered by the HTTP engine's hooks (`EngineWorker`) or, with
`--http-engine gunicorn`, by a wrapper of the worker's `handle_request`; the response is
seen to start when the application returns (or calls the legacy `write`). With the
option off, nothing is installed: the HTTP engine's hooks check one attribute, gunicorn's
request path nothing.

Independently of the option, a worker that gunicorn's arbiter aborts because its loop
stopped heartbeating (`--timeout`, SIGABRT) logs, before it exits, the stack of the
thread or greenlet that was running and of every thread serving a request, each with
the request it serves (read from the `environ` in the stack).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from microsvc.config.values import format_duration
from microsvc.serving.context import settings_of
from microsvc.wsgi import Environ, StartResponse, WSGIApp


def _greenlet_exit() -> type[BaseException]:
    try:
        from greenlet import GreenletExit  # type: ignore[import-untyped,unused-ignore]
    except ImportError:  # no greenlet installed: only the thread classes can run
        return BaseException
    exit_class: type[BaseException] = GreenletExit
    return exit_class


class RequestDeadlineExceeded(_greenlet_exit()):  # type: ignore[misc]
    """Thrown into the greenlet of a request past its deadline (gevent, eventlet). A
    `GreenletExit`: an application's `except Exception` lets it through."""


#: What the client of a request past its deadline gets when no response has started.
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Connection: close\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 19\r\n"
    b"\r\n"
    b"Service Unavailable"
)
#: The watchdog never waits less than this between two checks.
MIN_WAIT = 0.05
#: While a thread worker retires, the watchdog checks this often whether the other
#: requests have finished.
RETIRE_POLL = 0.1

#: The first line of every deadline record (method, path, request id, elapsed, setting).
DEADLINE_FORMAT = (
    "Request past its deadline: %s %s (request id %s) running %.1fs (--request-timeout %s); %s"
)
#: The first line of the record of each thread of a worker aborted by --timeout.
ABORT_FORMAT = "Worker timeout (pid: %s): %s, %s"

_STACK_HEAD = "Stack (most recent call last):\n"
#: The file of gunicorn's Worker.init_process, where a worker's own stack begins.
_WORKER_BASE = os.path.join("gunicorn", "workers", "base.py")


class InFlight:
    """One request a worker runs: who runs it (`key`, `owner`), since when, what it is,
    and what the deadline did to it."""

    __slots__ = (
        "answered",
        "expired",
        "key",
        "method",
        "owner",
        "path",
        "request_id",
        "response_started",
        "since",
        "sock",
        "stopped",
    )

    def __init__(
        self,
        key: int,
        owner: Any,
        since: float,
        method: str,
        path: str,
        request_id: str | None,
        sock: Any,
    ) -> None:
        self.key = key
        self.owner = owner
        self.since = since
        self.method = method
        self.path = path
        self.request_id = request_id
        self.sock = sock
        self.response_started = False
        self.expired = False  # past its deadline, reported
        self.answered = False  # 503 sent or connection shut down
        self.stopped = False  # RequestDeadlineExceeded thrown into its greenlet


class InFlightRequests:
    """The requests a worker is running, by the key of their thread or greenlet (one
    request at a time each), with a deadline `timeout` seconds after their start.
    `clock` is monotonic seconds (tests give a fake one)."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self._entries: dict[int, InFlight] = {}
        self._lock = threading.Lock()

    def start(
        self,
        key: int,
        owner: Any,
        method: str,
        path: str,
        request_id: str | None,
        sock: Any,
    ) -> InFlight:
        entry = InFlight(key, owner, self.clock(), method, path, request_id, sock)
        self._entries[key] = entry
        return entry

    def end(self, key: int) -> InFlight | None:
        return self._entries.pop(key, None)

    def get(self, key: int) -> InFlight | None:
        return self._entries.get(key)

    def entries(self) -> list[InFlight]:
        return list(self._entries.values())

    def overdue(self, now: float) -> list[InFlight]:
        """The requests past their deadline at `now` that were not reported before;
        they are marked `expired`."""
        limit = now - self.timeout
        found = []
        for entry in self.entries():
            if not entry.expired and entry.since <= limit:
                entry.expired = True
                found.append(entry)
        return found

    def next_check(self, now: float) -> float:
        """Seconds until the earliest deadline still to come (`timeout` when none: a
        request that starts meanwhile cannot be due sooner)."""
        wait = self.timeout
        for entry in self.entries():
            if not entry.expired:
                wait = min(wait, entry.since + self.timeout - now)
        return max(wait, MIN_WAIT)

    def counts(self) -> tuple[int, int]:
        """(requests within their deadline, requests past it)."""
        entries = self.entries()
        expired = sum(1 for entry in entries if entry.expired)
        return len(entries) - expired, expired

    def response_started(self, entry: InFlight) -> None:
        """The response of `entry` may be written from now on: never answer it 503."""
        with self._lock:
            entry.response_started = True

    def answer(self, entry: InFlight) -> str:
        """Answers the client of `entry` once: 503 when no response has started, then
        shuts the connection down. Returns what was done ("503" or "closed")."""
        with self._lock:
            if entry.answered:
                return "closed"
            entry.answered = True
            started = entry.response_started
            sock = entry.sock
            if sock is not None and not started:
                with contextlib.suppress(OSError, ValueError):
                    sock.sendall(UNAVAILABLE)
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    sock.shutdown(socket.SHUT_RDWR)
        return "closed" if started else "503"


def request_id_of(headers: Iterable[tuple[str, str]]) -> str | None:
    """The X-Request-ID of gunicorn's request headers (upper-case names)."""
    for name, value in headers:
        if name == "X-REQUEST-ID":
            return value
    return None


def tracking_app(app: WSGIApp, requests: InFlightRequests, key: Callable[[], int]) -> WSGIApp:
    """`app`, noting in `requests` when the response of the running request may start
    (the application returned, or called `write`)."""

    def call(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        entry = requests.get(key())
        if entry is None:
            return app(environ, start_response)
        if entry.request_id is None:
            entry.request_id = environ.get("HTTP_X_REQUEST_ID")

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            write = start_response(status, headers, exc_info)

            def tracked_write(data: bytes) -> Any:
                requests.response_started(entry)
                return write(data)

            return tracked_write

        try:
            return app(environ, start)
        finally:
            requests.response_started(entry)

    return call


def format_stack(frame: FrameType | None) -> str:
    """A stack as logging's `stack_info` shows it, innermost frame last. In a worker, the
    frames the master ran before it forked the worker are left out: the stack starts at
    gunicorn's `Worker.init_process`."""
    if frame is None:
        return _STACK_HEAD + "  (not available)"
    summary = traceback.extract_stack(frame)
    first = 0
    for index, entry in enumerate(summary):
        if entry.name == "init_process" and entry.filename.endswith(_WORKER_BASE):
            first = index
    lines = traceback.StackSummary.from_list(summary[first:]).format()
    if first:
        lines.insert(0, f"  ({first} outer frames of the master, before the fork)\n")
    return _STACK_HEAD + "".join(lines).rstrip("\n")


def deadline_fields(entry: InFlight, now: float, timeout: float, response: str) -> dict[str, Any]:
    """The structured fields of a deadline record (`extra=`; keys of a JSON entry)."""
    return {
        "method": entry.method,
        "path": entry.path,
        "request_id": entry.request_id,
        "elapsed": round(now - entry.since, 3),
        "request_timeout": timeout,
        "response": response,
    }


def emit(
    log: Any, level: int, msg: str, args: tuple[Any, ...], fields: dict[str, Any], stack: str
) -> None:
    """One record in gunicorn's error log (`log` is gunicorn's logger object) with
    `fields` as extra attributes and `stack` as its stack_info."""
    error_log = getattr(log, "error_log", None)
    if isinstance(error_log, logging.Logger):
        if error_log.isEnabledFor(level):
            record = error_log.makeRecord(
                error_log.name, level, __file__, 0, msg, args, None, extra=fields, sinfo=stack
            )
            error_log.handle(record)
        return
    log.log(level, msg + "\n%s", *args, stack)  # a logger class without error_log


def find_request(frame: FrameType | None) -> Environ | None:
    """The WSGI environ of the request a stack serves: the innermost `environ` local
    that looks like one."""
    while frame is not None:
        with contextlib.suppress(Exception):
            environ = frame.f_locals.get("environ")
            if isinstance(environ, dict) and "REQUEST_METHOD" in environ:
                return environ
        frame = frame.f_back
    return None


def _describe(environ: Environ | None, elapsed: float | None) -> tuple[str, dict[str, Any]]:
    if environ is None:
        return "not serving a request", {}
    method = str(environ.get("REQUEST_METHOD", ""))
    path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    request_id = environ.get("HTTP_X_REQUEST_ID")
    fields: dict[str, Any] = {"method": method, "path": path, "request_id": request_id}
    text = f"serving {method} {path} (request id {request_id or '-'})"
    if elapsed is not None:
        fields["elapsed"] = round(elapsed, 3)
        text += f" for {elapsed:.1f}s"
    return text, fields


class RequestDeadlines:
    """Mixin for a gunicorn worker class (after `Recycling`): request deadlines with
    `--request-timeout`, and the stacks of a worker aborted by `--timeout`. A subclass
    says how a request's owner (thread or greenlet) is found, watched and stopped."""

    # Provided by gunicorn's Worker.
    alive: bool
    pid: Any
    app: Any
    cfg: Any
    log: Any
    wsgi: Any

    _deadlines: InFlightRequests | None = None

    # the owner of the running request (a subclass)

    def deadline_key(self) -> int:
        return threading.get_ident()

    def deadline_owner(self) -> Any:
        return threading.get_ident()

    def deadline_frame(self, entry: InFlight) -> FrameType | None:
        return sys._current_frames().get(entry.owner)

    def start_watchdog(self) -> None:
        raise NotImplementedError

    def stop_overdue(self, entry: InFlight) -> None:
        raise NotImplementedError

    # set up, in the worker

    def load_wsgi(self) -> None:
        super().load_wsgi()  # type: ignore[misc]
        settings = settings_of(self.app)
        timeout = settings.request_timeout if settings else None
        if not timeout:
            return
        self._deadlines = requests = InFlightRequests(float(timeout))
        self.wsgi = tracking_app(self.wsgi, requests, self.deadline_key)
        # gunicorn's engine: each request goes through handle_request (only with the option)
        self._deadline_handle_request: Callable[..., Any] = getattr(self, "handle_request")  # noqa: B009
        setattr(self, "handle_request", self._handle_request_with_deadline)  # noqa: B010
        self.start_watchdog()

    def deadline_begin(self, environ: Environ, method: str, path: str) -> None:
        """Registers the request the current thread or greenlet starts (HTTP engine)."""
        assert self._deadlines is not None
        self._deadlines.start(
            self.deadline_key(),
            self.deadline_owner(),
            method,
            path,
            environ.get("HTTP_X_REQUEST_ID"),
            environ.get("gunicorn.socket"),
        )

    def deadline_end(self) -> None:
        assert self._deadlines is not None
        self._deadlines.end(self.deadline_key())

    def _handle_request_with_deadline(self, *args: Any) -> Any:
        """gunicorn's handle_request, registered: (listener, req, client, addr) for sync
        and the async classes, (req, conn) for gthread."""
        requests = self._deadlines
        assert requests is not None
        if len(args) >= 3:
            req, sock = args[1], args[2]
        else:
            req, sock = args[0], args[1].sock
        key = self.deadline_key()
        entry = requests.start(
            key,
            self.deadline_owner(),
            str(req.method),
            str(req.path),
            request_id_of(req.headers),
            sock,
        )
        try:
            result = self._deadline_handle_request(*args)
        except RequestDeadlineExceeded:
            if entry.stopped:
                raise StopIteration from None  # gunicorn closes the connection
            raise
        finally:
            requests.end(key)
        if entry.stopped:  # gunicorn's gevent worker swallows a GreenletExit
            raise StopIteration
        return result

    # the watchdog's work

    def check_deadlines(self) -> float:
        """Handles the requests now past their deadline; returns how long to wait
        before the next check. A failure is logged; the watchdog goes on."""
        requests = self._deadlines
        assert requests is not None
        try:
            now = requests.clock()
            for entry in requests.overdue(now):
                self.report_overdue(entry, now)
                self.stop_overdue(entry)
        except Exception:
            self.log.exception("Worker (pid: %s) failed to check its request deadlines", self.pid)
        return requests.next_check(requests.clock())

    def report_overdue(self, entry: InFlight, now: float) -> None:
        requests = self._deadlines
        assert requests is not None
        stack = format_stack(self.deadline_frame(entry))
        response = requests.answer(entry)
        done = (
            "answered 503" if response == "503" else "connection closed (the response had started)"
        )
        emit(
            self.log,
            logging.ERROR,
            DEADLINE_FORMAT,
            (
                entry.method,
                entry.path,
                entry.request_id or "-",
                now - entry.since,
                format_duration(requests.timeout),
                done,
            ),
            deadline_fields(entry, now, requests.timeout, response),
            stack,
        )

    # gunicorn's --timeout

    def handle_abort(self, sig: int, frame: FrameType | None) -> None:
        with contextlib.suppress(Exception):
            self.log_abort(frame)
        self._quiet_abort_exit()
        super().handle_abort(sig, frame)  # type: ignore[misc]

    def _quiet_abort_exit(self) -> None:
        """gunicorn's `handle_abort` raises SystemExit in the request it interrupted,
        and gunicorn's sync engine catches it there and logs it with `log.exception`
        ("Error handling request", with a traceback), before or after the response
        began. The record `log_abort` wrote has the request's stack already: from here
        on, while the worker exits, a SystemExit is not logged as an error again (other
        exceptions are, and the 500 and the access line still go out)."""
        log = self.log
        exception = log.exception

        def exception_but_exit(msg: object, *args: Any, **kwargs: Any) -> None:
            if not isinstance(sys.exc_info()[1], SystemExit):
                exception(msg, *args, **kwargs)

        with contextlib.suppress(AttributeError):  # a logger whose methods are fixed
            log.exception = exception_but_exit

    def log_abort(self, frame: FrameType | None) -> None:
        """Logs the stack of the interrupted thread or greenlet (`frame`) and of every
        other thread serving a request, each with its request."""
        requests = self._deadlines
        stacks: list[tuple[str, FrameType | None, int | None]] = [
            (self.abort_label(), frame, self.deadline_key() if requests is not None else None)
        ]
        current = threading.get_ident()
        watchdog = getattr(self, "_watchdog_ident", None)
        for ident, other in sys._current_frames().items():
            if ident in (current, watchdog):
                continue
            if find_request(other) is not None:
                stacks.append((f"thread {ident}", other, ident))
        now = time.monotonic()
        timeout = getattr(self.cfg, "timeout", None)
        for index, (label, stack_frame, key) in enumerate(stacks):
            entry = requests.get(key) if requests is not None and key is not None else None
            elapsed = now - entry.since if entry is not None else None
            environ = find_request(stack_frame)
            if environ is None and index == 0:
                environ, elapsed = self.request_in_slot(elapsed)
            text, fields = _describe(environ, elapsed)
            fields["timeout"] = timeout
            emit(
                self.log,
                logging.ERROR,
                ABORT_FORMAT,
                (self.pid, label, text),
                fields,
                format_stack(stack_frame),
            )
        for handler in getattr(getattr(self.log, "error_log", None), "handlers", ()):
            with contextlib.suppress(Exception):
                handler.flush()

    def request_in_slot(self, elapsed: float | None) -> tuple[Environ | None, float | None]:
        """The request this worker's scoreboard slot says it serves, as much of an
        environ as `_describe` reads, and how long it has run: for a stack that holds
        no environ (the HTTP engine sending a streamed body). None when the worker has
        no slot or is serving other than exactly one request."""
        board = getattr(getattr(self, "app", None), "scoreboard", None)
        if board is None:
            return None, elapsed
        with contextlib.suppress(Exception):
            for worker in board.snapshot().workers:
                request = worker.request
                if worker.pid == os.getpid() and worker.in_flight == 1 and request:
                    environ = {
                        "REQUEST_METHOD": request["method"],
                        "PATH_INFO": request["path"],
                        "HTTP_X_REQUEST_ID": request["request_id"],
                    }
                    return environ, request["seconds"] if elapsed is None else elapsed
        return None, elapsed

    def abort_label(self) -> str:
        return (
            "main thread"
            if threading.current_thread() is threading.main_thread()
            else (f"thread {threading.get_ident()}")
        )


class ThreadDeadlines(RequestDeadlines):
    """Deadlines for sync and gthread: a daemon thread watches; a request past its
    deadline retires the worker (see the module docstring)."""

    _deadline_retire_by: float | None = None

    def start_watchdog(self) -> None:
        thread = threading.Thread(target=self._watch, name="microsvc-deadlines", daemon=True)
        thread.start()
        self._watchdog_ident = thread.ident

    def _watch(self) -> None:
        requests = self._deadlines
        assert requests is not None
        while True:
            wait = self.check_deadlines()
            if self._deadline_retire_by is not None:
                if self.retire_done(requests.clock()):
                    self.exit_now()
                    return
                wait = min(wait, RETIRE_POLL)
            time.sleep(wait)

    def stop_overdue(self, entry: InFlight) -> None:
        if self._deadline_retire_by is not None:
            return
        requests = self._deadlines
        assert requests is not None
        self._deadline_retire_by = requests.clock() + float(
            getattr(self.cfg, "graceful_timeout", 30) or 0
        )
        self.log.warning(
            "Worker (pid: %s) stops taking requests: a request past its deadline holds a "
            "thread that cannot be stopped; it exits once its other requests finish",
            self.pid,
        )
        tell = getattr(self.app, "worker_recycling", None)
        if callable(tell):
            try:
                tell("timeout")
            except Exception as exc:
                self.log.warning("Worker (pid: %s) cannot record its stop: %s", self.pid, exc)
        self.alive = False
        wake = getattr(self, "_wake", None)
        if callable(wake):
            wake()

    def retire_done(self, now: float) -> bool:
        """Whether a retiring worker may exit now: only requests past their deadline are
        left (and no other connection is open), or graceful_timeout has passed. False
        once the stuck requests have ended: the worker's own loop then exits."""
        requests = self._deadlines
        assert requests is not None and self._deadline_retire_by is not None
        running, stuck = requests.counts()
        if stuck == 0:
            return False
        others_done = running == 0 and int(getattr(self, "nr_conns", 0) or 0) <= stuck
        return others_done or now >= self._deadline_retire_by

    def exit_now(self) -> None:
        """Ends the process without waiting for the stuck threads (the interpreter's
        exit would join them)."""
        requests = self._deadlines
        assert requests is not None
        _, stuck = requests.counts()
        self.log.info(
            "Worker exiting (pid: %s): %d request(s) past their deadline left running",
            self.pid,
            stuck,
        )
        for handler in getattr(getattr(self.log, "error_log", None), "handlers", ()):
            with contextlib.suppress(Exception):
                handler.flush()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)


class GreenDeadlines(RequestDeadlines):
    """Deadlines for gevent and eventlet: a greenlet watches; the greenlet of a request
    past its deadline gets `RequestDeadlineExceeded` thrown into it."""

    _getcurrent: Callable[[], Any]

    def load_wsgi(self) -> None:
        from greenlet import getcurrent  # type: ignore[import-untyped,unused-ignore]

        self._getcurrent = getcurrent
        super().load_wsgi()

    def deadline_key(self) -> int:
        return id(self._getcurrent())

    def deadline_owner(self) -> Any:
        return self._getcurrent()

    def deadline_frame(self, entry: InFlight) -> FrameType | None:
        frame: FrameType | None = getattr(entry.owner, "gr_frame", None)
        return frame

    def abort_label(self) -> str:
        return "running greenlet"

    def throw_if_running(self, entry: InFlight) -> None:
        """In the hub: throws RequestDeadlineExceeded into the greenlet of `entry` if it
        still runs that request."""
        requests = self._deadlines
        if requests is None or requests.get(entry.key) is not entry or entry.stopped:
            return
        entry.stopped = True
        with contextlib.suppress(Exception):
            entry.owner.throw(RequestDeadlineExceeded())


class GeventDeadlines(GreenDeadlines):
    def start_watchdog(self) -> None:
        import gevent

        gevent.spawn(self._watch)

    def _watch(self) -> None:
        import gevent

        while True:
            gevent.sleep(self.check_deadlines())

    def stop_overdue(self, entry: InFlight) -> None:
        import gevent

        gevent.get_hub().loop.run_callback(self.throw_if_running, entry)


class EventletDeadlines(GreenDeadlines):
    def start_watchdog(self) -> None:
        import eventlet

        eventlet.spawn_n(self._watch)

    def _watch(self) -> None:
        import eventlet

        while True:
            eventlet.sleep(self.check_deadlines())

    def stop_overdue(self, entry: InFlight) -> None:
        import eventlet.hubs

        eventlet.hubs.get_hub().schedule_call_global(0, self.throw_if_running, entry)
