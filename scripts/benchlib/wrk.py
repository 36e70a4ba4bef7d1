"""wrk as the load generator, with a Lua script that reports exact figures in one line.

wrk runs one Lua state per thread: `setup()` keeps each thread and `done()` adds up
their counters, as wrk's scripting documentation shows. `done()` prints one line:

    BENCH requests=N responses=N non2xx=N connect=N read=N write=N timeout=N status=N
          duration_us=N bytes=N p50_us=N p90_us=N p99_us=N mean_us=F max_us=N

(on one line). Latency figures come from wrk's latency object (microseconds); wrk's
human-readable text is not parsed for numbers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib.errors import RunError

#: Where the Debian package puts it.
WRK_FALLBACK = "/usr/bin/wrk"

#: wrk's own per-request timeout: a response slower than this is a timeout error.
REQUEST_TIMEOUT_S = 5

#: Extra seconds wrk may take beyond its duration before it is killed.
GRACE_S = 30.0

LUA_SCRIPT = """\
-- microsvc scripts/bench: exact counts over all of wrk's threads, and latency percentiles.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  responses = 0
  non2xx = 0
end

function response(status, headers, body)
  responses = responses + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local total, bad = 0, 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("responses")
    bad = bad + thread:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d responses=%d non2xx=%d connect=%d read=%d write=%d timeout=%d "
    .. "status=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d mean_us=%.1f "
    .. "max_us=%d\\n",
    summary.requests, total, bad, e.connect, e.read, e.write, e.timeout, e.status,
    summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
"""

_LINE_RE = re.compile(r"^BENCH (.+)$", re.MULTILINE)
_FIELDS = (
    "requests",
    "responses",
    "non2xx",
    "connect",
    "read",
    "write",
    "timeout",
    "status",
    "duration_us",
    "bytes",
    "p50_us",
    "p90_us",
    "p99_us",
    "mean_us",
    "max_us",
)


def find_wrk() -> str | None:
    found = shutil.which("wrk")
    if found:
        return found
    return WRK_FALLBACK if os.access(WRK_FALLBACK, os.X_OK) else None


def wrk_version(wrk: str) -> str:
    try:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (done.stdout + done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "unknown"


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run saw (counts over all threads; latency in microseconds)."""

    requests: int
    responses: int
    non2xx: int
    connect: int
    read: int
    write: int
    timeout: int
    status: int
    duration_us: int
    bytes: int
    p50_us: int
    p90_us: int
    p99_us: int
    mean_us: float
    max_us: int

    @property
    def seconds(self) -> float:
        return self.duration_us / 1e6

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def errors(self) -> int:
        """Socket errors plus non-2xx responses."""
        return self.socket_errors + self.non2xx

    @property
    def rps(self) -> float:
        """2xx responses per second."""
        return (self.responses - self.non2xx) / self.seconds if self.duration_us else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            rps=round(self.rps, 1),
            socket_errors=self.socket_errors,
            errors=self.errors,
            p50_ms=self.p50_us / 1000,
            p90_ms=self.p90_us / 1000,
            p99_ms=self.p99_us / 1000,
        )
        return data


def parse_output(text: str) -> WrkResult:
    """The figures from the script's BENCH line; RunError if it is missing or malformed."""
    match = _LINE_RE.search(text)
    if match is None:
        raise RunError(f"wrk printed no BENCH line: {_tail(text)}")
    values: dict[str, str] = {}
    for item in match.group(1).split():
        name, sep, value = item.partition("=")
        if sep:
            values[name] = value
    try:
        numbers: dict[str, Any] = {
            name: float(values[name]) if name == "mean_us" else int(values[name])
            for name in _FIELDS
        }
    except (KeyError, ValueError):
        raise RunError(f"wrk's BENCH line is malformed: {match.group(0)}") from None
    return WrkResult(**numbers)


def _tail(text: str, lines: int = 5) -> str:
    kept = text.strip().splitlines()[-lines:]
    return " | ".join(kept) if kept else "(no output)"


@dataclass(frozen=True)
class LoadSpec:
    """One wrk run: where, how hard, how long, on which CPUs."""

    url: str
    connections: int
    threads: int
    duration: int
    cpus: tuple[int, ...] | None = None

    def argv(self, wrk: str, script: Path) -> list[str]:
        threads = max(1, min(self.threads, self.connections))
        argv = [
            wrk,
            f"-t{threads}",
            f"-c{self.connections}",
            f"-d{self.duration}s",
            f"--timeout={REQUEST_TIMEOUT_S}s",
            "-s",
            str(script),
            self.url,
        ]
        return taskset(self.cpus) + argv


def taskset(cpus: tuple[int, ...] | None) -> list[str]:
    """The `taskset -c LIST` prefix for a pinned command (nothing when unpinned)."""
    return ["taskset", "-c", cpu_list(cpus)] if cpus else []


def cpu_list(cpus: tuple[int, ...] | None) -> str:
    """CPU numbers as taskset writes them: `0-11`, `0,2,4-6`."""
    if not cpus:
        return ""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def run_wrk(wrk: str, script: Path, spec: LoadSpec) -> WrkResult:
    """Run wrk to the end and return its figures; RunError if it fails or hangs."""
    if not spec.url.startswith("http://127.0.0.1:"):
        raise RunError(f"load goes to 127.0.0.1 only, not {spec.url}")
    argv = spec.argv(wrk, script)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise RunError(f"cannot start wrk: {exc}") from None
    try:
        out, _ = proc.communicate(timeout=spec.duration + GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise RunError(f"wrk did not end within {spec.duration + GRACE_S:.0f} s") from None
    except BaseException:
        _kill_group(proc)
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RunError(f"wrk exited with status {proc.returncode}: {_tail(text)}")
    return parse_output(text)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)
