"""Prometheus metrics for the whole server (`--metrics`).

`MetricsService` is what the master runs: a private metrics store (see `store`), its
own worker counters (see `instruments`), and the exporter process that serves
/metrics on `--metrics-bind` (see `exporter`). Workers record their requests through
`InstrumentedApp` (see `wsgi`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from microsvc.http.meter import RequestMeter
from microsvc.metrics.exporter import METRICS_PATH, Exporter
from microsvc.metrics.instruments import (
    EXIT_REASONS,
    METHODS,
    RequestMetrics,
    ServerMetrics,
    enable_multiprocess,
)
from microsvc.metrics.recorder import RequestRecorder
from microsvc.metrics.store import MetricsStore
from microsvc.metrics.wsgi import InstrumentedApp, is_flask
from microsvc.serving.middleware import ROUTE_KEY
from microsvc.wsgi import WSGIApp

__all__ = ["EXIT_REASONS", "METRICS_PATH", "ROUTE_KEY", "MetricsService"]


#: Worker classes whose requests are recorded by one thread at a time (sync: one
#: thread; gevent, eventlet: green threads); any other decides in the worker.
_THREADS = {"sync": False, "gevent": False, "eventlet": False}


class MetricsService:
    """Metrics of one server, owned by its master. Raises BindError when `address` is
    taken. Create it before the app is imported and workers are forked. With
    `scoreboard` (its file), /metrics also has the gauges read from it."""

    def __init__(
        self,
        address: str,
        *,
        version: str,
        worker_class: str,
        scoreboard: Path | None = None,
    ) -> None:
        self.address = address
        self._scoreboard = scoreboard
        self._worker_class = str(worker_class)
        self.store = MetricsStore.create()
        try:
            enable_multiprocess(str(self.store.path))
            self.exporter = Exporter(self.store, address, scoreboard)
        except BaseException:
            self.store.remove()
            raise
        self.server = ServerMetrics(version, worker_class)
        self._master_pid = os.getpid()

    @property
    def url(self) -> str:
        host, port = self.exporter.socket.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}{METRICS_PATH}"

    def start(self) -> None:
        self.exporter.start()

    @property
    def recorded_by_the_engine(self) -> bool:
        """Whether microsvc's HTTP engine records each request itself (`meter`), with no
        wrapper around the app: when the scoreboard holds the requests in flight."""
        return self._scoreboard is not None

    def meter(self, user_app: WSGIApp | None) -> RequestMeter:
        """In a worker on microsvc's HTTP engine: what the engine records each request
        with; routes are read from `user_app` when it is a Flask app (None: not loaded)."""
        recorder = RequestRecorder(
            RequestMetrics(), in_flight=False, threads=_THREADS.get(self._worker_class)
        )
        return RequestMeter(
            recorder,
            recorder.placed,
            frozenset(METHODS),
            user_app is not None and is_flask(user_app),
            recorder.write_lock(),
        )

    def instrument(self, app: WSGIApp, user_app: WSGIApp | None = None) -> InstrumentedApp:
        """`app` with request metrics; routes are read from `user_app` (the app `app`
        wraps) when it is a Flask app."""
        return InstrumentedApp(
            app,
            routes_from=user_app,
            # With a scoreboard, the exporter reads requests in flight from it.
            in_flight=self._scoreboard is None,
            threads=_THREADS.get(self._worker_class),
        )

    # in the master

    def worker_started(self) -> None:
        self.server.worker_started()

    def worker_exited(self, pid: int, stopped_for: str | None) -> str:
        """Count a reaped worker's exit and fold its files away; returns the reason:
        `stopped_for` (what the master knows: the reason the worker gave in its
        scoreboard slot, or why the master stopped it), else crash."""
        reason = stopped_for or "crash"
        self.server.worker_exited(reason)
        self.store.compact(keep=frozenset((self._master_pid,)))
        return reason

    def check(self, log: Any) -> None:
        """On each turn of the master loop: keep the exporter running."""
        self.exporter.check(log)

    def reap(self) -> None:
        """Before the master reaps its workers: collect the exporter's exit status if
        it has ended (reaping every child would take it)."""
        self.exporter.reap()

    def close(self) -> None:
        """When the master stops."""
        self.exporter.stop()
        self.store.remove()

    # in a worker

    def in_worker(self) -> None:
        """After fork: the worker has no use for the metrics listener."""
        self.exporter.close_in_child()
