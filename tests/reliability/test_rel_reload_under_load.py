"""Workers stopped under load (reload, recycling) lose no request, on every worker class.

Reload: one server per worker class, 3 workers, then one run per entry of
RUN_CONNECTIONS, back to back: wrk keeps that many connections busy on `/data` for
LOAD_SECONDS while the master gets HUP three times, HUP_INTERVAL apart. Each HUP starts
3 new workers and stops the 3 old ones gracefully, so one run stops 9 workers under
load. Recycling (gevent and eventlet, the classes that hold many connections at once):
one run at RECYCLE_CONNECTIONS with `--max-requests`, so that every worker stops, and is
replaced, several times; sync and gthread recycling under load is in
`test_rel_load_faults.py`.

Every run must end with 0 socket errors and 0 non-2xx responses, and the log must show
no connection dropped by a stopping worker ("Socket error processing request").

50 connections is the load of the report these tests come from. With 200, each worker
holds more connections as it stops, which makes a drop far more likely where one can
happen. Before the gevent worker kept its listening sockets' addresses (see
`microsvc.workers.gevent`), a stopping gevent worker dropped connections it had accepted
but not yet served, on either HTTP engine: every execution of the reload test failed
(5 of 5; 4 to 142 failed requests in a run, mostly at 200 connections), and so did
every recycling run (8 of 8).

The classes run on the default HTTP engine; the recycling runs of gevent and eventlet
also on gunicorn's request path, where that drop was found. A run is short on purpose:
what a run tests is its worker stops, not the time between them. The figures of every
run are printed and kept in the reliability table.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest

from harness import Server, Wrk

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = pytest.mark.e2e

WORKERS = 3
HUPS = 3
#: One reload run (HUP x3) per entry: wrk's connections in that run.
RUN_CONNECTIONS = (50, 50, 50, 200, 200)
#: wrk takes whole seconds; the HUPs come at 0.75, 1.5 and 2.25 s.
LOAD_SECONDS = 3
HUP_INTERVAL = 0.75
#: Recycling by request count: every worker stops after about 300 requests.
MAX_REQUESTS = ["--max-requests", "300", "--max-requests-jitter", "30"]
RECYCLE_CONNECTIONS = 200

CLASSES = {
    "sync": ["-k", "sync"],
    "gthread": ["-k", "gthread", "--threads", "4"],
    "gevent": ["-k", "gevent"],
    "eventlet": ["-k", "eventlet"],
}
#: Recycling runs where a stopping worker has many connections in flight: gevent and
#: eventlet, on the default HTTP engine and on gunicorn's request path (where the drop
#: was found; the variable is ignored where there is no choice of engine).
GUNICORN_ENGINE = {"MICROSVC_HTTP_ENGINE": "gunicorn"}
RECYCLE_CASES: dict[str, tuple[list[str], dict[str, str]]] = {
    "gevent": (["-k", "gevent"], {}),
    "eventlet": (["-k", "eventlet"], {}),
    "gevent-gunicorn-engine": (["-k", "gevent"], GUNICORN_ENGINE),
    "eventlet-gunicorn-engine": (["-k", "eventlet"], GUNICORN_ENGINE),
}

#: Lines a stopping worker logs when it drops a connection it had accepted.
DROPPED = ("Socket error processing request", "Error handling request")


def settle(server: Server, expected: int) -> set[int]:
    """The worker pids once the master has `expected` of them for a moment."""
    count = server.wait_workers(expected, stable_for=0.3, deadline=20)
    assert count == expected, f"{count} workers, expected {expected}: {server.describe()}"
    return server.worker_pids()


def dropped_lines(log: str) -> dict[str, int]:
    return {line: log.count(line) for line in DROPPED if line in log}


@pytest.mark.parametrize("worker_class", list(CLASSES))
def test_hup_three_times_under_load_loses_no_request(
    serve: ServeFactory, wrk: Wrk, figures: Figures, worker_class: str
) -> None:
    server = serve([*CLASSES[worker_class], "--workers", str(WORKERS)])
    first = settle(server, WORKERS)

    results = []
    runs = len(RUN_CONNECTIONS)
    for run, connections in enumerate(RUN_CONNECTIONS, 1):
        load = wrk.start(server.url + "/data", seconds=LOAD_SECONDS, connections=connections)
        for _ in range(HUPS):
            time.sleep(HUP_INTERVAL)
            os.kill(server.pid, signal.SIGHUP)
        result = load.result()
        results.append(result)
        figures(f"{result} [{worker_class} x{WORKERS}, run {run}/{runs}, {HUPS} HUPs]")
        assert server.proc.poll() is None, server.describe()

    last = settle(server, WORKERS)
    log = server.log_text()
    failed = [(run, result.failed) for run, result in enumerate(results, 1) if result.failed]
    dropped = dropped_lines(log)
    figures(
        f"{worker_class}: {runs} runs, {sum(result.sent for result in results)} requests "
        f"({[result.sent for result in results]}), failed per run "
        f"{[result.failed for result in results]}, dropped-connection log lines {dropped or 0}"
    )
    assert all(result.responses > 0 for result in results), [r.text for r in results]
    assert not failed, f"runs with failed requests (run, failed): {failed}\n{server.describe()}"
    assert not dropped, f"stopping workers dropped connections: {dropped}\n{server.describe()}"
    assert first.isdisjoint(last), f"workers {first} before the HUPs, {last} after"
    assert log.lower().count("handling signal: hup") == HUPS * runs, server.describe()


@pytest.mark.parametrize("worker_class", list(RECYCLE_CASES))
def test_recycling_by_requests_under_load_loses_no_request(
    serve: ServeFactory, wrk: Wrk, figures: Figures, worker_class: str
) -> None:
    args, env = RECYCLE_CASES[worker_class]
    server = serve([*args, "--workers", str(WORKERS), *MAX_REQUESTS], env=env)
    settle(server, WORKERS)

    result = wrk.run(server.url + "/data", seconds=LOAD_SECONDS, connections=RECYCLE_CONNECTIONS)
    log = server.log_text()
    recycled = max(log.count("Recycling worker"), log.count("Autorestarting worker"))
    dropped = dropped_lines(log)
    figures(f"{result} [{worker_class} x{WORKERS}, max-requests 300+30: {recycled} recycled]")

    assert server.proc.poll() is None, server.describe()
    assert result.responses > 0, result.text
    assert recycled > 0, f"no worker recycled after {result.responses} requests"
    assert result.failed == 0, f"{result}\n{result.text}\n{server.describe()}"
    assert not dropped, f"stopping workers dropped connections: {dropped}\n{server.describe()}"
