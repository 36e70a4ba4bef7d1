"""gevent and eventlet workers yield to other connections after each response."""

from __future__ import annotations

from typing import Any

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


def test_eventlet_worker_lets_other_greenthreads_run_after_each_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eventlet = pytest.importorskip("eventlet")
    from gunicorn.workers.base_async import AsyncWorker

    from microsvc.workers.eventlet import EventletWorker

    ran: list[str] = []

    def handled(self: Any, *args: Any) -> None:
        ran.append("request")

    monkeypatch.setattr(AsyncWorker, "handle_request", handled)
    worker = EventletWorker.__new__(EventletWorker)
    worker._recycling_on = False
    worker.alive = True

    def serve_two() -> None:
        worker.handle_request("listener", "req", "sock", "addr")
        worker.handle_request("listener", "req", "sock", "addr")

    server = eventlet.spawn(serve_two)
    other = eventlet.spawn(ran.append, "other connection")
    server.wait()
    other.wait()
    assert ran == ["request", "other connection", "request"]
