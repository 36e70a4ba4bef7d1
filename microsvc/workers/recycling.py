"""Worker recycling by resident memory and by age, for every worker class.

`Recycling` is a mixin placed before a gunicorn worker class. It reads microsvc's
settings from `worker.app.settings` (a worker under a plain gunicorn app, which has no
`.settings`, runs with recycling off) and checks:

- `--max-worker-memory`: the worker's resident memory (RSS), read at most once a
  second; above the limit on two consecutive reads, the worker is recycled, so one
  transient spike is not enough.
- `--max-worker-lifetime` (+ `--max-worker-lifetime-jitter`): each worker draws its own
  lifetime, the setting plus a uniform 0..jitter, when it starts; once it has run that
  long, it is recycled.

Checks run on `notify()`, which every worker loop calls about once a second even when
idle, and after each request, so a busy leaking worker is caught promptly. Recycling
is gunicorn's graceful way, the one `--max-requests` uses: `alive = False`; the worker
stops accepting, finishes the requests in flight and exits, and the arbiter starts a
replacement. Each recycle is logged once, at info level:

    Recycling worker (pid: 1234): memory 612.3MiB above --max-worker-memory 512MiB
    Recycling worker (pid: 1234): lifetime 3712s reached (--max-worker-lifetime 1h + jitter 112s)
    Recycling worker (pid: 1234): served 1037 requests (--max-requests 1000 + jitter 37)

The last one is only a log line: gunicorn itself recycles on `--max-requests`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from microsvc.config.values import format_duration, format_size

#: Resident memory is read at most once per this many seconds.
MEMORY_READ_INTERVAL = 1.0
#: Consecutive reads above --max-worker-memory that recycle a worker.
MEMORY_STRIKES = 2
#: While recycling is on, a worker loop waits at most this long between checks.
CHECK_INTERVAL = 1.0

#: Every recycle line starts with this (followed by the reason).
LOG_FORMAT = "Recycling worker (pid: %s): %s"

_MiB = 1024**2


@dataclass(frozen=True)
class RecyclePolicy:
    """One worker's limits: memory in bytes, its drawn lifetime in seconds."""

    max_memory: int | None = None
    #: --max-worker-lifetime and --max-worker-lifetime-jitter as configured.
    lifetime_setting: float | None = None
    jitter_setting: float = 0.0
    #: This worker's draw from 0..jitter_setting.
    jitter: float = 0.0

    @property
    def lifetime(self) -> float | None:
        """This worker's lifetime: the setting plus its jitter draw."""
        return None if self.lifetime_setting is None else self.lifetime_setting + self.jitter


def recycle_policy(
    settings: object, draw: Callable[[float, float], float] = random.uniform
) -> RecyclePolicy | None:
    """The policy for microsvc `Settings` (None when recycling by memory and by lifetime
    are both off, or there are no settings). `draw(a, b)` picks the jitter."""
    if settings is None:
        return None
    max_memory = getattr(settings, "max_worker_memory", None) or None
    lifetime = getattr(settings, "max_worker_lifetime", None) or None
    if max_memory is None and lifetime is None:
        return None
    jitter_setting = float(getattr(settings, "max_worker_lifetime_jitter", 0.0) or 0.0)
    if lifetime is None:
        jitter_setting = 0.0
    jitter = draw(0.0, jitter_setting) if jitter_setting > 0 else 0.0
    return RecyclePolicy(
        max_memory=int(max_memory) if max_memory is not None else None,
        lifetime_setting=float(lifetime) if lifetime is not None else None,
        jitter_setting=jitter_setting,
        jitter=min(max(jitter, 0.0), jitter_setting),
    )


def _seconds(value: float) -> str:
    """3712s, 2.7s: whole seconds from 100 s up, tenths below."""
    text = f"{value:.0f}" if value >= 100 else f"{value:.1f}".removesuffix(".0")
    return text + "s"


def memory_reason(rss: int, limit: int) -> str:
    return f"memory {rss / _MiB:.1f}MiB above --max-worker-memory {format_size(limit)}"


def lifetime_reason(policy: RecyclePolicy) -> str:
    assert policy.lifetime is not None and policy.lifetime_setting is not None
    setting = f"--max-worker-lifetime {format_duration(policy.lifetime_setting)}"
    if policy.jitter_setting > 0:
        setting += f" + jitter {_seconds(policy.jitter)}"
    return f"lifetime {_seconds(policy.lifetime)} reached ({setting})"


def max_requests_reason(served: int, max_requests: int, jitter_setting: int, jitter: int) -> str:
    setting = f"--max-requests {max_requests}"
    if jitter_setting > 0:
        setting += f" + jitter {jitter}"
    return f"served {served} requests ({setting})"


class Recycling:
    """Mixin for a gunicorn worker class: recycle by memory and by lifetime, and name
    the reason of every recycle in the log. Put it first: `class W(Recycling, Base)`."""

    # Provided by gunicorn's Worker.
    alive: bool
    nr: int
    max_requests: int
    pid: Any
    app: Any
    cfg: Any
    log: Any

    _recycle_policy: RecyclePolicy | None = None
    _recycle_started: float = 0.0
    _recycle_reason: str | None = None
    _recycling_on: bool = False

    # gunicorn's hooks

    def init_process(self) -> None:
        """In the worker, after fork: start the clock and draw the lifetime."""
        self.start_recycling()
        super().init_process()  # type: ignore[misc]

    def notify(self) -> None:
        super().notify()  # type: ignore[misc]
        self.check_recycling()

    def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        was_alive = self.alive
        try:
            return super().handle_request(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.after_request(was_alive)

    def handle_http2_request(self, *args: Any, **kwargs: Any) -> Any:
        """Only workers that serve HTTP/2 (gthread, gevent, eventlet) call this."""
        was_alive = self.alive
        try:
            return super().handle_http2_request(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.after_request(was_alive)

    # overridable: tests give a fake clock, memory reader and draw

    def _now(self) -> float:
        return time.monotonic()

    def _rss(self) -> int:
        process = getattr(self, "_recycle_process", None)
        if process is None:
            process = self._recycle_process = psutil.Process()
        return int(process.memory_info().rss)

    def _draw(self, low: float, high: float) -> float:
        # After fork every worker has the master's random state; draw from the OS.
        return random.SystemRandom().uniform(low, high)

    def _wake(self) -> None:
        """Make the worker loop see `alive = False` soon (a worker class may override)."""

    # the logic

    def start_recycling(self) -> None:
        settings = getattr(getattr(self, "app", None), "settings", None)
        self._recycle_policy = recycle_policy(settings, self._draw)
        self._recycle_started = self._now()
        self._recycle_reason = None
        self._next_memory_read = self._recycle_started
        self._memory_strikes = 0
        self._check_lock = threading.Lock()
        self._recycle_once = threading.Lock()
        self._recycling_on = True

    @property
    def recycling_policy(self) -> RecyclePolicy | None:
        return self._recycle_policy

    def check_recycling(self) -> None:
        """Recycle if this worker is past its lifetime or its memory stays too high."""
        policy = self._recycle_policy
        if policy is None or not self._recycling_on or not self.alive:
            return
        if self._recycle_reason is not None:
            return
        # Another thread checking right now does the work (gthread).
        if not self._check_lock.acquire(blocking=False):
            return
        try:
            self._check(policy)
        finally:
            self._check_lock.release()

    def _check(self, policy: RecyclePolicy) -> None:
        now = self._now()
        lifetime = policy.lifetime
        if lifetime is not None and now - self._recycle_started >= lifetime:
            self.recycle(lifetime_reason(policy), "lifetime")
            return
        if policy.max_memory is None or now < self._next_memory_read:
            return
        self._next_memory_read = now + MEMORY_READ_INTERVAL
        try:
            rss = self._rss()
        except (psutil.Error, OSError) as exc:
            self.log.warning(
                "Worker (pid: %s) cannot read its memory use (%s); "
                "--max-worker-memory is off for it",
                self.pid,
                exc,
            )
            self._recycle_policy = RecyclePolicy(
                lifetime_setting=policy.lifetime_setting,
                jitter_setting=policy.jitter_setting,
                jitter=policy.jitter,
            )
            return
        if rss <= policy.max_memory:
            self._memory_strikes = 0
            return
        self._memory_strikes += 1
        if self._memory_strikes >= MEMORY_STRIKES:
            self.recycle(memory_reason(rss, policy.max_memory), "memory")

    def after_request(self, was_alive: bool) -> None:
        """After each request: name gunicorn's --max-requests recycle, then check."""
        if not self._recycling_on:
            return
        if was_alive and self.nr >= self.max_requests and self._recycle_reason is None:
            max_requests = int(getattr(self.cfg, "max_requests", 0) or 0)
            jitter_setting = int(getattr(self.cfg, "max_requests_jitter", 0) or 0)
            self.recycle(
                max_requests_reason(
                    self.nr, max_requests, jitter_setting, self.max_requests - max_requests
                ),
                "max-requests",
            )
            return
        self.check_recycling()

    def recycle(self, reason: str, kind: str) -> None:
        """Stop this worker gracefully, logging `reason` (once per worker). `kind`
        (max-requests, memory, lifetime) goes to the app's `worker_recycling(kind)`
        when it has one (microsvc's Launcher counts it in the metrics)."""
        if not self._recycle_once.acquire(blocking=False):
            return
        self._recycle_reason = reason
        self.log.info(LOG_FORMAT, self.pid, reason)
        tell = getattr(self.app, "worker_recycling", None)
        if callable(tell):
            try:
                tell(kind)
            except Exception as exc:  # the recycle goes on whatever the metrics say
                self.log.warning("Worker (pid: %s) cannot record its recycle: %s", self.pid, exc)
        self.alive = False
        self._wake()

    def check_interval(self, timeout: float) -> float:
        """How long a worker loop may wait before its next check: `timeout`, capped at
        CHECK_INTERVAL while recycling by memory or lifetime is on."""
        if self._recycle_policy is not None and self.alive:
            return min(timeout, CHECK_INTERVAL)
        return timeout
