"""Shared fixtures: free ports, a clean child environment, and real servers in subprocesses.

A server is started as its own process (`python -m microsvc run ...` or a script), in a
process group of its own, with stdout and stderr going to a log file under `tmp_path`.
It is stopped with SIGTERM to the group, and SIGKILL if it does not end in time. The
gunicorn arbiter never runs inside the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

#: Variables that would change what the server under test does.
_DROPPED_ENV = ("WEB_CONCURRENCY", "HOST", "PORT", "PYTHONWARNINGS")

#: How long a server may take to answer HTTP after it starts.
START_DEADLINE = 45.0
#: How long a server may take to stop after SIGTERM before it is killed.
STOP_DEADLINE = 40.0


def _is_running(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _is_metrics_exporter(process: psutil.Process) -> bool:
    try:
        return "microsvc.metrics.exporter" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:  # ZombieProcess included: it has ended
        return False


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without MICROSVC_*, WEB_CONCURRENCY, HOST, PORT and PYTHONWARNINGS."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MICROSVC_") and name not in _DROPPED_ENV
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def microsvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "microsvc", *args]


def run_plan(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """`microsvc plan --json ARGS` in a subprocess, parsed."""
    done = subprocess.run(
        microsvc_command("plan", "--json", *args),
        cwd=cwd,
        env=clean_env(env),
        preexec_fn=preexec_fn,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"microsvc plan failed ({done.returncode}):\n{done.stderr}"
    data: dict[str, Any] = json.loads(done.stdout)
    return data


class Server:
    """One server process: `.url`, `.proc`, `.log_text()`, `.stop()`."""

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
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        return (
            f"server pid {self.pid} on {self.url}, exit {self.proc.poll()}; log:\n{self.log_text()}"
        )

    def wait_ready(self, path: str = "/health", deadline: float = START_DEADLINE) -> None:
        """Poll until the server answers HTTP (any status); fail with its log if it
        exits first or takes longer than `deadline` seconds."""
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited before answering HTTP: {self.describe()}")
            try:
                with requests.get(self.url + path, timeout=2):
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > end:
                pytest.fail(f"no HTTP answer within {deadline:.0f} s: {self.describe()}")
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
                pytest.fail(f"no log line matches {pattern!r}: {self.describe()}")
            time.sleep(0.1)

    def workers(self) -> list[psutil.Process]:
        """The master's living direct children (the gunicorn workers, and the metrics
        exporter with --metrics); a child that exited and is not yet reaped is left out."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [child for child in children if _is_running(child)]

    def app_workers(self) -> list[psutil.Process]:
        """The gunicorn workers alone: the living children but the metrics exporter."""
        return [child for child in self.workers() if not _is_metrics_exporter(child)]

    def wait_workers(self, expected: int, stable_for: float = 1.5, deadline: float = 30.0) -> int:
        """Wait until the master has `expected` children and the count holds for
        `stable_for` seconds; return the last count seen (the caller asserts)."""
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

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(
        self, sig: int = signal.SIGTERM, *, group: bool = True, timeout: float = STOP_DEADLINE
    ) -> int:
        """Send `sig` to the process group (to the master alone with group=False, as a
        container runtime does), wait for the master, SIGKILL the group if it does not end
        in `timeout` seconds; return the master's exit status. Workers still alive 5 s
        after the master ended are left in `.orphans`."""
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
                pytest.fail(f"the server did not stop within {timeout:.0f} s: {self.describe()}")
            self.orphans = _still_running(worker_pids, grace=5.0)
        return int(self.proc.returncode)

    def kill_leftovers(self) -> None:
        """Teardown: stop the master if it still runs, then SIGKILL whatever is left
        of its process group."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_DEADLINE)
        self.signal_group(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)


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
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


#: How long a thread that a test ended may take to leave the process.
THREAD_EXIT_GRACE = 2.0
_TASKS = Path("/proc/self/task")


def _thread_ids() -> set[int]:
    """Native ids of this process's threads (every thread, not only `threading`'s)."""
    if _TASKS.is_dir():
        return {int(name) for name in os.listdir(_TASKS)}
    return {thread.native_id or 0 for thread in threading.enumerate()}


def _describe_threads(ids: set[int]) -> str:
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    return ", ".join(f"{names.get(tid, 'native thread')} (tid {tid})" for tid in sorted(ids))


@pytest.fixture(autouse=True)
def _fork_safe_test_process() -> Iterator[None]:
    """Fail the test that leaves a thread running or imports eventlet into this process.

    Later tests fork this process (subprocesses with a preexec_fn, os.fork). A fork with
    other threads alive can deadlock the child (Python 3.12+ warns about it), and
    importing eventlet registers an at-fork hook whose warning, as an error, fails
    whichever test forks next, far from the cause. Join threads in teardown; use
    eventlet in a subprocess.
    """
    before = _thread_ids()
    had_eventlet = "eventlet" in sys.modules
    yield
    problems = []
    if not had_eventlet and "eventlet" in sys.modules:
        problems.append("imported eventlet into the test process (its at-fork hook warns)")
    deadline = time.monotonic() + THREAD_EXIT_GRACE
    left = _thread_ids() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = _thread_ids() - before
    if left:
        problems.append(f"left threads running: {_describe_threads(left)}")
    if problems:
        pytest.fail("the test " + "; ".join(problems) + " (later forks would warn)")


#: The HTTP engines a server can run (`--http-engine`); the first is the default.
HTTP_ENGINES = ("microsvc", "gunicorn")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--http-engine",
        choices=HTTP_ENGINES,
        default=HTTP_ENGINES[0],
        help="HTTP engine of the servers the tests start (tests marked both_engines run "
        "on each engine whatever this says)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_engines: the test runs once on each HTTP engine (microsvc, gunicorn)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_engines") and (
        "http_engine" in metafunc.fixturenames
    ):
        metafunc.parametrize("http_engine", HTTP_ENGINES, indirect=True)


@pytest.fixture
def http_engine(request: pytest.FixtureRequest) -> str:
    """The HTTP engine of the servers `serve` starts: the test's parameter (tests marked
    both_engines), else the `--http-engine` option of pytest."""
    engine: str = getattr(request, "param", None) or request.config.getoption("--http-engine")
    return engine


ServeFactory = Callable[..., Server]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """`free_port()` gives a port on 127.0.0.1 that nothing listens on right now."""
    return find_free_port


@pytest.fixture
def microsvc_plan() -> Callable[..., dict[str, Any]]:
    """`microsvc_plan(*args, cwd=, env=, preexec_fn=)`: `microsvc plan --json ARGS`, parsed."""
    return run_plan


@pytest.fixture(scope="session")
def runtime_dir() -> Iterator[Path]:
    """A short XDG_RUNTIME_DIR shared by every server of the session (control sockets
    land here, not in the home directory; a Unix socket path must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="msvc-e2e-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(tmp_path: Path, runtime_dir: Path, http_engine: str) -> Iterator[ServeFactory]:
    """A factory that starts a server and waits until it answers HTTP.

    serve(args) runs `python -m microsvc run ARGS -b 127.0.0.1:PORT`; pass
    `command=[...]` to run something else, with `{port}` in it replaced by the port.
    The server runs the HTTP engine of the `http_engine` fixture (MICROSVC_HTTP_ENGINE
    when it is not the default; `env` may set it). Every server it started is stopped at
    teardown.
    """
    engine_env = {} if http_engine == HTTP_ENGINES[0] else {"MICROSVC_HTTP_ENGINE": http_engine}
    started: list[Server] = []

    def start(
        args: Sequence[str] = (),
        *,
        command: Sequence[str] | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready_path: str = "/health",
        wait: bool = True,
        preexec_fn: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> Server:
        port = port or find_free_port()
        if command is None:
            argv = microsvc_command("run", *args, "-b", f"127.0.0.1:{port}")
        else:
            argv = [part.replace("{port}", str(port)) for part in command]
        log_path = tmp_path / f"{name or 'server'}-{len(started)}-{port}.log"
        child_env = clean_env({"XDG_RUNTIME_DIR": str(runtime_dir), **engine_env, **(env or {})})
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=cwd or tmp_path,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        server = Server(proc, port, log_path)
        started.append(server)
        if wait:
            server.wait_ready(ready_path)
        return server

    yield start

    for server in reversed(started):
        server.kill_leftovers()


#: The tiers of the suite: the directories under tests/, each selected by the marker of
#: its name (`pytest -m reliability`), declared in pyproject.toml.
TIERS = ("unit", "cli", "e2e", "reliability", "container")
_TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its tier, the directory it is in. The directory decides: a
    tier marker that a module, class or test gives itself is dropped, so `-m TIER`
    selects that directory and nothing else."""
    for item in items:
        try:
            parts = item.path.resolve().relative_to(_TESTS_DIR).parts
        except ValueError:
            continue
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        for node in item.listchain():
            node.own_markers[:] = [
                mark for mark in node.own_markers if mark.name not in TIERS or mark.name == tier
            ]
        if tier is not None:
            item.add_marker(tier)
