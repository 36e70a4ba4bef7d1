"""Servers under test: started on a free 127.0.0.1 port in a process group of their own,
polled until they answer, stopped with TERM to the group and then KILL.

A plain-gunicorn server with microsvc's settings gets them from a gunicorn config file
written for each start (its bind and control socket depend on the port).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchlib.errors import RunError
from benchlib.wrk import taskset

#: Variables that would change what a server does; dropped from its environment.
DROPPED_ENV = ("WEB_CONCURRENCY", "HOST", "PORT", "PYTHONWARNINGS", "GUNICORN_CMD_ARGS")

#: Seconds a server may take to stop after TERM before its group is killed.
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_env(runtime_dir: Path) -> dict[str, str]:
    """The environment without MICROSVC_* and the variables above; control sockets go
    to `runtime_dir`, so they never touch another instance's."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MICROSVC_") and name not in DROPPED_ENV
    }
    env.pop("BENCH_REEXEC", None)
    env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class ServerCommand:
    """How to start one configuration; `{port}` and `{config}` are filled at start."""

    argv: tuple[str, ...]
    ready_path: str
    #: gunicorn settings written to a config file (plain gunicorn with microsvc's settings).
    config: Mapping[str, Any] | None = None
    #: What a person would type (the interpreter shortened, PORT for the port).
    display: str = ""

    def render(self, port: int, config_path: Path | None) -> list[str]:
        values = {"port": str(port), "config": str(config_path or "")}
        return [part.format(**values) for part in self.argv]


def write_config(config: Mapping[str, Any], port: int, path: Path, runtime_dir: Path) -> None:
    """A gunicorn config file: one `name = value` per setting, bind and control socket
    for this start."""
    settings = dict(config)
    settings["bind"] = [f"127.0.0.1:{port}"]
    settings["control_socket"] = str(runtime_dir / f"gunicorn-{port}.ctl")
    lines = ["# Written by scripts/bench: microsvc's settings for plain gunicorn."]
    lines.extend(f"{name} = {value!r}" for name, value in sorted(settings.items()))
    path.write_text("\n".join(lines) + "\n")


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    argv: list[str]
    workers_seen: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
        return " | ".join(kept) if kept else "(empty log)"

    def stop(self) -> None:
        """TERM to the group, KILL after STOP_TIMEOUT_S; then KILL whatever is left."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.notes.append(f"did not stop within {STOP_TIMEOUT_S:.0f} s of TERM: killed")
        _signal_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _http_status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _children(pid: int) -> int:
    try:
        return len(psutil.Process(pid).children())
    except psutil.Error:
        return 0


def worker_uss(pid: int) -> int | None:
    """The median private memory (USS: psutil reads /proc/PID/smaps_rollup) of the
    master's children, in bytes; None if none could be read."""
    try:
        values = sorted(child.memory_full_info().uss for child in psutil.Process(pid).children())
    except psutil.Error:
        return None
    return values[len(values) // 2] if values else None


def start_server(
    command: ServerCommand,
    *,
    cpus: tuple[int, ...] | None,
    env: Mapping[str, str],
    workdir: Path,
    runtime_dir: Path,
    expected_workers: int,
    start_timeout: float,
    workers_deadline: float,
    name: str,
) -> RunningServer:
    """Start, wait until `ready_path` answers 200 and the master has its workers.

    RunError (with the log's last lines) if the server exits, or does not answer within
    `start_timeout` seconds; the server is stopped first.
    """
    port = free_port()
    config_path: Path | None = None
    if command.config is not None:
        config_path = workdir / f"{name}-{port}.conf.py"
        write_config(command.config, port, config_path, runtime_dir)
    argv = taskset(cpus) + command.render(port, config_path)
    log_path = workdir / f"{name}-{port}.log"
    with log_path.open("wb") as log:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise RunError(f"cannot start {argv[0]}: {exc}") from None
    server = RunningServer(proc, port, log_path, argv)
    try:
        _wait_ready(server, command.ready_path, start_timeout)
        server.workers_seen = _wait_workers(proc.pid, expected_workers, workers_deadline)
    except BaseException:
        server.stop()
        raise
    if server.workers_seen != expected_workers:
        server.notes.append(
            f"expected {expected_workers} workers, the master had {server.workers_seen}"
        )
    return server


def _wait_ready(server: RunningServer, path: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        code = server.proc.poll()
        if code is not None:
            raise RunError(
                f"the server exited with status {code} before answering: {server.log_tail()}"
            )
        if _http_status(server.port, path) == 200:
            return
        if time.monotonic() > end:
            raise RunError(f"no 200 from {path} within {timeout:.0f} s: {server.log_tail()}")
        time.sleep(0.1)


def _wait_workers(pid: int, expected: int, deadline: float, stable_for: float = 0.5) -> int:
    """Wait until the master has `expected` children for `stable_for` seconds; return
    the last count seen."""
    end = time.monotonic() + deadline
    count, since = -1, time.monotonic()
    while time.monotonic() < end:
        now = _children(pid)
        if now != count:
            count, since = now, time.monotonic()
        elif count == expected and time.monotonic() - since >= stable_for:
            return count
        time.sleep(0.1)
    return count
