"""Shared fixtures: free ports, a clean child environment, and real servers in subprocesses.

The servers come from `harness` (harness/src/harness), which scripts/bench uses too: each
is its own process (`python -m microsvc run ...` or a script) in a process group of its
own, with stdout and stderr going to a log file under `tmp_path`, stopped with SIGTERM to
the group and SIGKILL if it does not end in time. The gunicorn arbiter never runs inside
the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness import NGINX, NGINX_MISSING, Nginx, Server, clean_env, microsvc_command, start_server
from harness import free_port as find_free_port


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
    # A suite started in the background by a non-interactive shell inherits SIGINT
    # ignored, and so would every process it starts: Ctrl-C (SIGINT) would not reach a
    # `microsvc status --watch` under test. A handled signal is reset to its default in
    # a child at exec, where Python installs its own handler again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers", "both_engines: the test runs once on each HTTP engine (microsvc, gunicorn)"
    )
    config.addinivalue_line(
        "markers", "nginx: the test runs a real nginx; skipped where nginx is not installed"
    )
    config.addinivalue_line(
        "markers",
        "server_tracebacks(why, engines=ENGINES): the servers the test starts (on those HTTP "
        "engines, default every one) are meant to log a traceback (an exception the app "
        "raises); without it, one in any server's log fails the test",
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


TRACEBACK = "Traceback (most recent call last):"


def tracebacks_in(server: Server, lines_after: int = 40) -> list[str]:
    """Every traceback in the server's log, each with the lines that follow it."""
    lines = server.log_text().splitlines()
    return [
        "\n".join(lines[index : index + lines_after])
        for index, line in enumerate(lines)
        if TRACEBACK in line
    ]


@pytest.fixture
def serve(
    request: pytest.FixtureRequest, tmp_path: Path, runtime_dir: Path, http_engine: str
) -> Iterator[ServeFactory]:
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
        server = start_server(
            argv,
            port=port,
            log_path=tmp_path / f"{name or 'server'}-{len(started)}-{port}.log",
            env=clean_env({"XDG_RUNTIME_DIR": str(runtime_dir), **engine_env, **(env or {})}),
            cwd=cwd or tmp_path,
            preexec_fn=preexec_fn,
        )
        started.append(server)
        if wait:
            server.wait_ready(ready_path)
        return server

    yield start

    for server in reversed(started):
        server.kill_leftovers()
    # The server never shows a traceback for what a client or the machine did to it:
    # only a test whose app raises may leave one.
    expected = request.node.get_closest_marker("server_tracebacks")
    if expected is None or http_engine not in expected.kwargs.get("engines", HTTP_ENGINES):
        for server in started:
            if found := tracebacks_in(server):
                pytest.fail(
                    f"a server logged a traceback:\n{server.log_path.name}:\n{found[0]}",
                    pytrace=False,
                )


NginxFactory = Callable[[str, str, int], Nginx]


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[NginxFactory]:
    """`start_nginx(conf_text, host, port)`: a real nginx with that nginx.conf (in a
    directory of its own under tmp_path, its prefix), listening on host:port. Every
    nginx it started is killed at teardown. Tests that use it carry the `nginx` marker."""
    started: list[Nginx] = []

    def start(conf_text: str, host: str, port: int) -> Nginx:
        server = Nginx.start(tmp_path / f"nginx-{len(started)}", conf_text, host, port)
        started.append(server)
        server.wait_listening()
        return server

    yield start

    for server in started:
        server.kill()


#: The figures tests record as `user_properties` (reliability: `figures`; container: its
#: `_figures_in_reports`), printed at the end of the run: property name, section title,
#: whether each line starts with the test's name.
FIGURE_SECTIONS = (
    ("figures", "reliability figures", True),
    ("container figures", "container figures", False),
)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures of every test that ran, read from its reports, which reach this
    process from pytest-xdist's workers too (and this conftest is the one every run
    loads, where the workers alone collect the tiers' own)."""
    for prop, title, named in FIGURE_SECTIONS:
        figures: dict[str, list[str]] = {}
        for reports in terminalreporter.stats.values():
            for report in reports:
                properties = getattr(report, "user_properties", ())
                lines = [str(value) for name, value in properties if name == prop]
                # Each phase's report carries the lines so far; the last has them all.
                if len(lines) > len(figures.get(report.nodeid, ())):
                    figures[report.nodeid] = lines
        if not figures:
            continue
        terminalreporter.section(title)
        for nodeid, lines in sorted(figures.items()):
            for line in lines:
                prefix = f"{nodeid.rpartition('/')[2]}: " if named else ""
                terminalreporter.write_line(prefix + line)


#: The tiers of the suite: the directories under tests/, each selected by the marker of
#: its name (`pytest -m reliability`), declared in pyproject.toml.
TIERS = ("unit", "cli", "e2e", "reliability", "container")
_TESTS_DIR = Path(__file__).resolve().parent


#: With pytest-xdist, the order the tiers' files are handed out in (scripts/run-pytest):
#: the tiers whose files take longest first, so that the short files of the unit and CLI
#: tiers fill the end of the run instead of a long file starting last.
PARALLEL_ORDER = ("reliability", "container", "e2e", "cli", "unit")


def _tier_of(item: pytest.Item) -> str | None:
    try:
        parts = item.path.resolve().relative_to(_TESTS_DIR).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier, the directory it is in. The directory decides: a
    tier marker that a module, class or test gives itself is dropped, so `-m TIER`
    selects that directory and nothing else.

    In a pytest-xdist worker, the tests are put in PARALLEL_ORDER of their tiers (each
    tier's in the order collected): every worker collects the same order, and with
    `--dist loadfile --no-loadscope-reorder` the files are handed out in it."""
    if hasattr(config, "workerinput"):
        rank = {tier: index for index, tier in enumerate(PARALLEL_ORDER)}
        items.sort(key=lambda item: rank.get(_tier_of(item) or "", len(rank)))
    for item in items:
        tier = _tier_of(item)
        for node in item.listchain():
            node.own_markers[:] = [
                mark for mark in node.own_markers if mark.name not in TIERS or mark.name == tier
            ]
        if tier is not None:
            item.add_marker(tier)
        if NGINX is None and item.get_closest_marker("nginx"):
            item.add_marker(pytest.mark.skip(reason=NGINX_MISSING))
