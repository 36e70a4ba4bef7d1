"""The request path's part of the request metrics (`--metrics`), compiled with it.

`microsvc.metrics.recorder.RequestRecorder` places each series' values in the worker's
metrics files (shared memory) the first time the series is seen; `PlacedValues` holds
those places and adds a request to them: its duration in the series' histogram (whose
count is the request counter: `microsvc.metrics.instruments`), and its queue time,
whether it was shed and its end in flight where there is one to note. A request
writes two floats when nothing else is to be noted: each value a request touches is
a cache line to fetch on a busy worker, and these cost more than the arithmetic.

`RequestMeter` is what microsvc's HTTP engine calls once a response has ended
(`Hooks.meter`): it names the request's series (method, route, status) and records it,
through the recorder for a series not placed yet. With gunicorn's engine,
`microsvc.metrics.wsgi.InstrumentedApp` records through the recorder, which uses the
same `PlacedValues`.

A Flask app's route is its URL rule, read while Flask serves the request: the engine's
`start_response` reads it with `flask_route` and keeps it on the response (Flask keeps
its request object in the environ only until the app returns); `InstrumentedApp` notes
it in the environ (`note_flask_route`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Final, TypeAlias

from microsvc.wsgi import ROUTE_KEY, Environ

#: Where werkzeug keeps the request object of the environ (Flask's has `url_rule`) while
#: Flask serves the request.
FLASK_REQUEST_KEY: Final = "werkzeug.request"

# Names the compiled functions below use on every request, bound as Final: compiled, a
# Final module name is a C variable, any other is looked up in the module's dictionary
# at each use.
_ROUTE_KEY: Final = ROUTE_KEY
_bisect_left: Final = bisect_left
#: The status labels, one str per status code, reused: a series' key is then found by
#: identity, with no new string to make, hash and compare for each request.
_STATUS_LABELS: Final = {code: str(code) for code in range(100, 600)}

#: A series' places: its histogram's view, sum index and bucket indices. The indices
#: are ints, typed Any: compiled, they are handed to the view as the objects they are,
#: not unboxed and boxed again for each request.
Series: TypeAlias = "tuple[Any, Any, tuple[Any, ...]]"
#: The places every request may touch: queue-time histogram view, sum index and bucket
#: indices, shed counter view and index, in-flight gauge view and index (None, 0
#: without the gauge).
Fixed: TypeAlias = "tuple[Any, Any, tuple[Any, ...], Any, Any, Any, Any]"


def flask_route(environ: Environ) -> str | None:
    """The URL rule Flask matched for the request of `environ` (None: none)."""
    rule = getattr(environ.get(FLASK_REQUEST_KEY), "url_rule", None)
    if rule is not None:
        route = getattr(rule, "rule", None)
        if isinstance(route, str):
            return route
    return None


def note_flask_route(environ: Environ) -> None:
    """Notes the URL rule Flask matched as the request's route (nothing when none)."""
    route = flask_route(environ)
    if route is not None:
        environ[_ROUTE_KEY] = route


class PlacedValues:
    """The values requests add to, where the recorder placed them (views of float64
    arrays in shared memory, and indices in them)."""

    def __init__(self, duration_bounds: tuple[float, ...], queue_bounds: tuple[float, ...]) -> None:
        self.duration_bounds = duration_bounds
        self.queue_bounds = queue_bounds
        #: A request that took at most this long is in the first bucket, found without a
        #: search: the requests for which recording costs the most, relatively.
        self.first_bound = duration_bounds[0] if duration_bounds else float("inf")
        #: Placed series, by (method, route, status).
        self.series: dict[tuple[str, str, str], Series] = {}
        #: The values every request may touch, once placed (`place_fixed`).
        self.fixed: Fixed | None = None
        #: Whether `fixed` has an in-flight gauge (every request ends there).
        self.gauged = False

    def place_fixed(self, fixed: Fixed) -> None:
        self.fixed = fixed
        self.gauged = fixed[5] is not None

    def record(
        self, key: tuple[str, str, str], seconds: float, waited: float | None, shed: bool
    ) -> bool:
        """Adds a request to its series; False when the series or the values every
        request may touch are not placed yet (the recorder records it then)."""
        fixed = self.fixed
        series = self.series.get(key)
        if fixed is None or series is None:
            return False
        durations, sum_at, buckets = series
        durations[sum_at] += seconds
        if seconds <= self.first_bound:
            durations[buckets[0]] += 1.0
        else:
            durations[buckets[_bisect_left(self.duration_bounds, seconds)]] += 1.0
        if waited is not None or shed or self.gauged:
            self.record_fixed(fixed, waited, shed)
        return True

    def record_fixed(self, fixed: Fixed, waited: float | None, shed: bool) -> None:
        """Adds a request's queue time, shed count and end in flight to `fixed`."""
        queue, queue_sum_at, queue_buckets, shed_counts, shed_at, gauges, in_flight_at = fixed
        if waited is not None:
            queue[queue_sum_at] += waited
            queue[queue_buckets[_bisect_left(self.queue_bounds, waited)]] += 1.0
        if shed:
            shed_counts[shed_at] += 1.0
        if gauges is not None:
            gauges[in_flight_at] -= 1.0

    def clear(self) -> None:
        self.series.clear()
        self.fixed = None
        self.gauged = False


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

    def record(
        self,
        environ: Environ,
        route: str | None,
        status: int,
        seconds: float,
        waited: float | None,
        shed: bool,
    ) -> None:
        """A response ended: `route`, the one Flask matched (None: the environ's, if it
        names one), `status`, its code (101 for a connection the app took over, 500 when
        the app failed before it started a response), `seconds` from the call of the app
        to the end of the response, `waited` its queue time (None: unknown), `shed`
        whether it was answered 503 for it."""
        method = environ.get("REQUEST_METHOD")
        if not isinstance(method, str) or method not in self.methods:
            method = "other"
        if route is None:
            named = environ.get(_ROUTE_KEY)
            route = named if isinstance(named, str) else self.default_route
        label = _STATUS_LABELS.get(status)
        key = (method, route, label if label is not None else str(status))
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
