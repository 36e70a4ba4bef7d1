"""The metrics endpoint: a small process of its own that serves /metrics.

The master binds the metrics address itself (so a busy port fails the start with one
line) and hands the listening socket to a fresh interpreter that runs `main()` of this
module and holds no app, no monkey-patching and no worker state. It serves
`GET /metrics` (and HEAD) in the Prometheus text format, or OpenMetrics when the scraper
asks for it, gzip when accepted; it sums the files of the metrics store under the
store's shared lock. It exits when the master is gone, and then removes the store.

The process writes nothing to the output it shares with the master, whose log may be
JSON lines: when it fails, it leaves the reason in the store (an exit note, the only
one: workers leave none) and exits with status 1, and the master logs the reason with
the exit status.

`Exporter` is the master's side: it starts the process, restarts it if it dies, and
stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from microsvc.metrics.instruments import REQUESTS, request_counter
from microsvc.metrics.store import MetricsStore
from microsvc.serving.binding import bind_tcp

#: The path metrics are served at.
METRICS_PATH = "/metrics"
#: Shortest time between two starts of the exporter process.
RESTART_INTERVAL = 1.0


def bind_socket(address: str) -> socket.socket:
    """A listening TCP socket on `address` (HOST:PORT or [IPv6]:PORT)."""
    sock = bind_tcp(address, "serve metrics on")
    sock.listen(64)
    return sock


#: How the master starts the exporter: `python -c` with an import, so the module is
#: imported once, as itself (with `-m`, runpy would run it a second time as `__main__`
#: after the package had imported it, and warn about that on stderr).
_ENTRY = "import sys; from microsvc.metrics.exporter import main; sys.exit(main())"


def describe_wait_status(status: int) -> str:
    """A wait status (`os.waitpid`) in words: `exited with status 1`, `was killed by
    signal 9 (SIGKILL)`."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            return f"was killed by signal {number}"
        return f"was killed by signal {number} ({name})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


#: How long the master waits for the exporter to end after TERM (then KILL), in seconds.
STOP_TIMEOUT = 5.0


class Exporter:
    """The exporter process, seen from the master."""

    def __init__(self, store: MetricsStore, address: str, scoreboard: Path | None = None) -> None:
        self.store = store
        self.address = address
        self.scoreboard = scoreboard
        self.socket = bind_socket(address)
        self.process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        #: How the last process ended, in words (None while it runs).
        self._ended: str | None = None

    def start(self) -> None:
        fd = self.socket.fileno()
        command = [
            sys.executable,
            "-c",
            _ENTRY,
            f"--fd={fd}",
            f"--store={self.store.path}",
            f"--parent={os.getpid()}",
        ]
        if self.scoreboard is not None:
            command.append(f"--scoreboard={self.scoreboard}")
        self._started_at = time.monotonic()
        self._ended = None
        self.process = subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL)

    def reap(self) -> None:
        """Collect the process's exit status if it has ended. The master calls this
        before gunicorn reaps its workers with `waitpid(-1)`, which takes the status of
        any child that has ended and keeps it to itself."""
        process = self.process
        if process is None or self._ended is not None:
            return
        try:
            pid, status = os_waitpid()(process.pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped by `waitpid(-1)`: it ended between this call and that one.
            self._ended = "ended (its exit status was not seen)"
            process.returncode = -1
            return
        if pid == 0:
            return
        process.returncode = os.waitstatus_to_exitcode(status)
        self._ended = describe_wait_status(status)

    def check(self, log: Any) -> None:
        """Restart the process if it has died (at most once per RESTART_INTERVAL)."""
        self.reap()
        process, ended = self.process, self._ended
        if process is None or ended is None:
            return
        if time.monotonic() - self._started_at < RESTART_INTERVAL:
            return
        reason = self.store.take_exit_note(process.pid)
        log.error(
            "Metrics exporter (pid: %s) %s%s; starting it again",
            process.pid,
            ended,
            f": {reason}" if reason else "",
        )
        self.start()

    def stop(self) -> None:
        self.reap()
        process, self.process = self.process, None
        if process is not None and self._ended is None:
            process.terminate()
            if not _wait_for_exit(process, STOP_TIMEOUT):
                process.kill()
                _wait_for_exit(process, STOP_TIMEOUT)
        self.socket.close()

    def close_in_child(self) -> None:
        """In a forked worker: drop the inherited listening socket."""
        self.socket.close()


def os_waitpid() -> Callable[[int, int], tuple[int, int]]:
    """The operating system's waitpid, also where gevent patched `os`.

    gevent's answers a WNOHANG wait for a child that gevent's subprocess started from
    its own SIGCHLD watcher, which never fires in gunicorn's master (the arbiter handles
    SIGCHLD itself): the child would look alive forever."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("os"):
        original: Callable[[int, int], tuple[int, int]] = monkey.get_original("os", "waitpid")
        return original
    return os.waitpid


def _wait_for_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Waits at most `timeout` seconds for `process` to end; True once it has.

    It polls the operating system's `waitpid` rather than calling `Popen.wait`: in a
    gevent-patched master, `Popen.wait` waits for gevent to see SIGCHLD, which gunicorn's
    arbiter handles itself, so gevent never sees the process end (see `os_waitpid`)."""
    deadline = time.monotonic() + timeout
    waitpid = os_waitpid()
    while True:
        try:
            pid, status = waitpid(process.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by gunicorn's waitpid(-1)
            process.returncode = -1
            return True
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# the exporter process


#: Requests in flight: read from the scoreboard when there is one (workers note each
#: request there anyway), else from the workers' files.
IN_FLIGHT = "microsvc_http_requests_in_flight"


class StoreCollector:
    """The store's files, summed under its shared lock (`skip`: names of metrics read
    elsewhere), and the request counter read from them (`request_counter`): a counter
    of that name in the files (written by workers of an earlier microsvc, still running
    after an upgrade in place) is left out, as the histogram counts their requests too."""

    def __init__(self, store: MetricsStore, skip: frozenset[str] = frozenset()) -> None:
        self.store = store
        self.skip = skip

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        with self.store.reading():
            merged = MultiProcessCollector.merge(self.store.value_files(), accumulate=True)
            families = [f for f in merged if f.name not in self.skip and f.name != REQUESTS]
        counter = request_counter(families)
        return families if counter is None else [*families, counter]


class _ScoreboardCollector:
    """Gauges read from the scoreboard at each scrape: requests in flight, busy workers
    and busy ratio, listen-queue length and limit per listener, own and shared memory per
    worker slot."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._board: Any = None
        self._opening = threading.Lock()  # scrapes run in threads of their own

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from microsvc.observe.scoreboard import Scoreboard, ScoreboardError

        try:
            with self._opening:
                if self._board is None:
                    self._board = Scoreboard.open(self.path)
            snapshot = self._board.snapshot()
        except ScoreboardError:
            return []
        live = [w for w in snapshot.workers if w.state != "stopping"]
        busy = sum(1 for w in live if w.in_flight > 0)
        families = [
            # A stopping worker still serves the requests it has.
            GaugeMetricFamily(
                IN_FLIGHT,
                "HTTP requests being served right now, in all workers.",
                sum(w.in_flight for w in snapshot.workers),
            ),
            GaugeMetricFamily(
                "microsvc_workers_busy", "Workers serving at least one request now.", busy
            ),
            GaugeMetricFamily(
                "microsvc_workers_busy_ratio",
                "Busy workers divided by running workers (0 when none runs).",
                busy / len(live) if live else 0.0,
            ),
        ]
        queue = GaugeMetricFamily(
            "microsvc_listen_queue_length",
            "Connections waiting in the kernel's accept queue of a listening socket.",
            labels=("listener",),
        )
        limit = GaugeMetricFamily(
            "microsvc_listen_queue_limit",
            "The accept queue's limit (the listen backlog) of a listening socket.",
            labels=("listener",),
        )
        for listener in snapshot.listeners:
            if listener.queue is not None and listener.queue_limit is not None:
                queue.add_metric((listener.address,), listener.queue)
                limit.add_metric((listener.address,), listener.queue_limit)
        own = GaugeMetricFamily(
            "microsvc_worker_memory_own_bytes",
            "Memory only this worker uses (USS: its private pages), by scoreboard slot.",
            labels=("slot",),
        )
        shared = GaugeMetricFamily(
            "microsvc_worker_memory_shared_bytes",
            "Resident memory this worker shares with others (RSS minus USS), by slot.",
            labels=("slot",),
        )
        for worker in snapshot.workers:
            if worker.memory is not None:
                own.add_metric((str(worker.slot),), worker.memory["own"])
                shared.add_metric((str(worker.slot),), worker.memory["shared"])
        return [*families, queue, limit, own, shared]


class _Handler(BaseHTTPRequestHandler):
    registry: Any = None
    server_version = "microsvc-metrics"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        from prometheus_client.exposition import choose_encoder, gzip_accepted

        if urlsplit(self.path).path != METRICS_PATH:
            self._send(404, "text/plain; charset=utf-8", b"Not found: metrics are at /metrics\n")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.registry)
        except Exception as exc:  # the scraper records the failed scrape; no log line
            message = f"Error: metrics could not be collected: {type(exc).__name__}: {exc}\n"
            self._send(500, "text/plain; charset=utf-8", message.encode())
            return
        headers = []
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        self._send(200, content_type, body if send_body else b"", len(body), headers)

    def _send(
        self,
        code: int,
        content_type: str,
        body: bytes,
        length: int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers or []:
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape that fails past its answer (the scraper hung up) ends its
        connection; nothing goes to the output shared with the master."""


#: How often the exporter checks that the master is still there, in seconds. Between
#: checks and scrapes it sleeps: an idle exporter wakes up this rarely.
PARENT_CHECK_INTERVAL = 2.0


def serve(fd: int, store: MetricsStore, parent: int, scoreboard: Path | None = None) -> None:
    """Serve /metrics on the listening socket `fd` until `parent` is gone or TERM.

    One loop in the main thread waits for a scrape, a signal (through a wake-up pipe) or
    the next check of the parent; each scrape is answered in a thread of its own."""
    from prometheus_client import CollectorRegistry

    # Registering collects nothing: a store that cannot be read now fails its scrapes
    # (500, with the reason), not the start of the process.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        StoreCollector(store, frozenset() if scoreboard is None else frozenset({IN_FLIGHT}))
    )
    if scoreboard is not None:
        registry.register(_ScoreboardCollector(scoreboard))
    handler = type("Handler", (_Handler,), {"registry": registry})
    listener = socket.socket(fileno=fd)
    server = _Server(listener.getsockname()[:2], handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    server.timeout = 0  # handle_request: the loop below has waited already
    stopping: list[int] = []
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGTERM, lambda signum, _: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _: stopping.append(signum))
    orphaned = False
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ, "scrape")
        selector.register(wake_read, selectors.EVENT_READ, "signal")
        next_check = time.monotonic() + PARENT_CHECK_INTERVAL
        while not stopping:
            for key, _ in selector.select(max(0.0, next_check - time.monotonic())):
                if key.data == "scrape":
                    server.handle_request()
                else:
                    with contextlib.suppress(OSError):
                        os.read(wake_read, 512)
            if time.monotonic() >= next_check:
                if os.getppid() != parent:
                    orphaned = True
                    break
                next_check = time.monotonic() + PARENT_CHECK_INTERVAL
    server.server_close()
    if orphaned:
        # The master died without cleaning up: nobody else will remove the store.
        store.remove()


def main(argv: list[str] | None = None) -> int:
    """The exporter process (see `_ENTRY`)."""
    parser = argparse.ArgumentParser(prog="microsvc metrics exporter")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--scoreboard", type=Path, default=None)
    args = parser.parse_args(argv)
    store = MetricsStore(args.store)
    try:
        serve(args.fd, store, args.parent, args.scoreboard)
    except Exception as exc:  # the master logs it: see the module docstring
        with contextlib.suppress(OSError):
            store.note_exit(os.getpid(), f"{type(exc).__name__}: {exc}")
        return 1
    return 0
