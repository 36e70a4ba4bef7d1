"""Faults under load: HUP, recycling by request count, a worker killed with SIGKILL.

wrk keeps 50 connections busy for about 4 s while the fault happens. A request fails when
wrk sees a socket error (connect, read, write, timeout) or a status other than 2xx.
Plain gunicorn 27 loses nothing on HUP or on recycling; a worker killed with -9 loses
the requests it had in flight and nothing else (../shared/notes/facts.md).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.e2e

LOAD_SECONDS = 4
CONNECTIONS = 50
#: How soon the master must have replaced a killed worker.
REPLACE_DEADLINE = 2.0


def worker_pids(server) -> set[int]:
    return {worker.pid for worker in server.workers()}


def settled_workers(server, expected: int) -> set[int]:
    """The worker pids once the master has `expected` of them for half a second."""
    count = server.wait_workers(expected, stable_for=0.5, deadline=20)
    assert count == expected, f"{count} workers, expected {expected}: {server.describe()}"
    return worker_pids(server)


def test_hup_three_times_under_load_fails_no_request_and_replaces_workers(serve, wrk, figures):
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


RECYCLING_CLASSES = {
    "sync": ["-k", "sync", "--workers", "4"],
    "gthread": ["-k", "gthread", "--workers", "2", "--threads", "4"],
    "gevent": ["-k", "gevent", "--workers", "2"],
}


@pytest.mark.parametrize("worker_class", list(RECYCLING_CLASSES))
def test_max_requests_recycles_workers_under_load_without_failures(
    serve, wrk, figures, worker_class
):
    args = RECYCLING_CLASSES[worker_class]
    workers = int(args[args.index("--workers") + 1])
    server = serve([*args, "--max-requests", "200", "--max-requests-jitter", "20"])
    before = settled_workers(server, workers)

    result = wrk.run(server.url + "/data", seconds=LOAD_SECONDS, connections=CONNECTIONS)
    log = server.log_text()
    # gunicorn's own line, or microsvc's "Recycling worker (pid: N): served N requests".
    restarts = log.count("Autorestarting worker") + log.count("Recycling worker")
    figures(
        f"{result} [{worker_class} x{workers}, max-requests 200+20: {restarts} recycle log lines]"
    )

    assert server.proc.poll() is None, server.describe()
    assert result.responses > 0, result.text
    assert result.failed == 0, f"{result}\n{result.text}\n{server.describe()}"
    after = settled_workers(server, workers)
    assert restarts > 0 or not before & after, (
        f"no worker was recycled after {result.responses} requests: {server.describe()}"
    )


KILL_CLASSES = {
    "sync": ["-k", "sync", "--workers", "4"],
    "gevent": ["-k", "gevent", "--workers", "2"],
}


@pytest.mark.parametrize("worker_class", list(KILL_CLASSES))
def test_sigkill_of_a_worker_under_load_is_replaced_and_loses_only_its_requests(
    serve, wrk, figures, worker_class
):
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
        now = worker_pids(server)
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
    # A kill loses the requests the worker had in flight: at most one per connection.
    assert result.failed <= CONNECTIONS, f"{result}\n{result.text}\n{server.describe()}"
    assert "was sent SIGKILL" in server.log_text() or "killed" in server.log_text().lower(), (
        server.describe()
    )
