"""Recycling: the master's decisions (`Recycler`, with a fake clock, memory samples and
jitter draw) and the worker mixin that names gunicorn's --max-requests recycle.

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

import pytest

from microsvc.config.options import Settings, WorkerClass
from microsvc.observe.scoreboard import MemorySample
from microsvc.workers import ENGINE_WORKER_CLASSES, WORKER_CLASSES
from microsvc.workers.recycling import (
    LOG_FORMAT,
    MEMORY_STRIKES,
    Decision,
    RecyclePolicy,
    Recycler,
    Recycling,
    lifetime_reason,
    max_requests_reason,
    memory_reason,
    recycle_policy,
)

MiB = 1024**2
RECYCLE_LINE = re.compile(r"^Recycling worker \(pid: (\d+)\): (.+)$")


def settings(**changes: Any) -> Settings:
    return replace(Settings(), **changes)


# --- the master: Recycler -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def recycler(draw: float = 0.0) -> tuple[Recycler, Clock, list[tuple[float, float]]]:
    """A Recycler on a fake clock whose jitter draw is `draw` of the range."""
    clock = Clock()
    draws: list[tuple[float, float]] = []

    def fake_draw(low: float, high: float) -> float:
        draws.append((low, high))
        return low + draw * (high - low)

    return Recycler(draw=fake_draw, clock=clock), clock, draws


def own(size: int, *, rss: int | None = None, measure: str = "USS") -> MemorySample:
    """A sample with `size` bytes of own memory (and three times that resident)."""
    return MemorySample(size, None, 3 * size if rss is None else rss, measure, 0.0)


def test_memory_above_once_then_below_does_not_recycle() -> None:
    master, _, _ = recycler()
    master.started(7, settings(max_worker_memory=100 * MiB))
    assert master.check({7: own(150 * MiB)}) == []
    assert master.check({7: own(50 * MiB)}) == []
    assert master.check({7: own(150 * MiB)}) == []  # above again, but not twice in a row


def test_memory_above_twice_recycles_once_with_the_measured_size() -> None:
    assert MEMORY_STRIKES == 2
    master, _, _ = recycler()
    master.started(7, settings(max_worker_memory=512 * MiB))
    assert master.check({7: own(600 * MiB)}) == []
    assert master.check({7: own(int(612.3 * MiB))}) == [
        Decision(7, "memory", "memory (USS) 612.3MiB above --max-worker-memory 512MiB")
    ]
    assert master.check({7: own(700 * MiB)}) == []  # decided once


def test_memory_at_the_limit_is_not_above_it() -> None:
    master, _, _ = recycler()
    master.started(7, settings(max_worker_memory=100 * MiB))
    for _ in range(5):
        assert master.check({7: own(100 * MiB)}) == []


def test_pages_shared_with_other_processes_never_recycle() -> None:
    """After --preload, a worker's RSS counts the app it shares with the master and its
    siblings; the limit is on its own pages."""
    master, _, _ = recycler()
    master.started(7, settings(max_worker_memory=150_000_000))
    for _ in range(10):
        assert master.check({7: MemorySample(40 * MiB, 90 * MiB, 400 * MiB, "USS", 0.0)}) == []


def test_where_the_platform_gives_only_rss_the_reason_says_so() -> None:
    master, _, _ = recycler()
    master.started(7, settings(max_worker_memory=100 * MiB))
    for _ in range(MEMORY_STRIKES):
        found = master.check({7: own(200 * MiB, rss=200 * MiB, measure="RSS")})
    assert found == [
        Decision(7, "memory", "memory (RSS) 200.0MiB above --max-worker-memory 100MiB")
    ]


def test_a_missing_reading_is_no_strike_and_no_reset() -> None:
    master, _, _ = recycler()
    master.started(7, settings(max_worker_memory=100 * MiB))
    assert master.check({7: own(200 * MiB)}) == []
    assert master.check({7: None}) == []
    assert master.check({}) == []
    assert [d.kind for d in master.check({7: own(200 * MiB)})] == ["memory"]


def test_each_worker_is_judged_on_its_own_memory() -> None:
    master, _, _ = recycler()
    for pid in (7, 8):
        master.started(pid, settings(max_worker_memory=100 * MiB))
    memory = {7: own(200 * MiB), 8: own(20 * MiB)}
    master.check(memory)
    assert [d.pid for d in master.check(memory)] == [7]
    assert master.policy(8) is not None and master.policy(7) is None


@pytest.mark.parametrize("draw", [0.0, 0.25, 1.0])
def test_lifetime_draw_lies_in_lifetime_plus_jitter(draw: float) -> None:
    master, _, draws = recycler(draw)
    master.started(7, settings(max_worker_lifetime=3600.0, max_worker_lifetime_jitter=600.0))
    policy = master.policy(7)
    assert policy is not None and policy.lifetime is not None
    assert draws == [(0.0, 600.0)]
    assert policy.lifetime == pytest.approx(3600.0 + draw * 600.0)
    assert 3600.0 <= policy.lifetime <= 4200.0


def test_real_draws_lie_in_the_range_and_differ() -> None:
    master = Recycler()
    lifetimes = set()
    for pid in range(20):
        master.started(pid, settings(max_worker_lifetime=10.0, max_worker_lifetime_jitter=5.0))
        policy = master.policy(pid)
        assert policy is not None and policy.lifetime is not None
        assert 10.0 <= policy.lifetime <= 15.0
        lifetimes.add(policy.lifetime)
    assert len(lifetimes) > 1


def test_lifetime_recycles_once_its_draw_has_passed() -> None:
    master, clock, _ = recycler(0.18666)
    master.started(7, settings(max_worker_lifetime=3600.0, max_worker_lifetime_jitter=600.0))
    clock.now += 3711.0
    assert master.check({}) == []  # the draw is 3712 s
    clock.now += 1.0
    assert master.check({}) == [
        Decision(7, "lifetime", "lifetime 3712s reached (--max-worker-lifetime 1h + jitter 112s)")
    ]
    clock.now += 100.0
    assert master.check({}) == []
    assert not master.reads_memory  # no memory limit: the master need not read memory


def test_lifetime_without_jitter_draws_nothing() -> None:
    master, clock, draws = recycler()
    master.started(7, settings(max_worker_lifetime=2.0))
    assert draws == []
    clock.now += 2.0
    assert [d.reason for d in master.check({})] == [
        "lifetime 2s reached (--max-worker-lifetime 2s)"
    ]


def test_lifetime_counts_from_the_start_of_each_worker() -> None:
    master, clock, _ = recycler()
    master.started(7, settings(max_worker_lifetime=10.0))
    clock.now += 5.0
    master.started(8, settings(max_worker_lifetime=10.0))
    clock.now += 5.0
    assert [d.pid for d in master.check({})] == [7]
    clock.now += 5.0
    assert [d.pid for d in master.check({})] == [8]


def test_lifetime_comes_before_memory() -> None:
    master, clock, _ = recycler()
    master.started(7, settings(max_worker_lifetime=1.0, max_worker_memory=MiB))
    clock.now += 2.0
    assert [d.kind for d in master.check({7: own(2 * MiB)})] == ["lifetime"]


@pytest.mark.parametrize(
    "given", [None, Settings(), SimpleNamespace()], ids=["none", "defaults", "plain-gunicorn"]
)
def test_off_without_settings_or_limits(given: Any) -> None:
    master, clock, _ = recycler()
    master.started(7, given)
    assert master.policy(7) is None and not master.reads_memory
    clock.now += 10**6
    assert master.check({7: own(10**12)}) == []


def test_a_worker_gone_is_forgotten() -> None:
    master, clock, _ = recycler()
    master.started(7, settings(max_worker_lifetime=1.0, max_worker_memory=MiB))
    assert master.reads_memory
    master.gone(7)
    master.gone(7)
    clock.now += 5.0
    assert master.check({7: own(2 * MiB)}) == [] and not master.reads_memory


# --- the worker: naming gunicorn's --max-requests recycle -----------------------------


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
    def __init__(self, settings: Any = None, **kw: Any):
        app = SimpleNamespace(settings=settings) if settings is not None else SimpleNamespace()
        super().__init__(app, **kw)
        self.woken = 0

    def _wake(self) -> None:
        self.woken += 1


def started(worker: FakeWorker) -> FakeWorker:
    worker.init_process()
    assert worker.booted
    return worker


def test_the_worker_no_longer_recycles_itself_for_memory_or_lifetime() -> None:
    """Memory and lifetime are the master's decisions: the worker never stops for them,
    and its loop waits as long as it likes."""
    worker = started(FakeWorker(settings(max_worker_lifetime=1.0, max_worker_memory=1)))
    for _ in range(10):
        worker.notify()
        worker.handle_request()
        worker.check_recycling()
    assert worker.alive and worker.log.lines == []
    assert worker.check_interval(15.0) == 15.0
    assert worker.notified == 10


# --- max requests -------------------------------------------------------------------


def test_max_requests_reason_is_logged_once_after_gunicorns_line() -> None:
    worker = started(FakeWorker(settings(), max_requests=1000, jitter=50, requests_draw=37))
    for _ in range(1036):
        worker.handle_request()
    assert worker.alive and worker.log.lines == []
    worker.handle_request()
    assert not worker.alive
    assert worker.woken == 1
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


def test_requests_during_shutdown_log_no_reason() -> None:
    worker = started(FakeWorker(settings(), max_requests=2))
    worker.handle_request()
    worker.alive = False  # TERM (the master stopping it, for instance to recycle it)
    worker.handle_request()
    assert worker.log.recycles() == []


def test_nothing_happens_before_the_worker_process_starts() -> None:
    worker = FakeWorker(settings(), max_requests=1)
    worker.handle_request()
    assert worker.log.recycles() == []


class RaisingGunicornWorker(FakeGunicornWorker):
    def handle_request(self, *args: Any) -> str:
        super().handle_request(*args)
        raise StopIteration  # gunicorn's way to close a connection


class RaisingWorker(FakeWorker, RaisingGunicornWorker):
    pass


def test_handle_request_returns_what_the_worker_returns() -> None:
    worker = started(FakeWorker(settings()))
    assert worker.handle_request("listener", "req", "sock", "addr") == "handled"


def test_a_request_that_raises_is_still_checked_after() -> None:
    worker = started(RaisingWorker(settings(), max_requests=1))
    assert Recycling in RaisingWorker.__mro__[:3]
    with pytest.raises(StopIteration):
        worker.handle_request()
    assert not worker.alive
    assert len(worker.log.recycles()) == 1


def test_max_requests_recycle_tells_the_app() -> None:
    told: list[str] = []
    worker = started(FakeWorker(settings(max_requests=2), max_requests=2))
    worker.app.worker_recycling = told.append
    worker.handle_request()
    worker.handle_request()
    worker.handle_request()
    assert told == ["max-requests"]


def test_an_app_that_fails_to_hear_does_not_stop_the_recycle() -> None:
    def deaf(kind: str) -> None:
        raise OSError("scoreboard gone")

    worker = started(FakeWorker(settings(), max_requests=1))
    worker.app.worker_recycling = deaf
    worker.handle_request()
    assert not worker.alive
    assert len(worker.log.recycles()) == 1
    warnings = [line for level, line in worker.log.lines if level == "warning"]
    assert warnings == ["Worker (pid: 4321) cannot record its recycle: scoreboard gone"]


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
        "memory (USS) 612.3MiB above --max-worker-memory 512MiB"
    )
    # --max-worker-memory 150MB is 150e6 bytes: shown in MiB like the measurement
    assert memory_reason(160 * MiB, 150_000_000, "RSS") == (
        "memory (RSS) 160.0MiB above --max-worker-memory 143.1MiB"
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
from microsvc.workers.gthread import BalancedThreadWorker
from microsvc.workers.recycling import Recycling
from microsvc.workers.reloading import Reloading
warnings.simplefilter("ignore")
for name, path in WORKER_CLASSES.items():
    cls = load_class(path)
    assert cls.__mro__[1:3] == (Reloading, Recycling), (name, cls.__mro__)
    assert cls.__module__.startswith("microsvc.workers."), path
    engine_cls = load_class(ENGINE_WORKER_CLASSES[name])
    mro = engine_cls.__mro__
    # sync on the engine runs gthread's loop, without threads
    base = BalancedThreadWorker if name == "sync" else cls
    assert mro[mro.index(EngineWorker) + 1] is base, (name, mro)
print("ok")
"""


def test_worker_classes_load_with_the_mixins_first_and_gevent_only_on_demand() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK_CLASSES],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
