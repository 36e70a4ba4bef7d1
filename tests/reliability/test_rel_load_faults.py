"""Faults under load: HUP, recycling by request count, a worker killed with SIGKILL.

wrk keeps 50 connections busy for about 4 s while the fault happens. A request fails when
wrk sees a socket error (connect, read, write, timeout) or a status other than 2xx.
Plain gunicorn 27 loses nothing on HUP or on recycling; a worker killed with -9 loses
the requests it had in flight and nothing else (../shared/notes/facts.md).
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import TYPE_CHECKING

import pytest

from harness import Server, Wrk

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = pytest.mark.e2e

LOAD_SECONDS = 4
CONNECTIONS = 50
#: How soon the master must have replaced a killed worker.
REPLACE_DEADLINE = 2.0


def settled_workers(server: Server, expected: int) -> set[int]:
    """The worker pids once the master has `expected` of them for half a second."""
    count = server.wait_workers(expected, stable_for=0.5, deadline=20)
    assert count == expected, f"{count} workers, expected {expected}: {server.describe()}"
    return server.worker_pids()


def test_hup_three_times_under_load_fails_no_request_and_replaces_workers(
    serve: ServeFactory, wrk: Wrk, figures: Figures
) -> None:
    server = serve(["-k", "sync", "--workers", "4"])
    before = settled_workers(server, 4)

    load = wrk.start(server.url + "/data", seconds=LOAD_SECONDS, connections=CONNECTIONS)
    for _ in range(3):
        time.sleep(1.0)
        os.kill(server.pid, signal.SIGHUP)
    result = load.result()
    figures(f"{result} [sync x4, 3 HUPs]")

    assert server.proc.poll() is None, server.describe()
    assert result.responses > 0, result.text
    assert result.failed == 0, f"{result}\n{result.text}\n{server.describe()}"
    after = settled_workers(server, 4)
    assert before.isdisjoint(after), f"workers {before} before HUP, {after} after"
    assert server.log_text().lower().count("handling signal: hup") == 3, server.describe()


#: microsvc's line for a worker that --max-requests 200 --max-requests-jitter 20 recycles.
RECYCLED_RE = re.compile(
    r"Recycling worker \(pid: (\d+)\): served (\d+) requests \(--max-requests 200 \+ jitter (\d+)\)"
)

#: How soon a recycled worker exits once the load is over.
RECYCLE_EXIT_DEADLINE = 10.0

RECYCLING_CLASSES = {
    "sync": ["-k", "sync", "--workers", "4"],
    "gthread": ["-k", "gthread", "--workers", "2", "--threads", "4"],
    "gevent": ["-k", "gevent", "--workers", "2"],
}


@pytest.mark.parametrize("worker_class", list(RECYCLING_CLASSES))
def test_max_requests_recycles_workers_under_load_without_failures(
    serve: ServeFactory, wrk: Wrk, figures: Figures, worker_class: str
) -> None:
    args = RECYCLING_CLASSES[worker_class]
    workers = int(args[args.index("--workers") + 1])
    server = serve([*args, "--max-requests", "200", "--max-requests-jitter", "20"])
    before = settled_workers(server, workers)

    result = wrk.run(server.url + "/data", seconds=LOAD_SECONDS, connections=CONNECTIONS)
    recycled = [tuple(map(int, found)) for found in RECYCLED_RE.findall(server.log_text())]
    recycled_pids = [pid for pid, _, _ in recycled]
    # A recycled worker finishes the requests it has in flight, then exits.
    end = time.monotonic() + RECYCLE_EXIT_DEADLINE
    while (still := server.worker_pids() & set(recycled_pids)) and time.monotonic() < end:
        time.sleep(0.1)
    after = settled_workers(server, workers)
    figures(
        f"{result} [{worker_class} x{workers}, max-requests 200+20: "
        f"{len(recycled)} workers recycled]"
    )

    assert server.proc.poll() is None, server.describe()
    assert result.responses > 0, result.text
    assert result.failed == 0, f"{result}\n{result.text}\n{server.describe()}"
    # The load sends thousands of requests: every worker of the first generation reaches
    # its 200 + 0..20 requests, names the reason once, exits and is replaced.
    assert before <= set(recycled_pids), f"{before} not all recycled: {server.describe()}"
    assert len(recycled_pids) == len(set(recycled_pids)), server.describe()
    assert not still, f"recycled workers {still} still running: {server.describe()}"
    assert after.isdisjoint(recycled_pids), f"{after}: {server.describe()}"
    threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 1
    for pid, served, jitter in recycled:
        # Threads finishing requests together may count past the limit before it stops.
        assert 0 <= jitter <= 20, (pid, jitter)
        assert 200 + jitter <= served < 200 + jitter + threads, (pid, served, jitter)


KILL_CLASSES = {
    "sync": ["-k", "sync", "--workers", "4"],
    "gevent": ["-k", "gevent", "--workers", "2"],
}


@pytest.mark.parametrize("worker_class", list(KILL_CLASSES))
def test_sigkill_of_a_worker_under_load_is_replaced_and_loses_only_its_requests(
    serve: ServeFactory, wrk: Wrk, figures: Figures, worker_class: str, http_engine: str
) -> None:
    args = KILL_CLASSES[worker_class]
    workers = int(args[args.index("--workers") + 1])
    server = serve(args)
    before = settled_workers(server, workers)

    load = wrk.start(server.url + "/io?ms=20", seconds=LOAD_SECONDS, connections=CONNECTIONS)
    time.sleep(1.5)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replaced_after = None
    while time.monotonic() - killed_at < REPLACE_DEADLINE + 3:
        now = server.worker_pids()
        if len(now) == workers and victim not in now:
            replaced_after = time.monotonic() - killed_at
            break
        time.sleep(0.05)
    result = load.result()
    replaced = "never" if replaced_after is None else f"{replaced_after:.2f} s"
    figures(f"{result} [{worker_class} x{workers}, 1 worker killed, replaced in {replaced}]")

    assert server.proc.poll() is None, server.describe()
    assert replaced_after is not None and replaced_after <= REPLACE_DEADLINE, (
        f"worker {victim} replaced after {replaced}: {server.describe()}"
    )
    assert result.responses > 0, result.text
    # A kill loses the requests the worker had in flight: at most one per connection it
    # holds (kept alive), and one for sync on gunicorn's engine, which closes each
    # connection after its response.
    in_flight = 1 if worker_class == "sync" and http_engine == "gunicorn" else CONNECTIONS
    assert result.failed <= in_flight, f"{result}\n{result.text}\n{server.describe()}"
    # gunicorn's arbiter names the signal that ended the worker, and nothing else was killed.
    log = server.log_text()
    assert log.count(f"Worker (pid:{victim}) was sent SIGKILL! Perhaps out of memory?") == 1, (
        server.describe()
    )
    assert log.count("was sent SIGKILL") == 1, server.describe()
