"""Workers are recycled by memory, by lifetime and by request count, gracefully: the
reason is logged, the worker pid changes, and no request the client sent fails.

Timing margins are generous: the tests wait for log lines and pid changes, they do not
measure how fast recycling happens.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

#: Each call to /leak keeps ~20 MB more in the worker (written, so it is resident).
LEAKY_APP = """\
import os

LEAK = []


def app(environ, start_response):
    if environ["PATH_INFO"] == "/leak":
        LEAK.append(b"x" * (20 * 1000 * 1000))
    body = f"{os.getpid()} {len(LEAK)}".encode()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]
"""

LINE = r"Recycling worker \(pid: (?P<pid>\d+)\): "
MEMORY_LINE = (
    LINE + r"memory \((?P<measure>USS|RSS)\) (?P<own>[\d.]+)MiB above --max-worker-memory "
    r"(?P<limit>\S+)"
)
LIFETIME_LINE = (
    LINE + r"lifetime (?P<draw>[\d.]+)s reached \(--max-worker-lifetime 2s \+ jitter "
    r"(?P<jitter>[\d.]+)s\)"
)
MAX_REQUESTS_LINE = LINE + r"served (?P<served>\d+) requests \(--max-requests 5\)"


def get_pid(server: Server, path: str = "/") -> int:
    """GET `path`; the leaky app answers '<pid> <leaked>'. Fails on anything but 200."""
    with requests.get(server.url + path, timeout=60) as response:
        assert response.status_code == 200, f"{path}: {response.status_code}\n{server.describe()}"
        return int(response.text.split()[0])


@pytest.fixture
def leaky_app(tmp_path: Path) -> str:
    (tmp_path / "leaky.py").write_text(LEAKY_APP)
    return "leaky:app"


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_memory_limit_recycles_a_leaking_worker_without_failing_a_request(
    serve: ServeFactory, leaky_app: str, worker_class: str
) -> None:
    server = serve(
        [leaky_app, "-k", worker_class, "--workers", "1", "--max-worker-memory", "150MB"]
    )
    first = get_pid(server)
    pids = [first]
    deadline = time.monotonic() + 60
    # Leak until a different worker answers: every request must get 200 meanwhile.
    while pids[-1] == first:
        assert time.monotonic() < deadline, f"no recycle after {len(pids)} calls\n" + (
            server.describe()
        )
        pids.append(get_pid(server, "/leak"))
        time.sleep(0.2)

    match = server.wait_log(MEMORY_LINE)
    assert int(match["pid"]) == first, server.describe()
    assert match["limit"] == "143.1MiB", match.group(0)  # 150 MB = 143.1 MiB
    assert match["measure"] == "USS", match.group(0)  # own memory, where Linux gives it
    assert float(match["own"]) > 143.1, match.group(0)
    assert first not in server.worker_pids(), server.describe()
    log = server.log_text()
    assert log.count(f"Recycling worker (pid: {first})") == 1, log
    # well below the limit, a worker is left alone: no recycle after 3 calls
    assert pids.count(first) >= 4, pids


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent", "eventlet"])
def test_lifetime_replaces_every_worker(serve: ServeFactory, worker_class: str) -> None:
    server = serve(
        [
            "-k",
            worker_class,
            "--workers",
            "2",
            "--max-worker-lifetime",
            "2s",
            "--max-worker-lifetime-jitter",
            "1s",
        ]
    )
    # Workers live 2-3 s, so a busy machine may already be replacing one: take the
    # first moment both are up.
    assert server.wait_workers(2, stable_for=0.0) == 2, server.describe()
    originals = server.worker_pids()
    deadline = time.monotonic() + 20
    while originals & server.worker_pids():
        assert time.monotonic() < deadline, f"workers not replaced\n{server.describe()}"
        # Requests meanwhile must all succeed (the demo app's /health).
        with requests.get(server.url + "/health", timeout=30) as response:
            assert response.status_code == 200, server.describe()
        time.sleep(0.1)

    log = server.log_text()
    recycled = {
        int(match["pid"]): float(match["draw"]) for match in re.finditer(LIFETIME_LINE, log)
    }
    assert originals <= set(recycled), log
    for pid in originals:
        assert 2.0 <= recycled[pid] <= 3.0, log
    assert server.wait_workers(2, stable_for=0.0) == 2, server.describe()


@pytest.mark.both_engines
def test_max_requests_logs_microsvcs_reason(serve: ServeFactory, leaky_app: str) -> None:
    server = serve([leaky_app, "--workers", "1", "--max-requests", "5"])
    # The first request (readiness probe of the serve fixture) counts too.
    pids = [get_pid(server) for _ in range(8)]
    assert len(set(pids)) >= 2, pids
    first = pids[0]
    match = server.wait_log(MAX_REQUESTS_LINE)
    assert int(match["pid"]) == first, server.describe()
    assert match["served"] == "5", match.group(0)
    log = server.log_text()
    assert "Autorestarting worker after current request." in log, log
