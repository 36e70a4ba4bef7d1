"""gevent and eventlet workers yield to other connections after each response, and the
gevent worker accepts connections in batches."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def test_gevent_worker_lets_other_greenlets_run_after_each_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gevent
    from gunicorn.workers.ggevent import GeventWorker as GunicornGeventWorker

    from microsvc.workers.gevent import GeventWorker

    ran: list[str] = []
    monkeypatch.setattr(
        GunicornGeventWorker, "handle_request", lambda self, *args: ran.append("request")
    )
    worker = GeventWorker.__new__(GeventWorker)
    worker._recycling_on = False
    worker.alive = True

    def serve_two() -> None:
        worker.handle_request("listener", "req", "sock", "addr")
        worker.handle_request("listener", "req", "sock", "addr")

    server = gevent.spawn(serve_two)
    other = gevent.spawn(ran.append, "other connection")
    gevent.joinall([server, other])
    assert ran == ["request", "other connection", "request"]


#: The eventlet check, run in a Python of its own: importing eventlet registers an at-fork
#: hook that warns at every later fork of the importing process, and the test process
#: forks (subprocesses with a preexec_fn) in later tests.
EVENTLET_FAIRNESS = """
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\\s*Eventlet is deprecated")
    import eventlet
from gunicorn.workers.base_async import AsyncWorker

from microsvc.workers.eventlet import EventletWorker

ran = []
AsyncWorker.handle_request = lambda self, *args: ran.append("request")
worker = EventletWorker.__new__(EventletWorker)
worker._recycling_on = False
worker.alive = True


def serve_two():
    worker.handle_request("listener", "req", "sock", "addr")
    worker.handle_request("listener", "req", "sock", "addr")


server = eventlet.spawn(serve_two)
other = eventlet.spawn(ran.append, "other connection")
server.wait()
other.wait()
print(",".join(ran))
"""


def test_eventlet_worker_lets_other_greenthreads_run_after_each_response() -> None:
    if importlib.util.find_spec("eventlet") is None:
        pytest.skip("eventlet is not installed (pip install 'microsvc[eventlet]')")
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", EVENTLET_FAIRNESS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "request,other connection,request"


def test_gevent_worker_accepts_a_batch_per_turn_even_with_several_workers() -> None:
    from gevent.server import StreamServer

    from microsvc.workers.gevent import ACCEPT_BATCH, BatchAcceptServer

    server = BatchAcceptServer(("127.0.0.1", 0), handle=lambda *args: None)
    assert server.max_accept == StreamServer.max_accept  # gevent's default, one worker
    server.max_accept = 1  # what gunicorn sets when it runs several workers
    assert server.max_accept == ACCEPT_BATCH > 1
    server.max_accept = 500
    assert server.max_accept == 500
