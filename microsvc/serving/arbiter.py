"""The master process: gunicorn's arbiter plus readiness and a drain period on TERM."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from microsvc._gunicorn import Arbiter
from microsvc.observe.scoreboard import MemorySample, read_memory
from microsvc.serving import signalqueue
from microsvc.serving.autoscale import ArbiterAutoscaler
from microsvc.serving.context import settings_of
from microsvc.workers.recycling import LOG_FORMAT, MEMORY_READ_INTERVAL, Recycler

if TYPE_CHECKING:
    from microsvc.config.options import Settings
    from microsvc.metrics import MetricsService
    from microsvc.observe.scoreboard import Scoreboard

#: Signals by which the master stops a worker (SIGABRT: a worker that timed out).
_STOPPING_SIGNALS = frozenset(
    (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGKILL, signal.SIGABRT)
)


class ControlSocketLine(logging.Filter):
    """gunicorn restarts its control socket in the master after every fork, and logs
    "Control socket listening at PATH" each time: a line would follow every worker that
    starts (recycles, reloads, autoscaling). This filter, on the master's error logger,
    lets the first line for a path through; the repeats only at debug level."""

    MESSAGE = "Control socket listening at %s"

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE or not isinstance(record.args, tuple) or not record.args:
            return True
        path = str(record.args[0])
        if path in self.seen:
            return self.logger.isEnabledFor(logging.DEBUG)
        self.seen.add(path)
        return True


class ServerState:
    """Flags the master shares with the workers it forks.

    `ready`: every worker of the first generation has loaded the app.
    `draining`: TERM arrived and the drain period runs; readiness answers 503.
    `booted`: how many workers have loaded the app, counted until the server is ready.

    Nothing here takes a lock, so a worker killed at any point (the OOM killer, a
    timeout) leaves nothing that another worker or the master would wait for. The flags
    are single bytes of shared memory. Each boot appends one byte to an unlinked
    temporary file opened for appending: the kernel makes each append atomic, and the
    file's size is the count. Boots after the server is ready are not counted, so the
    file stays a few bytes however often workers are replaced.
    """

    def __init__(self) -> None:
        self._boots = _append_only_temporary_file()
        weakref.finalize(self, os.close, self._boots)
        self._ready = multiprocessing.RawValue(ctypes.c_bool, False)
        self._draining = multiprocessing.RawValue(ctypes.c_bool, False)

    def worker_booted(self) -> None:
        if not self.ready:
            os.write(self._boots, b"+")

    @property
    def booted(self) -> int:
        return os.fstat(self._boots).st_size

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


def _append_only_temporary_file() -> int:
    """A descriptor of an empty, already unlinked file, open for appending only; in
    /dev/shm when it is writable (as multiprocessing's shared memory is), else in the
    temporary directory."""
    shm = "/dev/shm"
    ram = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
    fd, path = tempfile.mkstemp(prefix="microsvc-boots-", dir=ram)
    try:
        os.unlink(path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    except BaseException:
        os.close(fd)
        raise
    return fd


class MicrosvcArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter; on TERM with a drain period it first turns readiness to 503
    and keeps serving for that period, then stops gracefully. A second TERM, INT or
    QUIT stops at once, as in gunicorn.

    It recycles workers by memory and lifetime (`microsvc.workers.recycling.Recycler`):
    once a second it reads each worker's memory, and stops a worker to recycle with
    SIGTERM, as TTOU does, logging the reason once. With `--preload` it calls
    `gc.freeze()` before it forks the first worker with the app loaded, so the garbage
    collector never touches (and so never copies) the objects the workers share.

    In a master that eventlet has patched, signals are queued in a
    `microsvc.serving.signalqueue.SignalQueue`, which a signal handler interrupting
    another can use.

    With `metrics`, it counts the workers it starts and, for each worker that ends, the
    reason: the one the worker gave (max-requests, read from its scoreboard slot), else
    why the master stopped it (memory, lifetime, reload, shutdown, scale-down, timeout),
    else a crash. With `scoreboard`, it gives each worker a slot, marks the workers it
    stops and why, clears the slot of each worker that ends, and once a second writes
    workers' memory and the listen queues into it.
    """

    def __init__(
        self,
        app: Any,
        state: ServerState,
        drain_period: float,
        metrics: MetricsService | None = None,
        scoreboard: Scoreboard | None = None,
    ) -> None:
        self.state = state
        self.drain_period = drain_period
        self.metrics = metrics
        self.scoreboard = scoreboard
        self._sampled_at = 0.0
        self._drain_deadline: float | None = None
        self._stopping_for = "scale-down"
        self._stopped_for: dict[int, str] = {}
        self.recycler = Recycler()
        self._frozen = False
        super().__init__(app)
        if signalqueue.needed():  # eventlet's SimpleQueue is not safe in a signal handler
            self.SIG_QUEUE = signalqueue.SignalQueue()
        self.autoscaler = ArbiterAutoscaler.for_app(app)  # acts with --autoscale only
        error_log = getattr(self.log, "error_log", None)
        if isinstance(error_log, logging.Logger) and not any(
            isinstance(kept, ControlSocketLine) for kept in error_log.filters
        ):
            error_log.addFilter(ControlSocketLine(error_log))

    def close(self) -> None:
        """Releases what the arbiter holds after its run: the signal queue's pipe, in a
        master that eventlet patched (a program may run `Launcher` again)."""
        if isinstance(self.SIG_QUEUE, signalqueue.SignalQueue):
            self.SIG_QUEUE.close()

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
            if self.scoreboard is not None:
                self.scoreboard.stopping(pid, self._stopped_for[pid])
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
        if self.cfg.preload_app and not self._frozen:
            # The app is loaded in this process: what exists now is shared with every
            # worker. Frozen, the collector leaves it alone, so the pages stay shared.
            gc.freeze()
            self._frozen = True
        pid = super().spawn_worker()  # returns in the master only
        self.recycler.started(pid, self._settings())
        if self.scoreboard is not None:
            self.scoreboard.started(pid)
        if self.metrics is not None:
            self.metrics.worker_started()
        return pid

    def reap_workers(self) -> None:
        if self.metrics is not None:
            self.metrics.reap()  # first: gunicorn's waitpid(-1) would take its status
        before = set(self.WORKERS)
        try:
            super().reap_workers()
        finally:
            for pid in before - set(self.WORKERS):
                self._worker_gone(pid)

    def _worker_gone(self, pid: int) -> None:
        self.recycler.gone(pid)
        stopped_for = self._stopped_for.pop(pid, None)
        board = self.scoreboard
        if board is not None:
            stopped_for = board.worker_reason(pid) or stopped_for
        reason = stopped_for or "crash"
        if self.metrics is not None:
            try:
                reason = self.metrics.worker_exited(pid, stopped_for)
            except OSError as exc:
                self.log.warning("Metrics: cannot account for worker %s: %s", pid, exc)
        if board is not None:
            board.gone(pid, reason)

    # recycling by memory and lifetime

    def _settings(self) -> Settings | None:
        return settings_of(self.app)

    def _sample_and_recycle(self) -> None:
        """Once a second: read the workers' memory (when the scoreboard shows it or a
        limit needs it), publish it, and recycle the workers past their limits."""
        board = self.scoreboard
        memory: dict[int, MemorySample | None] = {}
        if board is not None or self.recycler.reads_memory:
            memory = {pid: read_memory(pid) for pid in list(self.WORKERS)}
        if board is not None:
            settings = self._settings()
            board.max_worker_memory = settings.max_worker_memory if settings else None
            board.sample(self.LISTENERS, memory)
        for decision in self.recycler.check(memory):
            pid = decision.pid
            if pid not in self.WORKERS or pid in self._stopped_for:
                continue  # already ending
            if board is not None and board.worker_reason(pid):
                continue  # stopping on its own (max-requests), with its reason logged
            self.log.info(LOG_FORMAT, pid, decision.reason)
            with self._stopping(decision.kind):
                self.kill_worker(pid, signal.SIGTERM)

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

    # binary upgrade: USR2 starts a new master on the same listening sockets

    def handle_usr2(self) -> None:
        refusal = self._upgrade_refusal()
        if refusal is not None:
            self.log.error("USR2 ignored: %s", refusal)
            return
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:  # started as `python -m NAME`: do that again
            module = spec.name.removesuffix(".__main__")
            self.START_CTX["args"] = [sys.executable, "-m", module, *sys.argv[1:]]
        super().handle_usr2()

    def _upgrade_refusal(self) -> str | None:
        if self.metrics is not None:
            return (
                "a new master cannot take over the metrics address (--metrics); "
                "start a new instance beside this one instead (docs/lifecycle.md)"
            )
        if self.cfg.reuse_port:
            return (
                "with reuse_port each worker binds its own socket and the master has none "
                "to hand over; start a new instance beside this one instead"
            )
        if not sys.argv or sys.argv[0] in ("", "-", "-c"):
            return "started by python -c or from standard input, this program cannot run again"
        return None

    def handle_winch(self) -> None:
        # gunicorn stops the workers on WINCH only when daemonized (a terminal sends
        # WINCH when resized); once USR2 has started a new master, WINCH is the
        # upgrade's next step whether daemonized or not.
        if self.reexec_pid and not self.cfg.daemon:
            self.log.info("Stopping the workers gracefully: a new master serves (USR2)")
            self.num_workers = 0
            with self._stopping("shutdown"):
                self.kill_workers(signal.SIGTERM)
            return
        super().handle_winch()

    def maybe_promote_master(self) -> None:
        # Called on every turn of the master loop (at least once a second).
        super().maybe_promote_master()
        if self.metrics is not None:
            self.metrics.check(self.log)
        if time.monotonic() - self._sampled_at >= MEMORY_READ_INTERVAL:
            self._sampled_at = time.monotonic()
            self._sample_and_recycle()
        if not self.state.ready and self.state.booted >= self.num_workers:
            self.state.ready = True
            self.log.info("Ready: %d workers booted", self.num_workers)
        if self.autoscaler is not None and self.state.ready and not self.state.draining:
            self.autoscaler.tick(self)
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self.log.info("Drain period over, shutting down gracefully")
            raise StopIteration
