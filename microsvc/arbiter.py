"""The master process: gunicorn's arbiter plus readiness and a drain period on TERM."""

from __future__ import annotations

import ctypes
import multiprocessing
import time
from typing import Any

from microsvc._gunicorn import Arbiter


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
    QUIT stops at once, as in gunicorn."""

    def __init__(self, app: Any, state: ServerState, drain_period: float) -> None:
        self.state = state
        self.drain_period = drain_period
        self._drain_deadline: float | None = None
        super().__init__(app)

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
        if not self.state.ready and self.state.booted >= self.num_workers:
            self.state.ready = True
            self.log.info("Ready: %d workers booted", self.num_workers)
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self.log.info("Drain period over, shutting down gracefully")
            raise StopIteration
