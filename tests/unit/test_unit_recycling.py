"""The recycling mixin's decisions, with a fake clock, memory reader and jitter draw.

A fake base stands in for gunicorn's Worker: `notify()` and `handle_request()` are
what the worker loops call; the mixin goes first in the MRO, as in the real classes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from microsvc.config.options import Settings, WorkerClass
from microsvc.workers import ENGINE_WORKER_CLASSES, WORKER_CLASSES
from microsvc.workers.recycling import (
    CHECK_INTERVAL,
    LOG_FORMAT,
    RecyclePolicy,
    Recycling,
    lifetime_reason,
    max_requests_reason,
    memory_reason,
    recycle_policy,
)

MiB = 1024**2
RECYCLE_LINE = re.compile(r"^Recycling worker \(pid: (\d+)\): (.+)$")


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(("info", msg % args))

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(("warning", msg % args))

    def recycles(self) -> list[str]:
        return [line for level, line in self.lines if RECYCLE_LINE.match(line)]


class FakeGunicornWorker:
    """What the mixin needs from gunicorn's Worker, and the max_requests rule."""

    def __init__(
        self, app: Any, max_requests: int = 0, jitter: int = 0, requests_draw: int = 0
    ) -> None:
        self.app = app
        self.cfg = SimpleNamespace(max_requests=max_requests, max_requests_jitter=jitter)
        self.max_requests = max_requests + requests_draw if max_requests else sys.maxsize
        self.alive = True
        self.nr = 0
        self.pid = 4321
        self.log = FakeLog()
        self.notified = 0
        self.booted = False

    def init_process(self) -> None:
        self.booted = True

    def notify(self) -> None:
        self.notified += 1

    def handle_request(self, *args: Any) -> str:
        # gunicorn: count, and stop after the current request when the count is reached
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
        return "handled"


class FakeWorker(Recycling, FakeGunicornWorker):
    def __init__(self, settings: Any = None, *, rss: int = 0, draw: float = 0.0, **kw: Any):
        app = SimpleNamespace(settings=settings) if settings is not None else SimpleNamespace()
        super().__init__(app, **kw)
        self.clock = 1000.0
        self.rss = rss
        self.reads = 0
        self.draw_value = draw
        self.draws: list[tuple[float, float]] = []
        self.woken = 0

    def _now(self) -> float:
        return self.clock

    def _rss(self) -> int:
        self.reads += 1
        return self.rss

    def _draw(self, low: float, high: float) -> float:
        self.draws.append((low, high))
        return low + self.draw_value * (high - low)

    def _wake(self) -> None:
        self.woken += 1

    def tick(self, seconds: float = 1.0) -> None:
        self.clock += seconds
        self.notify()


def settings(**changes: Any) -> Settings:
    return replace(Settings(), **changes)


def started(worker: FakeWorker) -> FakeWorker:
    worker.init_process()
    assert worker.booted
    return worker


# --- memory -------------------------------------------------------------------------


def test_memory_above_once_then_below_does_not_recycle() -> None:
    worker = started(FakeWorker(settings(max_worker_memory=100 * MiB), rss=150 * MiB))
    worker.tick()
    assert worker.reads == 1 and worker.alive
    worker.rss = 50 * MiB
    worker.tick()
    worker.rss = 150 * MiB
    worker.tick()  # above again, but not twice in a row
    assert worker.reads == 3
    assert worker.alive
    assert worker.log.recycles() == []


def test_memory_above_twice_recycles_with_the_measured_size() -> None:
    worker = started(FakeWorker(settings(max_worker_memory=512 * MiB), rss=600 * MiB))
    worker.tick()
    assert worker.alive
    worker.rss = int(612.3 * MiB)
    worker.tick()
    assert not worker.alive
    assert worker.woken == 1
    assert worker.log.recycles() == [
        "Recycling worker (pid: 4321): memory 612.3MiB above --max-worker-memory 512MiB"
    ]


def test_memory_at_the_limit_is_not_above_it() -> None:
    worker = started(FakeWorker(settings(max_worker_memory=100 * MiB), rss=100 * MiB))
    for _ in range(5):
        worker.tick()
    assert worker.alive


def test_memory_is_read_at_most_once_a_second() -> None:
    worker = started(FakeWorker(settings(max_worker_memory=100 * MiB), rss=10 * MiB))
    for _ in range(50):  # a busy worker: many requests and notifies within 0.5 s
        worker.clock += 0.01
        worker.handle_request()
        worker.notify()
    assert worker.reads == 1
    worker.clock += 0.6
    worker.notify()
    assert worker.reads == 2


def test_two_reads_above_within_one_second_cannot_happen() -> None:
    """A spike shorter than a second is read at most once, so it cannot recycle."""
    worker = started(FakeWorker(settings(max_worker_memory=100 * MiB), rss=500 * MiB))
    for _ in range(20):
        worker.clock += 0.04
        worker.handle_request()
    assert worker.reads == 1
    assert worker.alive


def test_a_busy_leaking_worker_is_caught_after_requests_without_notify() -> None:
    worker = started(FakeWorker(settings(max_worker_memory=100 * MiB), rss=10 * MiB))
    worker.handle_request()
    worker.rss = 200 * MiB
    for _ in range(30):
        worker.clock += 0.1
        worker.handle_request()
    assert not worker.alive
    assert len(worker.log.recycles()) == 1


def test_unreadable_memory_turns_the_memory_check_off_with_a_warning() -> None:
    class Unreadable(FakeWorker):
        def _rss(self) -> int:
            raise psutil.AccessDenied(4321)

    worker = started(Unreadable(settings(max_worker_memory=100 * MiB)))
    worker.tick()
    worker.tick()
    assert worker.alive
    warnings = [line for level, line in worker.log.lines if level == "warning"]
    assert len(warnings) == 1 and "--max-worker-memory is off" in warnings[0]
    assert worker.recycling_policy == RecyclePolicy()


# --- lifetime -----------------------------------------------------------------------


@pytest.mark.parametrize("draw", [0.0, 0.25, 1.0])
def test_lifetime_draw_lies_in_lifetime_plus_jitter(draw: float) -> None:
    worker = started(
        FakeWorker(
            settings(max_worker_lifetime=3600.0, max_worker_lifetime_jitter=600.0), draw=draw
        )
    )
    policy = worker.recycling_policy
    assert policy is not None
    assert worker.draws == [(0.0, 600.0)]
    assert policy.lifetime == pytest.approx(3600.0 + draw * 600.0)
    assert 3600.0 <= policy.lifetime <= 4200.0


def test_real_draws_lie_in_the_range_and_differ() -> None:
    class RealDraw(FakeWorker):
        _draw = Recycling._draw

    lifetimes = set()
    for _ in range(20):
        worker = started(
            RealDraw(settings(max_worker_lifetime=10.0, max_worker_lifetime_jitter=5.0))
        )
        policy = worker.recycling_policy
        assert policy is not None and policy.lifetime is not None
        assert 10.0 <= policy.lifetime <= 15.0
        lifetimes.add(policy.lifetime)
    assert len(lifetimes) > 1


def test_lifetime_recycles_once_its_draw_has_passed() -> None:
    worker = started(
        FakeWorker(
            settings(max_worker_lifetime=3600.0, max_worker_lifetime_jitter=600.0), draw=0.18666
        )
    )
    worker.tick(3600.0)
    assert worker.alive  # the draw is 3712 s
    worker.tick(111.0)
    assert worker.alive
    worker.tick(1.0)
    assert not worker.alive
    assert worker.log.recycles() == [
        "Recycling worker (pid: 4321): lifetime 3712s reached "
        "(--max-worker-lifetime 1h + jitter 112s)"
    ]
    assert worker.reads == 0  # no memory limit: memory is never read


def test_lifetime_without_jitter_draws_nothing() -> None:
    worker = started(FakeWorker(settings(max_worker_lifetime=2.0)))
    assert worker.draws == []
    worker.tick(2.0)
    assert worker.log.recycles() == [
        "Recycling worker (pid: 4321): lifetime 2s reached (--max-worker-lifetime 2s)"
    ]


def test_lifetime_counts_from_the_start_of_the_worker_process() -> None:
    worker = FakeWorker(settings(max_worker_lifetime=10.0))
    worker.clock += 1000.0  # created long before it runs (as gunicorn does, before fork)
    started(worker)
    worker.tick(9.0)
    assert worker.alive
    worker.tick(1.0)
    assert not worker.alive


# --- max requests -------------------------------------------------------------------


def test_max_requests_reason_is_logged_once_after_gunicorns_line() -> None:
    worker = started(FakeWorker(settings(), max_requests=1000, jitter=50, requests_draw=37))
    for _ in range(1036):
        worker.handle_request()
    assert worker.alive and worker.log.lines == []
    worker.handle_request()
    assert not worker.alive
    worker.handle_request()  # a last request in flight (gthread, gevent)
    worker.notify()
    assert [line for _, line in worker.log.lines] == [
        "Autorestarting worker after current request.",
        "Recycling worker (pid: 4321): served 1037 requests (--max-requests 1000 + jitter 37)",
    ]


def test_max_requests_reason_works_without_microsvc_settings() -> None:
    worker = started(FakeWorker(None, max_requests=5))
    for _ in range(5):
        worker.handle_request()
    assert worker.log.recycles() == [
        "Recycling worker (pid: 4321): served 5 requests (--max-requests 5)"
    ]


def test_no_max_requests_line_when_another_reason_came_first() -> None:
    worker = started(FakeWorker(settings(max_worker_memory=MiB), rss=2 * MiB, max_requests=3))
    worker.handle_request()
    worker.clock += 1.0
    worker.handle_request()  # second read above: recycled by memory
    worker.handle_request()  # count reached while already stopping
    assert len(worker.log.recycles()) == 1
    assert "memory" in worker.log.recycles()[0]


def test_requests_during_shutdown_log_no_reason() -> None:
    worker = started(FakeWorker(settings(), max_requests=2))
    worker.handle_request()
    worker.alive = False  # TERM
    worker.handle_request()
    assert worker.log.recycles() == []


class RaisingGunicornWorker(FakeGunicornWorker):
    def handle_request(self, *args: Any) -> str:
        super().handle_request(*args)
        raise StopIteration  # gunicorn's way to close a connection


class RaisingWorker(FakeWorker, RaisingGunicornWorker):
    pass


def test_handle_request_returns_what_the_worker_returns() -> None:
    worker = started(FakeWorker(settings(max_worker_lifetime=1.0)))
    assert worker.handle_request("listener", "req", "sock", "addr") == "handled"


def test_a_request_that_raises_is_still_checked_after() -> None:
    worker = started(RaisingWorker(settings(max_worker_lifetime=1.0)))
    assert Recycling in RaisingWorker.__mro__[:3]
    worker.clock += 5
    with pytest.raises(StopIteration):
        worker.handle_request()
    assert not worker.alive
    assert len(worker.log.recycles()) == 1


# --- off ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "app",
    [SimpleNamespace(), SimpleNamespace(settings=None), SimpleNamespace(settings=Settings())],
    ids=["plain-gunicorn-app", "settings-none", "defaults"],
)
def test_off_without_settings_or_limits(app: Any) -> None:
    worker = FakeWorker(rss=10**12)
    worker.app = app
    started(worker)
    assert worker.recycling_policy is None
    for _ in range(10):
        worker.tick(10**6)
        worker.handle_request()
    assert worker.alive
    assert worker.reads == 0
    assert worker.log.lines == []
    assert worker.check_interval(15.0) == 15.0


def test_nothing_happens_before_the_worker_process_starts() -> None:
    worker = FakeWorker(settings(max_worker_lifetime=1.0, max_worker_memory=1), rss=2)
    worker.tick(100)
    worker.handle_request()
    assert worker.alive and worker.reads == 0


def test_a_stopping_worker_is_not_recycled() -> None:
    worker = started(FakeWorker(settings(max_worker_lifetime=1.0)))
    worker.alive = False
    worker.tick(10)
    assert worker.log.recycles() == []


def test_checks_are_at_most_a_second_apart_while_on() -> None:
    worker = started(FakeWorker(settings(max_worker_lifetime=60.0)))
    assert worker.check_interval(15.0) == CHECK_INTERVAL
    assert worker.check_interval(0.5) == 0.5


def test_notify_still_reaches_the_worker() -> None:
    worker = started(FakeWorker(settings(max_worker_memory=MiB)))
    worker.notify()
    worker.notify()
    assert worker.notified == 2


# --- policy and formats -------------------------------------------------------------


def test_policy_from_settings() -> None:
    assert recycle_policy(None) is None
    assert recycle_policy(Settings()) is None
    assert recycle_policy(settings(max_worker_lifetime=0.0)) is None
    assert recycle_policy(settings(max_worker_memory=5 * MiB)) == RecyclePolicy(max_memory=5 * MiB)
    policy = recycle_policy(
        settings(max_worker_lifetime=60.0, max_worker_lifetime_jitter=30.0),
        draw=lambda low, high: high,
    )
    assert policy == RecyclePolicy(lifetime_setting=60.0, jitter_setting=30.0, jitter=30.0)
    assert policy.lifetime == 90.0


def test_memory_reason_format() -> None:
    assert memory_reason(int(612.3 * MiB), 512 * MiB) == (
        "memory 612.3MiB above --max-worker-memory 512MiB"
    )
    # --max-worker-memory 150MB is 150e6 bytes: shown in MiB like the measurement
    assert memory_reason(160 * MiB, 150_000_000) == (
        "memory 160.0MiB above --max-worker-memory 143.1MiB"
    )


def test_lifetime_reason_format() -> None:
    hour = RecyclePolicy(lifetime_setting=3600.0, jitter_setting=600.0, jitter=112.4)
    assert lifetime_reason(hour) == (
        "lifetime 3712s reached (--max-worker-lifetime 1h + jitter 112s)"
    )
    short = RecyclePolicy(lifetime_setting=2.0, jitter_setting=1.0, jitter=0.73)
    assert lifetime_reason(short) == (
        "lifetime 2.7s reached (--max-worker-lifetime 2s + jitter 0.7s)"
    )


def test_max_requests_reason_format() -> None:
    assert max_requests_reason(1000, 1000, 50, 0) == (
        "served 1000 requests (--max-requests 1000 + jitter 0)"
    )
    assert max_requests_reason(5, 5, 0, 0) == "served 5 requests (--max-requests 5)"


def test_every_reason_fits_the_one_log_format() -> None:
    for reason in (
        memory_reason(600 * MiB, 512 * MiB),
        lifetime_reason(RecyclePolicy(lifetime_setting=60.0)),
        max_requests_reason(10, 10, 0, 0),
    ):
        line = LOG_FORMAT % (99, reason)
        assert RECYCLE_LINE.match(line), line


# --- the worker classes -------------------------------------------------------------


def test_every_worker_class_is_microsvcs_and_recycles() -> None:
    assert WORKER_CLASSES == {
        WorkerClass.SYNC: "microsvc.workers.sync.SyncWorker",
        WorkerClass.GTHREAD: "microsvc.workers.gthread.BalancedThreadWorker",
        WorkerClass.GEVENT: "microsvc.workers.gevent.GeventWorker",
        WorkerClass.EVENTLET: "microsvc.workers.eventlet.EventletWorker",
    }
    assert ENGINE_WORKER_CLASSES == {
        WorkerClass.SYNC: "microsvc.workers.sync.EngineSyncWorker",
        WorkerClass.GTHREAD: "microsvc.workers.gthread.EngineThreadWorker",
        WorkerClass.GEVENT: "microsvc.workers.gevent.EngineGeventWorker",
        WorkerClass.EVENTLET: "microsvc.workers.eventlet.EngineEventletWorker",
    }


CHECK_CLASSES = """\
import sys, warnings
import microsvc.serving.launcher, microsvc.workers, microsvc.workers.sync, microsvc.workers.gthread
assert "gevent" not in sys.modules and "eventlet" not in sys.modules, "imported too early"
from gunicorn.util import load_class
from microsvc.workers import ENGINE_WORKER_CLASSES, WORKER_CLASSES
from microsvc.workers.engine import EngineWorker
from microsvc.workers.recycling import Recycling
warnings.simplefilter("ignore")
for name, path in WORKER_CLASSES.items():
    cls = load_class(path)
    assert cls.__mro__[1] is Recycling, (name, cls.__mro__)
    assert cls.__module__.startswith("microsvc.workers."), path
    engine_cls = load_class(ENGINE_WORKER_CLASSES[name])
    assert engine_cls.__mro__[1:3] == (EngineWorker, cls), (name, engine_cls.__mro__)
print("ok")
"""


def test_worker_classes_load_with_recycling_first_and_gevent_only_on_demand() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK_CLASSES],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --- telling the app why ------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker_settings", "kind"),
    [
        ({"max_worker_memory": 100 * MiB}, "memory"),
        ({"max_worker_lifetime": 5.0}, "lifetime"),
    ],
)
def test_each_recycle_tells_the_app_its_kind_once(worker_settings: Any, kind: str) -> None:
    told: list[str] = []
    worker = started(FakeWorker(settings(**worker_settings), rss=150 * MiB))
    worker.app.worker_recycling = told.append
    for _ in range(10):
        worker.tick()
    assert told == [kind]
    assert not worker.alive


def test_max_requests_recycle_tells_the_app() -> None:
    told: list[str] = []
    worker = started(FakeWorker(settings(max_requests=2), max_requests=2))
    worker.app.worker_recycling = told.append
    worker.handle_request()
    worker.handle_request()
    assert told == ["max-requests"]


def test_an_app_that_fails_to_hear_does_not_stop_the_recycle() -> None:
    def deaf(kind: str) -> None:
        raise OSError("store gone")

    worker = started(FakeWorker(settings(max_worker_lifetime=1.0)))
    worker.app.worker_recycling = deaf
    worker.tick(2)
    assert not worker.alive
    assert worker.log.recycles()
    assert any("cannot record its recycle" in line for level, line in worker.log.lines)
