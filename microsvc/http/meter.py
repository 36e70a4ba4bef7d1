"""The request path's part of the request metrics (`--metrics`), compiled with it.

`microsvc.metrics.recorder.RequestRecorder` places each series' values in the worker's
metrics files (shared memory) the first time the series is seen; `PlacedValues` holds
those places and adds a request to them: its count, its duration in the histogram,
its queue time, whether it was shed. `RequestMeter` is what microsvc's HTTP engine
calls once a response has ended (`Hooks.meter`): it names the request's series (method,
route, status) and records it, through the recorder for a series not placed yet. With
gunicorn's engine, `microsvc.metrics.wsgi.InstrumentedApp` records through the
recorder, which uses the same `PlacedValues`.

A Flask app's route is its URL rule, read while Flask serves the request: the engine's
`start_response` calls `note_flask_route` (Flask keeps its request object in the
environ only until the app returns).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, TypeAlias

from microsvc.wsgi import QUEUE_TIME_KEY, ROUTE_KEY, SHED_KEY, Environ

#: Where werkzeug keeps the request object of the environ (Flask's has `url_rule`) while
#: Flask serves the request.
FLASK_REQUEST_KEY = "werkzeug.request"

#: A series' places: counter view and index, histogram view, sum index, bucket indices.
Series: TypeAlias = "tuple[Any, int, Any, int, tuple[int, ...]]"
#: The places every request touches: queue-time histogram view, sum index and bucket
#: indices, shed counter view and index, in-flight gauge view and index (None, 0
#: without the gauge).
Fixed: TypeAlias = "tuple[Any, int, tuple[int, ...], Any, int, Any, int]"


def note_flask_route(environ: Environ) -> None:
    """Notes the URL rule Flask matched as the request's route (nothing when none)."""
    rule = getattr(environ.get(FLASK_REQUEST_KEY), "url_rule", None)
    if rule is not None:
        route = getattr(rule, "rule", None)
        if isinstance(route, str):
            environ[ROUTE_KEY] = route


class PlacedValues:
    """The values requests add to, where the recorder placed them (views of float64
    arrays in shared memory, and indices in them)."""

    def __init__(self, duration_bounds: tuple[float, ...], queue_bounds: tuple[float, ...]) -> None:
        self.duration_bounds = duration_bounds
        self.queue_bounds = queue_bounds
        #: Placed series, by (method, route, status).
        self.series: dict[tuple[str, str, str], Series] = {}
        #: The values every request touches, once placed.
        self.fixed: Fixed | None = None

    def record(
        self, key: tuple[str, str, str], seconds: float, waited: float | None, shed: bool
    ) -> bool:
        """Adds a request to its series; False when the series or the values every
        request touches are not placed yet (the recorder records it then)."""
        fixed = self.fixed
        series = self.series.get(key)
        if fixed is None or series is None:
            return False
        counts, count_at, durations, sum_at, buckets = series
        counts[count_at] += 1.0
        durations[sum_at] += seconds
        durations[buckets[bisect_left(self.duration_bounds, seconds)]] += 1.0
        self.record_fixed(fixed, waited, shed)
        return True

    def record_fixed(self, fixed: Fixed, waited: float | None, shed: bool) -> None:
        """Adds a request's queue time, shed count and end in flight to `fixed`."""
        queue, queue_sum_at, queue_buckets, shed_counts, shed_at, gauges, in_flight_at = fixed
        if waited is not None:
            queue[queue_sum_at] += waited
            queue[queue_buckets[bisect_left(self.queue_bounds, waited)]] += 1.0
        if shed:
            shed_counts[shed_at] += 1.0
        if gauges is not None:
            gauges[in_flight_at] -= 1.0

    def clear(self) -> None:
        self.series.clear()
        self.fixed = None


class RequestMeter:
    """Records each request the engine served (see the module docstring).

    `recorder` places new series and records what is not placed (its `finished`);
    `placed` is its `PlacedValues`; `methods` the methods counted under their own name
    (any other is `other`); `flask`: whether routes are Flask's URL rules (a request
    with none is `(unmatched)`, else `(unknown)`); `lock`: held while writing when
    several threads record at once (None: one at a time)."""

    def __init__(
        self,
        recorder: Any,
        placed: PlacedValues,
        methods: frozenset[str],
        flask: bool,
        lock: Any = None,
    ) -> None:
        self.recorder = recorder
        self.placed = placed
        self.methods = methods
        self.flask = flask
        self.default_route = "(unmatched)" if flask else "(unknown)"
        self.lock = lock

    def record(self, environ: Environ, status: str, seconds: float) -> None:
        """A response ended: `status`, its three digits (101 for a connection the app
        took over, 500 when the app failed before it started one), `seconds` from the
        call of the app to the end of the response."""
        method = environ.get("REQUEST_METHOD")
        if not isinstance(method, str) or method not in self.methods:
            method = "other"
        route = environ.get(ROUTE_KEY)
        if not isinstance(route, str):
            route = self.default_route
        queued = environ.get(QUEUE_TIME_KEY)
        waited = queued if isinstance(queued, float) else None
        shed = bool(environ.get(SHED_KEY))
        key = (method, route, status)
        lock = self.lock
        if lock is None:
            placed = self.placed.record(key, seconds, waited, shed)
        else:
            lock.acquire()
            try:
                placed = self.placed.record(key, seconds, waited, shed)
            finally:
                lock.release()
        if not placed:
            self.recorder.finished(key, seconds, waited, shed)
