"""Serving one connection: requests in order until the connection closes.

`serve_connection` uses only the blocking socket API, so one function serves a plain
thread, and a greenlet under gevent's or eventlet's monkey-patching alike. A worker that
serves connections in green threads also gives its `GreenIO` (see `green`): the engine
then reads and writes the socket under the green socket directly, with no timer per wait,
and yields to the other connections after each response. A worker that parks idle
keep-alive connections in a poller (gthread, sync) uses `HTTPConnection.serve` with
`hand_back=True`: it returns as soon as no further request is buffered, and is called
again when the socket turns readable."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from microsvc.http.body import RequestBody
from microsvc.http.config import HTTPConfig
from microsvc.http.environ import connection_environ, request_environ
from microsvc.http.errors import ConnectionLost, InvalidBody, RequestError, ResponseError
from microsvc.http.filewrapper import FileWrapper
from microsvc.http.green import GreenIO
from microsvc.http.meter import RequestMeter
from microsvc.http.parser import Message, RequestStream
from microsvc.http.response import Response
from microsvc.http.slot import SlotWriter
from microsvc.wsgi import QUEUE_TIME_KEY, SHED_KEY, Environ, WSGIApp

log = logging.getLogger("microsvc.http")

#: Set to True in the environ (by a wrapper of the app) when the application took the
#: connection over and answered on the socket itself (eventlet.websocket): nothing more
#: is written, and the connection is closed.
TAKEN_OVER_KEY: Final = "microsvc.taken_over"

# Names used on every request, bound as Final: compiled, a Final module name is a C
# variable, any other is looked up in the module's dictionary at each use.
_perf_counter: Final = time.perf_counter
_QUEUE_TIME_KEY: Final = QUEUE_TIME_KEY
_SHED_KEY: Final = SHED_KEY


class RequestRecord:
    """What an access log and a post-request hook need about one served request.

    `status` is the status line's text ("200 OK", empty when no response was sent),
    `response_bytes` the body bytes sent (framing excluded), `duration` in seconds from
    the complete request head to the end of the response. `request_headers` are the
    request's (upper-case names, as parsed), `response_headers` the ones the application
    gave to start_response. A plain slotted object: one is made for every request."""

    __slots__ = (
        "client",
        "duration",
        "method",
        "request_headers",
        "request_line",
        "response_bytes",
        "response_headers",
        "status",
        "status_code",
        "target",
    )

    def __init__(
        self,
        request_line: str,
        method: str,
        target: str,
        status: str,
        status_code: int,
        response_bytes: int,
        duration: float,
        client: Any,
        request_headers: list[tuple[str, str]] | None = None,
        response_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.request_line = request_line
        self.method = method
        self.target = target
        self.status = status
        self.status_code = status_code
        self.response_bytes = response_bytes
        self.duration = duration
        self.client = client
        self.request_headers: list[tuple[str, str]] = request_headers or []
        self.response_headers: list[tuple[str, str]] = response_headers or []

    def __repr__(self) -> str:
        return f"RequestRecord({self.request_line!r}, {self.status!r}, {self.duration:.6f})"


BeforeRequest = Callable[[Environ, Message], None]
AfterRequest = Callable[[Environ, RequestRecord], None]


@dataclass(frozen=True)
class Hooks:
    """Callbacks around each request, in the shape of gunicorn's pre_request and
    post_request: `before(environ, message)` runs before the application (`message` is
    the parsed request: method, target, path, query, version, headers, scheme),
    `after(environ, record)` after the response is sent (or failed). An exception a hook
    raises is logged and the connection closed. `keep_serving()` is asked after `before`
    whether the connection may serve another request after this one (False: the response
    says `Connection: close`, and the connection closes after it, as a stopping worker
    needs). A connection whose response announced keep-alive is not closed before its
    next request (the client may be sending it already): that request is served, and
    its response says `Connection: close`. `slot`, the worker's scoreboard slot, notes
    each request while it runs (before `before`, until before `after`), and its queue
    time (`microsvc.serving.middleware`). `meter` records each request's metrics once
    its response has ended (before `after`)."""

    before: BeforeRequest | None = None
    after: AfterRequest | None = None
    keep_serving: Callable[[], bool] | None = None
    slot: SlotWriter | None = None
    meter: RequestMeter | None = None


NO_HOOKS = Hooks()


def serve_connection(
    sock: socket.socket,
    client: Any,
    server: Any,
    app: WSGIApp,
    config: HTTPConfig,
    hooks: Hooks = NO_HOOKS,
    green: GreenIO | None = None,
) -> None:
    """Serves requests from a connected socket until the connection is to close, then
    returns; closing the socket is the caller's. `client` and `server` are the peer's and
    the listener's addresses as `getpeername()` and `getsockname()` give them. A worker
    that serves connections in green threads gives its `green` (see `green`)."""
    HTTPConnection(sock, client, server, app, config, hooks, green).serve()


class HTTPConnection:
    """One connection's state between requests, for a caller that serves it in turns."""

    __slots__ = (
        "_after",
        "_app",
        "_base",
        "_before",
        "_channel",
        "_client",
        "_config",
        "_first",
        "_green",
        "_hooks",
        "_io",
        "_keep_serving",
        "_meter",
        "_plain",
        "_server_header",
        "_slot",
        "sock",
        "stream",
    )

    def __init__(
        self,
        sock: socket.socket,
        client: Any,
        server: Any,
        app: WSGIApp,
        config: HTTPConfig,
        hooks: Hooks = NO_HOOKS,
        green: GreenIO | None = None,
    ) -> None:
        self.sock = sock
        self._green = green
        self._channel = channel = green.channel(sock) if green is not None else None
        # What requests are read from and responses written to: the socket, or its channel.
        io: Any = channel if channel is not None else sock
        self._io = io
        self.stream = RequestStream(io, config, client)
        self._client = client
        self._app = app
        self._config = config
        self._hooks = hooks
        self._before = hooks.before
        self._after = hooks.after
        self._keep_serving = hooks.keep_serving
        self._slot = hooks.slot
        self._meter = hooks.meter
        self._base = connection_environ(config, client, server)
        self._base["gunicorn.socket"] = sock
        self._server_header = f"Server: {config.server_software}\r\n".encode("latin-1")
        self._plain = not isinstance(sock, ssl.SSLSocket) and config.sendfile and not config.is_ssl
        self._first = True

    def serve(self, hand_back: bool = False) -> bool:
        """Serves requests in order. Returns False when the connection is to close.

        With `hand_back`, returns True once a response is complete and no further
        request is buffered: the connection is idle, and its socket is the caller's to
        watch; call `serve(hand_back=True)` again when it turns readable (the wait for
        the rest of a request that has started is bounded by the header timeout)."""
        stream = self.stream
        io = self._io
        client = self._client
        green = self._green
        channel = self._channel
        while True:
            try:
                message = stream.next_message(self._first)
            except RequestError as exc:
                _refuse(io, client, exc)
                return False
            except OSError:  # a timeout, or the client went away
                return False
            if message is None:
                return False
            self._first = False
            try:
                keep_alive = self._serve_request(message)
            except ConnectionLost:
                return False  # the client went away while the response was written
            if not keep_alive:
                return False
            if green is not None:
                # The yield to the other connections (see `green`): the wait for the next
                # request, or an explicit one when it is already read.
                if channel is not None and not stream.has_pending():
                    channel.idle = True
                else:
                    green.yield_()
            elif hand_back and not stream.has_pending():
                return True

    def _serve_request(self, message: Message) -> bool:
        started = _perf_counter()
        io = self._io
        response = Response(io, message, self._server_header)
        try:
            environ = request_environ(self._base, message)
        except RequestError as exc:
            _refuse(io, self._client, exc)
            return False

        stream = self.stream
        body = environ["wsgi.input"] = RequestBody(
            stream, message, response.send_continue if message.expect_continue else None
        )
        keep_alive = False
        slot = self._slot
        token = 0
        meter = self._meter
        app_started = 0.0
        try:
            if slot is not None:
                request_id = environ.get("HTTP_X_REQUEST_ID")
                token = slot.begin(
                    message.method,
                    message.path,
                    request_id if isinstance(request_id, str) else "",
                )
            before = self._before
            if before is not None:
                before(environ, message)
            keep_serving = self._keep_serving
            if keep_serving is not None and not keep_serving():
                message.close_after = True  # the response says Connection: close
                response.keep_alive = False
            if meter is not None:
                if meter.flask:
                    response.route_environ = environ
                app_started = _perf_counter()
            keep_alive = _run_app(self._app, environ, response, self._plain)
        except InvalidBody as exc:
            log.warning("Invalid request body from ip=%s: %s", _peer(self._client), exc)
            if not response.headers_sent:
                _refuse(io, self._client, exc, logged=True)
        except ResponseError as exc:
            log.error("Error handling request %s: %s", message.request_line, exc)
            _fail(response)
        except ConnectionLost:
            raise
        except Exception:
            log.exception("Error handling request %s", message.request_line)
            _fail(response)
        finally:
            if slot is not None or meter is not None:
                # The queue time the middleware noted; shedding is decided by it.
                queued = environ.get(_QUEUE_TIME_KEY)
                waited = queued if isinstance(queued, float) else None
                shed = waited is not None and environ.get(_SHED_KEY) is True
                if meter is not None and app_started:
                    # 101: the app took the connection over (seen when it returned, or,
                    # when it raised, in the environ), whatever status it started.
                    if response.taken_over or (
                        not response.status_code and environ.get(TAKEN_OVER_KEY)
                    ):
                        status = 101
                    else:
                        status = response.status_code or 500
                    try:
                        meter.record(
                            environ,
                            response.route,
                            status,
                            _perf_counter() - app_started,
                            waited,
                            shed,
                        )
                    except Exception:
                        log.exception("Error recording the request's metrics")
                if slot is not None:
                    if waited is not None:
                        slot.note_queue(waited, shed)
                    if token:
                        slot.request_ended(token)
            after = self._after
            if after is not None:
                sent = response.headers_sent
                record = RequestRecord(
                    message.request_line,
                    message.method,
                    message.target,
                    response.status if sent else "",
                    response.status_code if sent else 0,
                    response.sent,
                    _perf_counter() - started,
                    self._client,
                    message.headers,
                    response.app_headers,
                )
                try:
                    after(environ, record)
                except Exception:
                    log.exception("Error in the after-request hook")
                    keep_alive = False
        if not keep_alive or message.error is not None:
            return False
        if not body.finished:
            if body.continue_pending:
                return False  # the client may still be waiting before it sends the body
            try:
                return body.drain(self._config.drain_limit)
            except InvalidBody:
                return False
        return True


def _run_app(app: WSGIApp, environ: Environ, response: Response, plain: bool) -> bool:
    # What the application returns is checked as it is sent (bytes, nothing else).
    result: Iterable[object] = app(environ, response.start_response)
    try:
        if environ.get(TAKEN_OVER_KEY):
            response.taken_over = True
            return False  # the app answered on the socket itself: write nothing more
        if type(result) is list and len(result) == 1:
            response.finish_one(result[0])
        elif _one_block(result):
            # PEP 3333: an iterable whose len() is 1 (a middleware's wrapper of a list)
            # gets a Content-Length too, and goes out in one write.
            response.finish_one(next(iter(result), b""))
        elif isinstance(result, FileWrapper) and response.send_file(result.filelike, plain):
            pass
        else:
            for data in result:
                response.write(data)
            response.finish()
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return response.keep_alive


def _one_block(result: Iterable[object]) -> bool:
    size = getattr(result, "__len__", None)
    if size is None or type(result) is list or isinstance(result, FileWrapper):
        return False
    try:
        return bool(size() == 1)
    except Exception:
        return False


def _fail(response: Response) -> None:
    """Answers 500 after an application error, or closes if the response has started."""
    if response.headers_sent:
        return
    response.status = ""
    response.start_response(
        "500 Internal Server Error",
        [("Content-Type", "text/plain"), ("Content-Length", "21")],
        None,
    )
    response.keep_alive = False
    response.finish(b"Internal Server Error")


def _refuse(sock: socket.socket, client: Any, exc: RequestError, logged: bool = False) -> None:
    if not logged:
        log.warning("Invalid request from ip=%s: %s", _peer(client), exc)
    body = exc.reason.encode("latin-1")
    head = (
        f"HTTP/1.1 {exc.status} {exc.reason}\r\nConnection: close\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    with contextlib.suppress(OSError):
        sock.sendall(head + body)


def _peer(client: Any) -> str:
    return str(client[0]) if isinstance(client, tuple) else str(client) or "unix socket"
