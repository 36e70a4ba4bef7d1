"""SIGTERM to the master while slow requests are in flight: every one of them completes.

Each client opens its own connection and asks for /io?ms=2000 (the demo sleeps 2 s).
The clients start one after another, each once the request of the one before runs (the
requests in flight that the workers note in the scoreboard): so no connection waits in
the listen backlog, where a closing listener would reset it, nor in a worker that
accepted it while another request held it. Then TERM goes to the master alone, as a
container runtime sends it. gunicorn's graceful shutdown lets the workers finish, so
every client gets 200 and the master exits 0.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from microsvc.observe.scoreboard import Scoreboard, ScoreboardError, scoreboard_path

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = pytest.mark.e2e

SLOW_MS = 2000
CLIENT_TIMEOUT = 30.0
#: How long the clients may take to have every request running.
START_DEADLINE = 10.0

#: worker class -> (arguments, in-flight requests). A sync worker serves one request at a
#: time, so sync gets one worker per request (10, to spare the 2-core machines).
CASES = {
    "sync": (["-k", "sync", "--workers", "10"], 10),
    "gthread": (["-k", "gthread", "--workers", "2", "--threads", "10"], 20),
    "gevent": (["-k", "gevent", "--workers", "2"], 20),
}


@dataclass
class SlowClients:
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> str:
        counts = {status: self.statuses.count(status) for status in sorted(set(self.statuses))}
        return f"statuses {counts}, {len(self.errors)} errors {self.errors[:3]}"


def slow_get(port: int, path: str, clients: SlowClients) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        with clients.lock:
            clients.statuses.append(response.status)
            clients.finished_at.append(time.monotonic())
    except Exception as exc:
        with clients.lock:
            clients.errors.append(repr(exc))
            clients.finished_at.append(time.monotonic())
    finally:
        connection.close()


def requests_in_flight(board: Scoreboard) -> int:
    """Requests the server's app runs now, as its workers note them in the scoreboard."""
    try:
        return sum(worker.in_flight for worker in board.snapshot().workers)
    except ScoreboardError:  # the header is being written: read again
        return 0


def wait_in_flight(board: Scoreboard, wanted: int, end: float) -> int:
    """Poll until `wanted` requests run or the monotonic clock passes `end`; return the
    last count."""
    running = requests_in_flight(board)
    while running < wanted and time.monotonic() < end:
        time.sleep(0.005)
        running = requests_in_flight(board)
    return running


@pytest.mark.parametrize("worker_class", list(CASES))
def test_sigterm_with_slow_requests_in_flight_completes_them_all(
    serve: ServeFactory, runtime_dir: Path, figures: Figures, worker_class: str
) -> None:
    args, in_flight = CASES[worker_class]
    server = serve(args)
    workers = int(args[args.index("--workers") + 1])
    assert server.wait_workers(workers, stable_for=0.5, deadline=20) == workers, server.describe()
    # Every worker must be able to take a request: the slow requests start one by one and
    # the first ends after SLOW_MS.
    server.wait_booted()

    clients = SlowClients()
    threads = [
        threading.Thread(
            target=slow_get, args=(server.port, f"/io?ms={SLOW_MS}", clients), daemon=True
        )
        for _ in range(in_flight)
    ]
    board = Scoreboard.open(scoreboard_path(server.pid, runtime_dir))
    try:
        first_at = time.monotonic()
        end = first_at + START_DEADLINE
        running = 0
        for started, thread in enumerate(threads, 1):
            thread.start()
            running = wait_in_flight(board, started, end)
            if running < started:
                break
    finally:
        board.close()
    assert running >= in_flight, (
        f"only {running} of {in_flight} running ({started} clients started; "
        f"{clients.summary()}): {server.describe()}"
    )

    term_at = time.monotonic()
    ramp = term_at - first_at
    code = server.stop(signal.SIGTERM, group=False)
    stopped_after = time.monotonic() - term_at
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 5)
    early = sum(1 for t in clients.finished_at if t < term_at)
    figures(
        f"{in_flight} requests in flight at TERM ({ramp:.2f} s after the first began), "
        f"{clients.statuses.count(200)} got 200, "
        f"{in_flight - clients.statuses.count(200)} failed; master exit {code} after "
        f"{stopped_after:.1f} s [{worker_class} {' '.join(args[2:])}]"
    )

    assert early == 0, f"{early} requests ended before TERM: {clients.summary()}"
    assert not clients.errors, f"{clients.summary()}\n{server.describe()}"
    assert clients.statuses == [200] * in_flight, f"{clients.summary()}\n{server.describe()}"
    assert code == 0, server.describe()
    assert not server.orphans, f"workers {server.orphans} outlived the master"
