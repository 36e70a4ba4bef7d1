"""Helpers of the reliability tier: wrk as a load generator, and a record of the figures.

`wrk` runs the real load generator against a loopback URL for a few seconds with a Lua
script that counts every response and every non-2xx status exactly (wrk's own "Non-2xx or
3xx responses" line counts statuses above 399 only). wrk runs one Lua state per thread,
so `setup()` keeps each thread and `done()` adds up their counters, as wrk's scripting
documentation shows. The text wrk prints is parsed too ("Socket errors: connect A, read B,
write C, timeout D"), and both views must agree.

    failed = socket errors (connect + read + write + timeout) + non-2xx responses

`figures` keeps one line of figures per test: it is printed at once (seen with -s and in
the captured output of a failing test) and again in a table at the end of the run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The Lua script and its parser are scripts/bench's, so both count alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchlib.errors import RunError
from benchlib.wrk import LUA_SCRIPT, parse_output

#: Where CI and the development machines have it (Debian package `wrk`).
WRK = shutil.which("wrk") or ("/usr/bin/wrk" if Path("/usr/bin/wrk").is_file() else None)

#: Extra seconds wrk may take beyond its duration before it is killed.
WRK_GRACE = 20.0

_SOCKET_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_NON2XX3XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.MULTILINE)


@dataclass
class LoadResult:
    """What one wrk run saw."""

    url: str
    connections: int
    seconds: float
    responses: int
    non2xx: int
    connect: int
    read: int
    write: int
    timeout: int
    text: str

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def failed(self) -> int:
        return self.socket_errors + self.non2xx

    @property
    def sent(self) -> int:
        """Requests that got an answer or failed."""
        return self.responses + self.socket_errors

    def summary(self) -> str:
        return (
            f"{self.sent} requests, {self.failed} failed (non-2xx {self.non2xx}; socket errors "
            f"connect {self.connect}, read {self.read}, write {self.write}, timeout "
            f"{self.timeout}) in {self.seconds:.1f} s at {self.connections} connections "
            f"on {self.url}"
        )

    def __str__(self) -> str:
        return self.summary()


def parse_wrk_output(text: str, url: str, connections: int, seconds: float) -> LoadResult:
    """The figures of one run, from the Lua summary line cross-checked with wrk's text."""
    try:
        lua = parse_output(text)
    except RunError as exc:
        raise AssertionError(f"{exc}\n{text}") from None
    socket = _SOCKET_RE.search(text)
    text_errors = tuple(map(int, socket.groups())) if socket else (0, 0, 0, 0)
    if text_errors != (lua.connect, lua.read, lua.write, lua.timeout):
        raise AssertionError(f"wrk's text and summary disagree on socket errors:\n{text}")
    over_399 = _NON2XX3XX_RE.search(text)
    if (int(over_399.group(1)) if over_399 else 0) != lua.status or lua.status > lua.non2xx:
        raise AssertionError(
            f"wrk's status errors {lua.status} do not fit non2xx {lua.non2xx}:\n{text}"
        )
    if lua.responses != lua.requests:
        raise AssertionError(f"Lua counted {lua.responses} responses, wrk {lua.requests}:\n{text}")
    return LoadResult(
        url,
        connections,
        seconds,
        lua.responses,
        lua.non2xx,
        lua.connect,
        lua.read,
        lua.write,
        lua.timeout,
        text,
    )


class WrkRun:
    """wrk running in the background; `result()` waits for it and parses its output."""

    def __init__(self, argv: list[str], url: str, connections: int, duration: float) -> None:
        self.url = url
        self.connections = connections
        self.duration = duration
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._result: LoadResult | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def result(self) -> LoadResult:
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=self.duration + WRK_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"wrk did not end within {self.duration + WRK_GRACE:.0f} s"
                ) from None
            text = out.decode(errors="replace")
            if self.proc.returncode != 0:
                raise AssertionError(f"wrk exited with {self.proc.returncode}:\n{text}")
            self._result = parse_wrk_output(text, self.url, self.connections, self.elapsed())
        return self._result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


class Wrk:
    """`wrk.start(url)` runs wrk in the background, `wrk.run(url)` waits for its result."""

    def __init__(self, script: Path) -> None:
        self.script = script
        self.runs: list[WrkRun] = []

    def start(
        self,
        url: str,
        *,
        seconds: float = 4,
        connections: int = 50,
        threads: int = 2,
        timeout: float = 5,
    ) -> WrkRun:
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"load goes to 127.0.0.1 only, not {url}")
        argv = [
            str(WRK),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            f"--timeout={timeout:g}s",
            "--latency",
            "-s",
            str(self.script),
            url,
        ]
        run = WrkRun(argv, url, connections, seconds)
        self.runs.append(run)
        return run

    def run(self, url: str, **kwargs: Any) -> LoadResult:
        return self.start(url, **kwargs).result()


@pytest.fixture(scope="session")
def wrk_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wrk") / "count.lua"
    path.write_text(LUA_SCRIPT)
    return path


@pytest.fixture
def wrk(wrk_script: Path) -> Iterator[Wrk]:
    """The load generator; the test is skipped where wrk is not installed."""
    if WRK is None:
        pytest.skip("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    runner = Wrk(wrk_script)
    yield runner
    for run in runner.runs:
        run.kill()


# --- figures -------------------------------------------------------------------------

_FIGURES: list[tuple[str, str]] = []


@dataclass
class Figures:
    """One line of figures per test: printed now, and in a table at the end of the run."""

    nodeid: str
    node: Any
    lines: list[str] = field(default_factory=list)

    def __call__(self, text: str | LoadResult) -> str:
        line = str(text)
        self.lines.append(line)
        _FIGURES.append((self.nodeid, line))
        self.node.user_properties.append(("figures", line))
        print(f"FIGURES {self.nodeid}: {line}", flush=True)
        return line


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.nodeid.rpartition("/")[2], request.node)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for nodeid, line in _FIGURES:
        terminalreporter.write_line(f"{nodeid}: {line}")
