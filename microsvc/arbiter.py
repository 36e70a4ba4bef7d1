"""The master process: gunicorn's arbiter plus readiness and a drain period on TERM."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from microsvc._gunicorn import Arbiter

if TYPE_CHECKING:
    from microsvc.metrics import MetricsService

#: Signals by which the master stops a worker (SIGABRT: a worker that timed out).
_STOPPING_SIGNALS = frozenset(
    (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGKILL, signal.SIGABRT)
)


class ServerState:
    """Flags the master shares with the workers it forks, in shared memory.

    `ready`: every worker of the first generation has loaded the app.
    `draining`: TERM arrived and the drain period runs; readiness answers 503.
    """

    def __init__(self) -> None:
        self._booted = multiprocessing.Value(ctypes.c_int, 0)
        self._ready = multiprocessing.RawValue(ctypes.c_bool, False)
        self._draining = multiprocessing.RawValue(ctypes.c_bool, False)

    def worker_booted(self) -> None:
        with self._booted.get_lock():
            self._booted.value += 1

    @property
    def booted(self) -> int:
        return int(self._booted.value)

    @property
    def ready(self) -> bool:
        return bool(self._ready.value)

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready.value = value

    @property
    def draining(self) -> bool:
        return bool(self._draining.value)

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining.value = value

    def is_ready(self) -> bool:
        """What the readiness path answers: started, and not draining."""
        return self.ready and not self.draining


class MicrosvcArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter; on TERM with a drain period it first turns readiness to 503
    and keeps serving for that period, then stops gracefully. A second TERM, INT or
    QUIT stops at once, as in gunicorn.

    With `metrics`, it counts the workers it starts and, for each worker that ends, the
    reason: the one the worker gave (recycling), else why the master stopped it
    (reload, shutdown, scale-down, timeout), else a crash.
    """

    def __init__(
        self,
        app: Any,
        state: ServerState,
        drain_period: float,
        metrics: MetricsService | None = None,
    ) -> None:
        self.state = state
        self.drain_period = drain_period
        self.metrics = metrics
        self._drain_deadline: float | None = None
        self._stopping_for = "scale-down"
        self._stopped_for: dict[int, str] = {}
        super().__init__(app)

    # why workers end

    @contextlib.contextmanager
    def _stopping(self, reason: str) -> Iterator[None]:
        outer, self._stopping_for = self._stopping_for, reason
        try:
            yield
        finally:
            self._stopping_for = outer

    def kill_worker(self, pid: int, sig: int) -> None:
        if sig in _STOPPING_SIGNALS:
            self._stopped_for.setdefault(pid, self._stopping_for)
        known = pid in self.WORKERS
        try:
            super().kill_worker(pid, sig)
        finally:
            if known and pid not in self.WORKERS:  # it was already gone
                self._worker_gone(pid)

    def reload(self) -> None:
        with self._stopping("reload"):
            super().reload()

    def stop(self, graceful: bool = True) -> None:
        with self._stopping("shutdown"):
            super().stop(graceful)

    def murder_workers(self) -> None:
        with self._stopping("timeout"):
            super().murder_workers()

    def spawn_worker(self) -> Any:
        pid = super().spawn_worker()  # returns in the master only
        if self.metrics is not None:
            self.metrics.worker_started()
        return pid

    def reap_workers(self) -> None:
        before = set(self.WORKERS)
        try:
            super().reap_workers()
        finally:
            for pid in before - set(self.WORKERS):
                self._worker_gone(pid)

    def _worker_gone(self, pid: int) -> None:
        stopped_for = self._stopped_for.pop(pid, None)
        if self.metrics is not None:
            try:
                self.metrics.worker_exited(pid, stopped_for)
            except OSError as exc:
                self.log.warning("Metrics: cannot account for worker %s: %s", pid, exc)

    def handle_term(self) -> None:
        if self.drain_period > 0 and self._drain_deadline is None:
            self.state.draining = True
            self._drain_deadline = time.monotonic() + self.drain_period
            self.log.info(
                "Draining for %gs: readiness answers 503 while requests are still served",
                self.drain_period,
            )
            return
        raise StopIteration

    def maybe_promote_master(self) -> None:
        # Called on every turn of the master loop (at least once a second).
        super().maybe_promote_master()
        if self.metrics is not None:
            self.metrics.check(self.log)
        if not self.state.ready and self.state.booted >= self.num_workers:
            self.state.ready = True
            self.log.info("Ready: %d workers booted", self.num_workers)
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self.log.info("Drain period over, shutting down gracefully")
            raise StopIteration
