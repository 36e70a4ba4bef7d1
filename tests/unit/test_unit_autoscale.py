"""The autoscaler's decisions, from samples (no server, no clock)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from microsvc.observe.scoreboard import Listener
from microsvc.serving.autoscale import (
    COOLDOWN_ENV,
    DEFAULT_COOLDOWN,
    ArbiterAutoscaler,
    Autoscaler,
    Sample,
    cooldown_from_env,
    sample_scoreboard,
)


def sample(at: float, serving: int, busy: int = 0, **kw: Any) -> Sample:
    return Sample(at=at, serving=serving, booting=kw.pop("booting", 0), busy=busy, **kw)


def test_queue_time_adds_half_again_at_once() -> None:
    scaler = Autoscaler(1, 8, cooldown=60)
    decision = scaler.decide(4, sample(0, 4, 4, queue_time=0.3))
    assert decision is not None and decision.count == 6 and decision.direction == "up"
    assert "queue time 0.300s" in decision.reason


def test_one_worker_grows_by_one_and_never_past_the_most() -> None:
    scaler = Autoscaler(1, 2, cooldown=60)
    first = scaler.decide(1, sample(0, 1, 1, queue_time=1.0))
    assert first is not None and first.count == 2
    assert scaler.decide(2, sample(1, 2, 2, queue_time=1.0)) is None


def test_no_second_step_while_the_new_workers_boot() -> None:
    scaler = Autoscaler(1, 8, cooldown=60)
    assert scaler.decide(2, sample(0, 2, 2, queue_time=0.5, booting=1)) is None


def test_busy_ratio_and_listen_queue_need_two_samples_in_a_row() -> None:
    scaler = Autoscaler(1, 4, cooldown=60)
    assert scaler.decide(2, sample(0, 2, 2)) is None
    busy = scaler.decide(2, sample(1, 2, 2))
    assert busy is not None and busy.count == 3 and "busy ratio 1.00" in busy.reason
    queued = Autoscaler(1, 4, cooldown=60)
    assert queued.decide(2, sample(0, 2, 1, listen_queue=5)) is None
    decision = queued.decide(2, sample(1, 2, 1, listen_queue=7))
    assert decision is not None and "7 connections waiting" in decision.reason


def test_a_short_wait_is_no_reason_to_grow() -> None:
    scaler = Autoscaler(1, 4, cooldown=60)
    for at in range(5):
        assert scaler.decide(2, sample(at, 2, 1, queue_time=0.01)) is None


def test_idle_for_the_cooldown_falls_to_the_minimum() -> None:
    scaler = Autoscaler(2, 8, cooldown=10)
    for at in range(10):
        assert scaler.decide(8, sample(at, 8, 0)) is None
    decision = scaler.decide(8, sample(10, 8, 0))
    assert decision is not None and decision.count == 2 and decision.direction == "down"
    assert "at most 0 of 8 workers busy for 10s" in decision.reason


def test_down_keeps_what_the_busiest_moment_needed() -> None:
    scaler = Autoscaler(1, 8, cooldown=10)
    for at in range(11):
        scaler.decide(8, sample(at, 8, 3 if at == 4 else 1))
    assert scaler.last is not None and scaler.last.count == 4  # ceil(3 / 0.75)


def test_pressure_restarts_the_cooldown() -> None:
    scaler = Autoscaler(1, 4, cooldown=10)
    for at in range(8):
        scaler.decide(4, sample(at, 4, 0))
    assert scaler.decide(4, sample(8, 4, 4, queue_time=0.5)) is None  # at the most
    for at in range(9, 19):  # at 18 the busy sample of 8 is still in the window
        assert scaler.decide(4, sample(at, 4, 0)) is None
    assert scaler.decide(4, sample(19, 4, 0)) is not None


def test_the_memory_limit_caps_growth() -> None:
    mib = 1024**2
    scaler = Autoscaler(1, 8, cooldown=60, memory_limit=1000 * mib)
    decision = scaler.decide(
        2, sample(0, 2, 2, queue_time=1.0, own_memory=300 * mib, shared_memory=200 * mib)
    )
    # 0.9 * 1000 - 200 = 700 MiB: two workers of 300 MiB, so no growth at all
    assert decision is None
    roomy = Autoscaler(1, 8, cooldown=60, memory_limit=1000 * mib)
    grown = roomy.decide(
        1, sample(0, 1, 1, queue_time=1.0, own_memory=100 * mib, shared_memory=100 * mib)
    )
    assert grown is not None and grown.count == 2


def test_bounds_are_enforced_first() -> None:
    scaler = Autoscaler(3, 5, cooldown=60)
    low = scaler.decide(1, sample(0, 1))
    assert low is not None and low.count == 3
    high = Autoscaler(1, 5, cooldown=60).decide(9, sample(0, 9))
    assert high is not None and high.count == 5
    assert Autoscaler(9, 4).minimum == 4
    with pytest.raises(ValueError):
        Autoscaler(0, 4)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 5.0), ("0.5", 0.5), ("", DEFAULT_COOLDOWN), ("x", DEFAULT_COOLDOWN), ("-1", 60.0)],
)
def test_cooldown_from_the_environment(text: str, seconds: float) -> None:
    assert cooldown_from_env({COOLDOWN_ENV: text}) == seconds


def view(state: str, in_flight: int = 0, queue: Any = None, memory: Any = None) -> Any:
    return SimpleNamespace(state=state, in_flight=in_flight, queue=queue, memory=memory)


def test_sample_from_a_scoreboard_snapshot() -> None:
    import time

    now = time.time()
    snapshot = SimpleNamespace(
        workers=[
            view("busy", 1, {"seconds": 0.4, "at": now, "shed": 0}, {"own": 10, "shared": 50}),
            view("idle", 0, {"seconds": 9.0, "at": now - 60, "shed": 3}, {"own": 20, "shared": 40}),
            view("booting"),
            view("stopping", 1),
        ],
        listeners=[Listener("127.0.0.1:1", 3, 128), Listener("unix:/x", None, None)],
    )
    got = sample_scoreboard(snapshot, 5.0)
    assert got == Sample(
        at=5.0,
        serving=2,
        booting=1,
        busy=1,
        queue_time=0.4,  # the stale 9 s is not recent
        listen_queue=3,
        own_memory=20,
        shared_memory=50,
    )


class FakeBoard:
    def __init__(self, snapshot: Any) -> None:
        self.snap = snapshot
        self.published: list[tuple[int, int, int, str]] = []

    def snapshot(self) -> Any:
        return self.snap

    def publish_autoscale(self, minimum: int, maximum: int, target: int, reason: str) -> None:
        self.published.append((minimum, maximum, target, reason))


def test_the_arbiter_side_applies_logs_and_publishes(caplog: pytest.LogCaptureFixture) -> None:
    import time

    now = time.time()
    board = FakeBoard(
        SimpleNamespace(
            workers=[view("busy", 1, {"seconds": 2.0, "at": now, "shed": 1})], listeners=[]
        )
    )
    counted: list[tuple[int, str | None]] = []
    server = SimpleNamespace(worker_count_set=lambda n, d=None: counted.append((n, d)))
    arbiter = SimpleNamespace(
        num_workers=1,
        reexec_pid=0,
        scoreboard=board,
        metrics=SimpleNamespace(server=server),
        log=logging.getLogger("test.autoscale"),
    )
    clock = iter([0.0, 0.5, 1.0])
    scaler = ArbiterAutoscaler(lambda: (True, 1, 3, None), cooldown=60, clock=lambda: next(clock))
    with caplog.at_level("INFO", logger="test.autoscale"):
        scaler.tick(arbiter)
        assert arbiter.num_workers == 2
        scaler.tick(arbiter)  # within a second of the last tick: nothing
        assert arbiter.num_workers == 2
    assert counted == [(1, None), (2, "up")]
    assert board.published[0] == (1, 3, 1, "started")
    assert board.published[1][:3] == (1, 3, 2)
    assert any("Autoscale: 1 -> 2 workers, queue time 2.000s" in m for m in caplog.messages)


def test_the_arbiter_side_does_nothing_when_off() -> None:
    arbiter = SimpleNamespace(num_workers=4, reexec_pid=0, scoreboard=FakeBoard(None))
    ArbiterAutoscaler(lambda: (False, 1, 4, None), cooldown=1).tick(arbiter)
    assert arbiter.num_workers == 4
    assert ArbiterAutoscaler.for_app(object()) is None


# what the scoreboard and `microsvc status` show


def test_queue_time_and_the_count_reach_the_scoreboard_and_status(tmp_path: Any) -> None:
    import os
    import time

    from microsvc.observe.scoreboard import Scoreboard, ScoreboardApp
    from microsvc.observe.status import build_report, render
    from microsvc.serving.middleware import QUEUE_TIME_KEY, SHED_KEY

    board = Scoreboard.create(4, worker_class="sync", http_engine="gunicorn", directory=tmp_path)
    try:
        board.reserve(generation=1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                board.attach(board.reserved, 1)
                board.booted()

                def app(environ: Any, start_response: Any) -> list[bytes]:
                    start_response("200 OK", [])
                    return [b""]

                served = ScoreboardApp(app, board)
                for waited, shed in ((0.25, False), (1.5, True), (0.75, False)):
                    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
                    environ[QUEUE_TIME_KEY] = waited
                    environ[SHED_KEY] = shed
                    body = served(environ, lambda *a: None)
                    body.close()  # type: ignore[attr-defined]
            except BaseException:
                code = 1
            os._exit(code)
        board.started(pid)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        board.publish_autoscale(1, 4, 2, "queue time 0.750s")
        snapshot = board.snapshot()
        [view] = snapshot.workers
        assert view.queue is not None
        assert view.queue["seconds"] == 0.75 and view.queue["shed"] == 1
        assert snapshot.autoscale is not None
        assert snapshot.autoscale["target"] == 2
        assert snapshot.autoscale["reason"] == "queue time 0.750s"
        data = build_report(snapshot, time.time())
        assert data["queue_time_seconds"] == 0.75
        assert data["requests_shed"] == 1
        text = render(data)
        assert "queue time 0.750s" in text and "shed 1" in text
        assert "autoscale: 2 workers (between 1 and 4); last change: queue time 0.750s" in text
        # a worker that is gone takes its figures along; a reused slot does not show them
        board.gone(pid, "scale-down")
        assert board.snapshot().workers == []
    finally:
        board.remove()


def test_status_without_queue_time_or_autoscale(tmp_path: Any) -> None:
    import time

    from microsvc.observe.scoreboard import Scoreboard
    from microsvc.observe.status import build_report, render

    board = Scoreboard.create(4, worker_class="sync", http_engine="gunicorn", directory=tmp_path)
    try:
        data = build_report(board.snapshot(), time.time())
        assert data["queue_time_seconds"] is None and data["autoscale"] is None
        assert "queue time - " in render(data) and "autoscale" not in render(data)
    finally:
        board.remove()
