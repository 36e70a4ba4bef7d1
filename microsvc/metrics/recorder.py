"""Recording a worker's request metrics at a small, fixed cost per request.

`RequestRecorder` writes what microsvc's HTTP engine (`microsvc.http.meter`) or, with
gunicorn's engine, `InstrumentedApp` measured into the metrics of `RequestMetrics`: the
duration histogram of the request's series (method, route, status; its count is the
request counter), the queue-time histogram, the shed counter and, with `in_flight`, the
in-flight gauge (under `--metrics` with a scoreboard the exporter reads requests in
flight from the scoreboard, where each worker notes them anyway, and workers leave the
gauge alone). In prometheus_client's multiprocess mode (always, under `--metrics`) it
writes each value in place in the worker's own files (`store.InPlaceValues`): the places
of a series are looked up once, the first time the series is seen, and a request then
costs a dictionary lookup, a bucket search and two float additions in shared memory
(more when it has a queue time, was shed, or `in_flight` is kept). Threads of a gthread
worker record at the same time and write under a lock; a worker with one thread (sync)
or green threads (gevent, eventlet: none switches to another in the middle of a write)
needs none, as for the scoreboard (`threads`: None decides in the worker, on its first
request, as `Scoreboard.attach` does).

Nothing is buffered: a value is in the worker's file, where the exporter reads it, as
soon as the request is recorded. A worker killed with SIGKILL loses only what it had
not recorded yet: its requests in flight, and at most one request whose values were
being written at that moment (one thread writes at a time): its duration may be in
the file without its bucket, or the other way round.

Without multiprocess mode (metrics read in the same process, as tests do), or when a
value cannot be placed, it records through prometheus_client's own methods.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from microsvc.http.meter import Fixed, PlacedValues
from microsvc.metrics.instruments import RequestMetrics
from microsvc.metrics.store import InPlaceValues
from microsvc.serving.patching import green_threads

_recorders: weakref.WeakSet[RequestRecorder] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for recorder in list(_recorders):
        recorder._forget()


os.register_at_fork(after_in_child=_forget_after_fork)


class RequestRecorder:
    """Records requests into `metrics` (see the module docstring)."""

    def __init__(
        self, metrics: RequestMetrics, *, in_flight: bool = True, threads: bool | None = True
    ) -> None:
        self.metrics = metrics
        #: Whether this recorder writes the in-flight gauge.
        self.in_flight = in_flight
        self._threads_given = threads
        self._lock = threading.Lock()
        self._places = InPlaceValues()
        #: Placed values: those every request touches, and those of each series (the
        #: request path adds to them, compiled: `microsvc.http.meter`).
        self.placed = PlacedValues(
            tuple(metrics.duration._upper_bounds), tuple(metrics.queue_time._upper_bounds)
        )
        #: Series written through their histogram.
        self._unplaced: dict[tuple[str, str, str], Any] = {}
        #: False once the fixed values could not be placed: all goes through the metrics.
        self._in_place = True
        _recorders.add(self)

    def started(self) -> None:
        """A request is in flight (only with `in_flight`)."""
        with self._lock:
            fixed = self.placed.fixed or self._place_fixed()
            if fixed is None:
                self.metrics.in_flight.inc()
            else:
                gauges = fixed[5]
                if gauges is not None:
                    gauges[fixed[6]] += 1.0

    #: Whether requests are recorded without the lock (known on the first request).
    _unlocked = False

    def finished(
        self, key: tuple[str, str, str], seconds: float, waited: float | None, shed: bool
    ) -> None:
        """A request ended: count it under `key` (method, route, status) with its
        duration, its queue time (None: unknown) and whether it was shed."""
        if self._unlocked:
            self._finished(key, seconds, waited, shed)
            return
        with self._lock:
            self._finished(key, seconds, waited, shed)

    def _finished(
        self, key: tuple[str, str, str], seconds: float, waited: float | None, shed: bool
    ) -> None:
        if not self.placed.record(key, seconds, waited, shed):
            self._finished_slowly(key, seconds, waited, shed)

    def write_lock(self) -> threading.Lock | None:
        """In the worker: the lock that writers of the placed values hold, None when
        requests are recorded by one thread at a time (see the module docstring)."""
        threads = self._threads_given
        return self._lock if (not green_threads() if threads is None else threads) else None

    # the first request of a series, or values that could not be placed (under the lock)

    def _finished_slowly(
        self, key: tuple[str, str, str], seconds: float, waited: float | None, shed: bool
    ) -> None:
        fixed = self.placed.fixed or self._place_fixed()
        if key not in self.placed.series and key not in self._unplaced:
            self._add_series(key, placing=fixed is not None)
        if self.placed.record(key, seconds, waited, shed):
            return
        # The series could not be placed (a series is placed only with the fixed values).
        self._unplaced[key].observe(seconds)
        if fixed is not None:
            self.placed.record_fixed(fixed, waited, shed)
            return
        if waited is not None:
            self.metrics.queue_time.observe(waited)
        if shed:
            self.metrics.shed.inc()
        if self.in_flight:
            self.metrics.in_flight.dec()

    def _place_fixed(self) -> Fixed | None:
        threads = self._threads_given
        # In the worker, on its first request: after the fork and after monkey-patching.
        self._unlocked = not (not green_threads() if threads is None else threads)
        if not self._in_place:
            return None
        metrics = self.metrics
        in_flight = self._places.place(metrics.in_flight._value) if self.in_flight else (None, 0)
        queue = self._place_histogram(metrics.queue_time)
        shed = self._places.place(metrics.shed._value)
        if in_flight is None or queue is None or shed is None:
            self._in_place = False
            return None
        fixed: Fixed = (*queue, *shed, *in_flight)
        self.placed.place_fixed(fixed)
        return fixed

    def _add_series(self, key: tuple[str, str, str], *, placing: bool) -> None:
        histogram = self.metrics.duration.labels(*key)
        if placing:
            durations = self._place_histogram(histogram)
            if durations is not None:
                self.placed.series[key] = durations
                return
        self._unplaced[key] = histogram

    def _place_histogram(
        self, histogram: Any
    ) -> tuple[memoryview[float], int, tuple[int, ...]] | None:
        """The view, sum index and bucket indices of a histogram (its sum and buckets
        are in one file: the view placed last maps them all)."""
        places = [self._places.place(value) for value in (histogram._sum, *histogram._buckets)]
        found = [place for place in places if place is not None]
        if len(found) != len(places):
            return None
        return found[-1][0], found[0][1], tuple(index for _view, index in found[1:])

    def _forget(self) -> None:
        """In a child after a fork: the places found so far are the parent's."""
        self._lock = threading.Lock()
        self._unlocked = False
        self._places.forget()
        self.placed.clear()
        self._unplaced.clear()
