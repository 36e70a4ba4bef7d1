"""wrk as the load generator, with a Lua script that reports exact figures in one line.

wrk runs one Lua state per thread: `setup()` keeps each thread and `done()` adds up
their counters, as wrk's scripting documentation shows. `done()` prints one line,

    BENCH requests=N responses=N non2xx=N connect=N read=N write=N timeout=N status=N
          duration_us=N bytes=N p50_us=N p90_us=N p99_us=N mean_us=F max_us=N

which counts every non-2xx status (wrk's own "Non-2xx or 3xx responses" line counts
statuses above 399 only) and gives the latency percentiles in microseconds. wrk's text
("Socket errors: connect A, read B, write C, timeout D") must agree with that line.

    failed = socket errors (connect + read + write + timeout) + non-2xx responses
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.servers import signal_group

#: Where the Debian package puts it.
WRK_FALLBACK = "/usr/bin/wrk"

#: Extra seconds wrk may take beyond its duration before it is killed.
GRACE_S = 30.0

LUA_SCRIPT = """\
-- microsvc's harness: exact counts over all of wrk's threads, and latency percentiles.
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
_SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_OVER_399_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def find_wrk() -> str | None:
    """wrk on PATH, or where the Debian package puts it; None if neither."""
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


def cpu_list(cpus: tuple[int, ...] | None) -> str:
    """CPU numbers as taskset writes them: `0-11`, `0,2,4-6`."""
    parts: list[str] = []
    for cpu in sorted(set(cpus or ())):
        first, _, last = parts[-1].partition("-") if parts else ("", "", "")
        if parts and cpu == int(last or first) + 1:
            parts[-1] = f"{first}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def taskset(cpus: tuple[int, ...] | None) -> list[str]:
    """The `taskset -c LIST` prefix for a pinned command (nothing when unpinned)."""
    return ["taskset", "-c", cpu_list(cpus)] if cpus else []


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run saw: counts over all threads, latency in microseconds."""

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
    url: str = ""
    connections: int = 0
    text: str = dataclasses.field(default="", repr=False)

    @property
    def seconds(self) -> float:
        return self.duration_us / 1e6

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def failed(self) -> int:
        """Socket errors plus non-2xx responses."""
        return self.socket_errors + self.non2xx

    errors = failed

    @property
    def sent(self) -> int:
        """Requests that got an answer or failed."""
        return self.responses + self.socket_errors

    @property
    def rps(self) -> float:
        """2xx responses per second."""
        return (self.responses - self.non2xx) / self.seconds if self.duration_us else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The figures of the BENCH line, and the ones derived from them."""
        data = {field: getattr(self, field) for field in _FIELDS}
        data.update(
            rps=round(self.rps, 1),
            socket_errors=self.socket_errors,
            errors=self.failed,
            p50_ms=self.p50_us / 1000,
            p90_ms=self.p90_us / 1000,
            p99_ms=self.p99_us / 1000,
        )
        return data

    def summary(self) -> str:
        return (
            f"{self.sent} requests, {self.failed} failed (non-2xx {self.non2xx}; socket errors "
            f"connect {self.connect}, read {self.read}, write {self.write}, timeout "
            f"{self.timeout}) in {self.seconds:.1f} s at {self.connections} connections "
            f"on {self.url}"
        )

    def __str__(self) -> str:
        return self.summary()


#: The BENCH line's fields, in its order.
_FIELDS = tuple(
    field.name
    for field in dataclasses.fields(WrkResult)
    if field.name not in ("url", "connections", "text")
)


def _tail(text: str, lines: int = 5) -> str:
    kept = text.strip().splitlines()[-lines:]
    return " | ".join(kept) if kept else "(no output)"


def parse_output(text: str, url: str = "", connections: int = 0) -> WrkResult:
    """The figures of the script's BENCH line, checked against wrk's own text;
    HarnessError if the line is missing or malformed or the two disagree."""
    match = _LINE_RE.search(text)
    if match is None:
        raise HarnessError(f"wrk printed no BENCH line: {_tail(text)}")
    values = dict(item.partition("=")[::2] for item in match.group(1).split())
    try:
        numbers: dict[str, Any] = {
            name: float(values[name]) if name == "mean_us" else int(values[name])
            for name in _FIELDS
        }
    except (KeyError, ValueError):
        raise HarnessError(f"wrk's BENCH line is malformed: {match.group(0)}") from None
    result = WrkResult(**numbers, url=url, connections=connections, text=text)
    socket = _SOCKET_RE.search(text)
    if (tuple(map(int, socket.groups())) if socket else (0, 0, 0, 0)) != (
        result.connect,
        result.read,
        result.write,
        result.timeout,
    ):
        raise HarnessError(f"wrk's text and BENCH line disagree on socket errors:\n{text}")
    over_399 = _OVER_399_RE.search(text)
    if (int(over_399.group(1)) if over_399 else 0) != result.status or (
        result.status > result.non2xx
    ):
        raise HarnessError(f"wrk's status errors do not fit non2xx {result.non2xx}:\n{text}")
    if result.responses != result.requests:
        raise HarnessError(f"Lua counted {result.responses} responses, wrk {result.requests}")
    return result


class WrkRun:
    """wrk running in the background; `result()` waits for it and parses its output."""

    def __init__(self, argv: list[str], url: str, connections: int, seconds: float) -> None:
        self.url = url
        self.connections = connections
        self.duration = seconds
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise HarnessError(f"cannot start wrk: {exc}") from None
        self._result: WrkResult | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def result(self) -> WrkResult:
        """Wait for wrk (killed after its duration and GRACE_S) and parse its output."""
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=self.duration + GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()
                raise HarnessError(
                    f"wrk did not end within {self.duration + GRACE_S:.0f} s"
                ) from None
            except BaseException:
                self.kill()
                raise
            text = out.decode(errors="replace")
            if self.proc.returncode != 0:
                raise HarnessError(f"wrk exited with status {self.proc.returncode}: {_tail(text)}")
            self._result = parse_output(text, self.url, self.connections)
        return self._result

    def kill(self) -> None:
        signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


class Wrk:
    """`start(url)` runs wrk in the background, `run(url)` waits for its result. The Lua
    script is written into `workdir`; `runs` keeps every run, for `kill_all()`."""

    def __init__(self, workdir: Path, executable: str | None = None) -> None:
        found = executable or find_wrk()
        if found is None:
            raise HarnessError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
        self.executable = found
        self.script = workdir / "count.lua"
        self.script.write_text(LUA_SCRIPT)
        self.runs: list[WrkRun] = []

    def start(
        self,
        url: str,
        *,
        seconds: float = 4,
        connections: int = 50,
        threads: int = 2,
        timeout: float = 5,
        cpus: tuple[int, ...] | None = None,
    ) -> WrkRun:
        """wrk with `threads` threads (at most one a connection) on `cpus` (taskset)."""
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"load goes to 127.0.0.1 only, not {url}")
        argv = [
            *taskset(cpus),
            self.executable,
            f"-t{max(1, min(threads, connections))}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            f"--timeout={timeout:g}s",
            "-s",
            str(self.script),
            url,
        ]
        run = WrkRun(argv, url, connections, seconds)
        self.runs.append(run)
        return run

    def run(self, url: str, **kwargs: Any) -> WrkResult:
        return self.start(url, **kwargs).result()

    def kill_all(self) -> None:
        for run in self.runs:
            if run.proc.returncode is None:
                run.kill()
