"""Request metrics around a WSGI app: count, latency and requests in flight.

Each request is counted once, when its response ends (the server closes the response
iterable), under its method, route and status:

- route: a Flask app's URL rule (`/items/<int:id>`), read when Flask has matched the
  request; any other app may put a route template in `environ["microsvc.route"]`.
  A request Flask matched no rule for is `(unmatched)`; a request of another app that
  named no route is `(unknown)`. Raw paths never become label values, so a client
  cannot make the number of series grow.
- method: the standard methods as they are, any other as `other`.
- status: the three digits the app started the response with; 500 when the app raised
  before starting one (the server answers 500 then); 101 when the server marked the
  request with `TAKEN_OVER_KEY` (the app took the connection over and answered on the
  socket itself, as eventlet's websocket does for its 101 Switching Protocols).

The duration runs from the call of the app to the end of the response body. A
`wsgi.file_wrapper` response is returned as it is (the server may send it with
sendfile) and recorded when the app returns it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from microsvc.metrics.instruments import METHODS, RequestMetrics
from microsvc.serving.middleware import ROUTE_KEY
from microsvc.wsgi import Environ, StartResponse, WSGIApp

UNMATCHED = "(unmatched)"
UNKNOWN = "(unknown)"
#: Set to True in the environ by a worker when the app took the connection over.
TAKEN_OVER_KEY = "microsvc.taken_over"


class _Request:
    """One request being served, in one object: the start_response handed to the app
    (it notes the status) and the response iterable handed back to the server (the
    request is recorded when the server closes it)."""

    __slots__ = ("body", "closed", "environ", "meter", "start_response", "started", "status")

    def __init__(
        self, meter: InstrumentedApp, environ: Environ, start_response: StartResponse
    ) -> None:
        self.meter = meter
        self.environ = environ
        self.start_response = start_response
        self.started = time.perf_counter()
        self.status = "500"
        self.closed = False
        self.body: Iterable[bytes] = ()

    def __call__(self, status: str, headers: Any, exc_info: Any = None) -> Any:
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
            self.finish()

    def finish(self) -> None:
        if not self.closed:
            self.closed = True
            status = "101" if self.environ.get(TAKEN_OVER_KEY) else self.status
            self.meter.record(self.environ, status, time.perf_counter() - self.started)


class InstrumentedApp:
    """`app` with request metrics (see the module docstring). `routes_from` is the
    user's app when `app` wraps it (routes are read from a Flask app there)."""

    def __init__(
        self,
        app: WSGIApp,
        metrics: RequestMetrics | None = None,
        *,
        routes_from: WSGIApp | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics or RequestMetrics()
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._default_route = UNKNOWN
        _watch_flask_routes(routes_from or app, self)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        request = _Request(self, environ, start_response)
        self.metrics.in_flight.inc()
        try:
            body = self.app(environ, request)
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
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            series = self._series.setdefault(
                key,
                (self.metrics.requests.labels(*key), self.metrics.duration.labels(*key)),
            )
        counter, histogram = series
        counter.inc()
        histogram.observe(seconds)
        self.metrics.in_flight.dec()


def _watch_flask_routes(app: WSGIApp, meter: InstrumentedApp) -> None:
    """For a Flask app, name each request's route from the URL rule Flask matched."""
    try:
        import flask
    except ImportError:  # pragma: no cover - flask is a dependency
        return
    if not isinstance(app, flask.Flask):
        return
    meter._default_route = UNMATCHED

    def remember_route(sender: flask.Flask, **_: Any) -> None:
        rule = flask.request.url_rule
        if rule is not None:
            flask.request.environ[ROUTE_KEY] = rule.rule

    flask.request_started.connect(remember_route, app, weak=False)
