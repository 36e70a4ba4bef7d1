"""Servers in subprocesses: started on a 127.0.0.1 port in a process group of their own
with their output in a log file, polled until they answer HTTP, stopped with a signal to
the group (SIGTERM, then SIGKILL for whatever is left). The gunicorn arbiter never runs
inside the calling process.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from harness.errors import HarnessError

#: Variables that would change what a server under test does; never passed on.
DROPPED_ENV = ("WEB_CONCURRENCY", "HOST", "PORT", "PYTHONWARNINGS", "GUNICORN_CMD_ARGS")

#: How long a server may take to answer HTTP after it starts.
START_DEADLINE = 45.0
#: How long a server may take to stop after SIGTERM before it is killed.
STOP_DEADLINE = 40.0


#: Ports handed out below the kernel's ephemeral range start here.
LOW_PORTS_FROM = 20000


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux's default when
    it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_share(low: int, high: int) -> tuple[int, int]:
    """This process's share of the ports [low, high): under pytest-xdist each worker
    process gets a slice of its own, so that two tests running at once never pick the
    same free port before either has bound it (the second server would fail to bind, and
    its readiness check would be answered by the first). Elsewhere, the whole range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit():
        index, workers = int(worker[2:]), int(count)
        size = (high - low) // max(workers, 1)
        if index < workers and size >= 200:
            return low + index * size, low + (index + 1) * size
    return low, high


def free_port_on(host: str) -> int:
    """A TCP port on the address `host` (a loopback one) that nothing is bound to right now.

    It is taken below the kernel's ephemeral range where there is room: a port from that
    range, free when picked, can become the local port of any outgoing connection (of
    another test running meanwhile) before the server binds it. Test processes running
    side by side pick from separate slices (`port_share`)."""
    low, _ = ephemeral_ports()
    if low - LOW_PORTS_FROM >= 1000:
        first, end = port_share(LOW_PORTS_FROM, low)
        for _ in range(100):
            port = random.randrange(first, end)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_port_on("127.0.0.1")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without MICROSVC_* (but MICROSVC_PURE_PYTHON, the build under test) and
    DROPPED_ENV, unbuffered, updated with `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if (not name.startswith("MICROSVC_") or name == "MICROSVC_PURE_PYTHON")
        and name not in DROPPED_ENV
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def microsvc_command(*args: str) -> list[str]:
    """`python -m microsvc ARGS` with this interpreter."""
    return [sys.executable, "-m", "microsvc", *args]


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group `pid` leads, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def start_server(
    argv: Sequence[str],
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
    preexec_fn: Callable[[], None] | None = None,
) -> Server:
    """Start `argv` (which must listen on `port`) in a new session; it does not wait."""
    with log_path.open("wb") as log:
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        except OSError as exc:
            raise HarnessError(f"cannot start {argv[0]}: {exc}") from None
    return Server(proc, port, log_path)


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of `GET path` on 127.0.0.1:port, or None if nothing answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def is_running(process: psutil.Process) -> bool:
    """Whether `process` runs: neither gone nor a zombie (whose parent has not yet
    collected it), also when it ends while asked."""
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _is_metrics_exporter(process: psutil.Process) -> bool:
    try:
        return "microsvc.metrics.exporter" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:  # ZombieProcess included: it has ended
        return False


class Server:
    """One server process: `.url`, `.proc`, `.log_text()`, `.wait_ready()`, `.stop()`."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        #: Worker pids still alive after the master stopped (filled by `stop`).
        self.orphans: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 8) -> str:
        """The last non-blank lines of the log on one line."""
        kept = [line for line in self.log_text().splitlines() if line.strip()][-lines:]
        return " | ".join(kept) if kept else "(empty log)"

    def describe(self) -> str:
        return (
            f"server pid {self.pid} on {self.url}, exit {self.proc.poll()}; log:\n{self.log_text()}"
        )

    def wait_ready(
        self, path: str = "/health", deadline: float = START_DEADLINE, *, status: int | None = None
    ) -> None:
        """Poll until `path` answers (with `status`, when given); HarnessError with the
        log if the server exits first or takes longer than `deadline` seconds."""
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"the server exited before answering HTTP: {self.describe()}")
            got = http_status(self.port, path)
            if got is not None and status in (None, got):
                return
            if time.monotonic() > end:
                wanted = f"{status} from {path}" if status else f"HTTP answer on {path}"
                raise HarnessError(f"no {wanted} within {deadline:.0f} s: {self.describe()}")
            time.sleep(0.1)

    def wait_log(self, pattern: str, deadline: float = 20.0) -> re.Match[str]:
        """Wait until a line of the log matches the regular expression `pattern`."""
        compiled = re.compile(pattern)
        end = time.monotonic() + deadline
        while True:
            match = compiled.search(self.log_text())
            if match:
                return match
            if self.proc.poll() is not None or time.monotonic() > end:
                raise HarnessError(f"no log line matches {pattern!r}: {self.describe()}")
            time.sleep(0.1)

    def wait_booted(self, deadline: float = 30.0) -> None:
        """Wait until the master logs that all its workers have booted (each imported the
        app and serves): a forked worker counts in `workers()` before it can answer."""
        self.wait_log(r"Ready: \d+ workers booted", deadline)

    def wait_metrics(self, deadline: float = START_DEADLINE) -> int:
        """With --metrics on a loopback address: wait until the exporter answers 200 on
        /metrics (the address its master logged); returns its port. HarnessError if it
        does not within `deadline` seconds."""
        end = time.monotonic() + deadline
        found = self.wait_log(r"Metrics at http://127\.0\.0\.1:(\d+)/metrics", deadline)
        port = int(found.group(1))
        while http_status(port, "/metrics") != 200:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise HarnessError(f"no 200 from /metrics on port {port}: {self.describe()}")
            time.sleep(0.1)
        return port

    def workers(self) -> list[psutil.Process]:
        """The master's living direct children (the gunicorn workers, and the metrics
        exporter with --metrics); a child that exited and is not yet reaped is left out."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [child for child in children if is_running(child)]

    def worker_pids(self) -> set[int]:
        """The pids of `workers()`."""
        return {worker.pid for worker in self.workers()}

    def wait_new_workers(self, before: set[int], deadline: float = 20.0) -> set[int]:
        """Wait until a child whose pid is not in `before` is running (a replacement,
        which the master starts once the worker it replaces has exited); return the new
        pids, empty if none came within `deadline` seconds."""
        end = time.monotonic() + deadline
        while True:
            new = self.worker_pids() - before
            if new or time.monotonic() > end or self.proc.poll() is not None:
                return new
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the master and its living children;
        the difference of two readings is what the server used in between."""
        total = 0.0
        try:
            processes = [psutil.Process(self.pid), *self.workers()]
        except psutil.NoSuchProcess:
            return total
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def app_workers(self) -> list[psutil.Process]:
        """The gunicorn workers alone: the living children but the metrics exporter."""
        return [child for child in self.workers() if not _is_metrics_exporter(child)]

    def wait_workers(self, expected: int, stable_for: float = 1.5, deadline: float = 30.0) -> int:
        """Wait until the master has `expected` children and the count holds for
        `stable_for` seconds; return the last count seen (the caller decides)."""
        end = time.monotonic() + deadline
        since: float | None = None
        count = -1
        while time.monotonic() < end:
            now = len(self.workers())
            if now != count:
                count, since = now, time.monotonic()
            elif count == expected and since is not None and time.monotonic() - since >= stable_for:
                return count
            time.sleep(0.1)
        return count

    def worker_uss(self) -> int | None:
        """The median private memory (USS, from /proc/PID/smaps_rollup) of the master's
        children in bytes; None if none could be read."""
        try:
            values = sorted(child.memory_full_info().uss for child in self.workers())
        except psutil.Error:
            return None
        return values[len(values) // 2] if values else None

    def signal_group(self, sig: int) -> None:
        signal_group(self.pid, sig)

    def stop(
        self, sig: int = signal.SIGTERM, *, group: bool = True, timeout: float = STOP_DEADLINE
    ) -> int:
        """Send `sig` to the process group (to the master alone with group=False, as a
        container runtime does) and wait for the master; HarnessError if it does not end
        in `timeout` seconds (the group is killed first). Return the master's exit status;
        workers still alive 5 s after the master ended are left in `.orphans`."""
        if self.proc.poll() is None:
            worker_pids = [worker.pid for worker in self.workers()]
            if group:
                self.signal_group(sig)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(10)
                raise HarnessError(
                    f"the server did not stop within {timeout:.0f} s: {self.describe()}"
                ) from None
            self.orphans = _still_running(worker_pids, grace=5.0)
        return int(self.proc.returncode)

    def kill_leftovers(self, timeout: float = STOP_DEADLINE) -> bool:
        """Stop the master with SIGTERM to the group if it still runs, then SIGKILL
        whatever is left of the group. False when the master outlived `timeout`."""
        stopped = True
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stopped = False
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        return stopped


def _still_running(pids: Sequence[int], grace: float) -> list[int]:
    end = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < end:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(0.1)
    return alive


def _alive(pid: int) -> bool:
    try:
        return is_running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False
