"""The metrics microsvc records, by the process that records them.

Workers record requests (`RequestMetrics`); the master records its workers
(`ServerMetrics`). Both write prometheus_client multiprocess files: create them only
after `enable_multiprocess()`. They are registered in no registry of this process;
the exporter reads what every process wrote.

The request counter, `microsvc_http_requests_total`, is not written by anyone: every
request answered is observed once in the duration histogram of its series (method,
route, status), so the counter is that histogram's count, exported as a counter of its
own (`request_counter`). A request costs one write less, and the two can never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily

from microsvc.observe.scoreboard import REASONS

#: Latency buckets in seconds, from a cached answer to a slow dependency.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Why a worker stopped. The worker names the first three itself; the master knows
#: when it stopped one; anything else is a crash (killed, or exited unasked).
EXIT_REASONS = REASONS

#: Methods kept as label values; any other is counted as "other".
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"))


def enable_multiprocess(directory: str) -> None:
    """Make prometheus_client write its values to `directory`, in this process and in
    the processes it forks or starts, also when it was imported before (an app that
    defines its own metrics)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if not getattr(prometheus_values.ValueClass, "_multiprocess", False):
        prometheus_values.ValueClass = prometheus_values.MultiProcessValue()


#: The labels of a request's series.
REQUEST_LABELS = ("method", "route", "status")
#: The request counter (`request_counter`) and the histogram it is read from.
REQUESTS = "microsvc_http_requests"
DURATION = "microsvc_http_request_duration_seconds"


def request_counter(families: Iterable[Any]) -> CounterMetricFamily | None:
    """The request counter, by method, route and status: the count of each series of the
    duration histogram among `families` (None when it is not among them). A series
    without the three labels is left out."""
    for family in families:
        if family.name != DURATION:
            continue
        counter = CounterMetricFamily(
            REQUESTS, "HTTP requests answered, by method, route and status.", labels=REQUEST_LABELS
        )
        count = DURATION + "_count"
        for sample in family.samples:
            if sample.name != count:
                continue
            values = [sample.labels.get(label) for label in REQUEST_LABELS]
            if None not in values:
                counter.add_metric(values, sample.value)
        return counter
    return None


class _RequestCounter:
    """`request_counter` of a histogram in this process's registry."""

    def __init__(self, duration: prometheus_client.Histogram) -> None:
        self.duration = duration

    def collect(self) -> list[CounterMetricFamily]:
        counter = request_counter(self.duration.collect())
        return [] if counter is None else [counter]


class RequestMetrics:
    """What a worker records about the requests it serves (`registry`: where to
    register them too, for reading them in this process). The request counter is read
    from `duration` (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.duration = prometheus_client.Histogram(
            DURATION,
            "Time from receiving an HTTP request to sending the end of its response.",
            REQUEST_LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        if registry is not None:
            registry.register(_RequestCounter(self.duration))
        self.in_flight = prometheus_client.Gauge(
            "microsvc_http_requests_in_flight",
            "HTTP requests being served right now, in all workers.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.queue_time = prometheus_client.Histogram(
            "microsvc_http_request_queue_seconds",
            "Time a request waited before a worker took it up: from a trusted proxy's "
            "X-Request-Start, else since the kernel received it.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.shed = prometheus_client.Counter(
            "microsvc_http_requests_shed",
            "Requests answered 503 without running the app: they had waited longer than "
            "--max-queue-time.",
            registry=registry,
        )


class ServerMetrics:
    """What the master records about its workers."""

    def __init__(self, version: str, worker_class: str) -> None:
        self.starts = prometheus_client.Counter(
            "microsvc_worker_starts", "Worker processes started.", registry=None
        )
        self.exits = prometheus_client.Counter(
            "microsvc_worker_exits",
            "Worker processes that stopped, by reason: max-requests, memory, lifetime "
            "(recycled), reload, shutdown, scale-down, timeout (stopped by the master), "
            "crash (anything else).",
            ("reason",),
            registry=None,
        )
        self.workers = prometheus_client.Gauge(
            "microsvc_workers",
            "Worker processes running now.",
            registry=None,
            multiprocess_mode="livesum",
        )
        self.info = prometheus_client.Gauge(
            "microsvc_info",
            "The microsvc version and worker class of this server (always 1).",
            ("version", "worker_class"),
            registry=None,
            multiprocess_mode="livemax",
        )
        self.workers_target = prometheus_client.Gauge(
            "microsvc_workers_target",
            "With --autoscale, the worker count it keeps now (0 without --autoscale).",
            registry=None,
            multiprocess_mode="livemax",
        )
        self.scaled = prometheus_client.Counter(
            "microsvc_autoscale_changes",
            "Changes of the worker count by --autoscale, by direction (up, down).",
            ("direction",),
            registry=None,
        )
        for reason in EXIT_REASONS:
            self.exits.labels(reason)
        for direction in ("up", "down"):
            self.scaled.labels(direction)
        self.info.labels(version, worker_class).set(1)

    def worker_count_set(self, count: int, direction: str | None = None) -> None:
        """--autoscale keeps `count` workers now; `direction` (up, down) when it changed
        the count."""
        self.workers_target.set(count)
        if direction is not None:
            self.scaled.labels(direction).inc()

    def worker_started(self) -> None:
        self.starts.inc()
        self.workers.inc()

    def worker_exited(self, reason: str) -> None:
        self.exits.labels(reason if reason in EXIT_REASONS else "crash").inc()
        self.workers.dec()
