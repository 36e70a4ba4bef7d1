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
        """The master's direct children (the gunicorn workers)."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

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
def serve(tmp_path: Path, runtime_dir: Path) -> Iterator[ServeFactory]:
    """A factory that starts a server and waits until it answers HTTP.

    serve(args) runs `python -m microsvc run ARGS -b 127.0.0.1:PORT`; pass
    `command=[...]` to run something else, with `{port}` in it replaced by the port.
    Every server it started is stopped at teardown.
    """
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
        child_env = clean_env({"XDG_RUNTIME_DIR": str(runtime_dir), **(env or {})})
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
