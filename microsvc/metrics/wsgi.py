"""Request metrics around a WSGI app: count, latency and requests in flight.

Each request is counted once, when its response ends (the server closes the response
iterable), under its method, route and status:

- route: a Flask app's URL rule (`/items/<int:id>`), read from Flask's request object
  in the environ when the app starts its response (nothing runs inside Flask for it);
  an exception Flask lets through (PROPAGATE_EXCEPTIONS, as in testing) starts none,
  and the request counts under `(unmatched)`. Any other app may put a route template
  in `environ["microsvc.route"]`.
  A request Flask matched no rule for is `(unmatched)`; a request of another app that
  named no route is `(unknown)`. Raw paths never become label values, so a client
  cannot make the number of series grow.
- method: the standard methods as they are, any other as `other`.
- status: the three digits the app started the response with; 500 when the app raised
  before starting one (the server answers 500 then); 101 when the server marked the
  request with `TAKEN_OVER_KEY` (the app took the connection over and answered on the
  socket itself, as eventlet's websocket does for its 101 Switching Protocols).

A request's queue time (`environ["microsvc.queue_time"]`, noted by the middleware) goes
into a histogram of its own, and a request the middleware shed is counted as shed too
(and under the route `(shed)`).

The values are written by `recorder.RequestRecorder`, in place in the worker's metrics
files. The duration runs from the call of the app to the end of the response body. A
`wsgi.file_wrapper` response is returned as it is (the server may send it with
sendfile) and recorded when the app returns it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from microsvc.http import TAKEN_OVER_KEY
from microsvc.http.meter import note_flask_route
from microsvc.metrics.instruments import METHODS, RequestMetrics
from microsvc.metrics.recorder import RequestRecorder
from microsvc.serving.middleware import QUEUE_TIME_KEY, ROUTE_KEY, SHED_KEY
from microsvc.wsgi import Environ, StartResponse, WSGIApp

UNMATCHED = "(unmatched)"
UNKNOWN = "(unknown)"

_new = object.__new__
_now = time.perf_counter


class _Request:
    """One request being served, in one object: its `start` is the start_response
    handed to the app (it notes the status) and it is the response iterable handed back
    to the server (the request is recorded when the server closes it).

    `InstrumentedApp.__call__` makes it with `_new` and sets its attributes itself, and
    hands the app the bound method `start`: a class call with `__init__` and a call of
    an instance's `__call__` each cost a pass through C, about as much as the rest."""

    __slots__ = ("body", "closed", "environ", "meter", "start_response", "started", "status")

    meter: InstrumentedApp
    environ: Environ
    start_response: StartResponse
    started: float
    status: str
    closed: bool
    body: Iterable[bytes]

    def start(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        self.status = status[:3]
        if exc_info is None:
            return self.start_response(status, headers)
        return self.start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            # `finish`, written out: this runs for every request.
            if not self.closed:
                self.closed = True
                status = "101" if self.environ.get(TAKEN_OVER_KEY) else self.status
                self.meter.record(self.environ, status, _now() - self.started)

    def finish(self) -> None:
        if not self.closed:
            self.closed = True
            status = "101" if self.environ.get(TAKEN_OVER_KEY) else self.status
            self.meter.record(self.environ, status, _now() - self.started)


class _FlaskRequest(_Request):
    """A request to a Flask app. Its route is read when the app starts the response:
    Flask's request object, with the URL rule it matched, is in the environ until the
    app returns."""

    __slots__ = ()

    def start(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        note_flask_route(self.environ)
        self.status = status[:3]
        if exc_info is None:
            return self.start_response(status, headers)
        return self.start_response(status, headers, exc_info)


class InstrumentedApp:
    """`app` with request metrics (see the module docstring). `routes_from` is the
    user's app when `app` wraps it (routes are read from a Flask app there).
    `in_flight`: whether to keep the in-flight gauge (False when the exporter reads it
    from the scoreboard); `threads`: whether requests may be recorded by several threads
    at once (see `RequestRecorder`)."""

    def __init__(
        self,
        app: WSGIApp,
        metrics: RequestMetrics | None = None,
        *,
        routes_from: WSGIApp | None = None,
        in_flight: bool = True,
        threads: bool | None = True,
    ) -> None:
        self.app = app
        self.metrics = metrics or RequestMetrics()
        self._recorder = RequestRecorder(self.metrics, in_flight=in_flight, threads=threads)
        self._in_flight = in_flight
        self._default_route = UNKNOWN
        self._request_type: type[_Request] = _Request
        _watch_flask_routes(routes_from or app, self)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        request = _new(self._request_type)
        request.meter = self
        request.environ = environ
        request.start_response = start_response
        request.status = "500"
        request.closed = False
        request.body = ()
        if self._in_flight:
            self._recorder.started()
        request.started = _now()
        try:
            body = self.app(environ, request.start)
        except BaseException:
            request.finish()
            raise
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(body, wrapper):
            request.finish()
            return body
        request.body = body
        return request

    def record(self, environ: Environ, status: str, seconds: float) -> None:
        method = environ.get("REQUEST_METHOD", "")
        if method not in METHODS:
            method = "other"
        route = environ.get(ROUTE_KEY)
        if not isinstance(route, str):
            route = self._default_route
        waited = environ.get(QUEUE_TIME_KEY)
        key = (method, route, status)
        queued = waited if isinstance(waited, float) else None
        shed = bool(environ.get(SHED_KEY))
        # `RequestRecorder.finished`, written out: one call less for every request.
        recorder = self._recorder
        if recorder._unlocked:
            recorder._finished(key, seconds, queued, shed)
        else:
            with recorder._lock:
                recorder._finished(key, seconds, queued, shed)


def is_flask(app: WSGIApp) -> bool:
    try:
        import flask
    except ImportError:  # pragma: no cover - flask is a dependency
        return False
    return isinstance(app, flask.Flask)


def _watch_flask_routes(app: WSGIApp, meter: InstrumentedApp) -> None:
    """For a Flask app, name each request's route from the URL rule Flask matched."""
    if not is_flask(app):
        return
    meter._default_route = UNMATCHED
    meter._request_type = _FlaskRequest
