"""Worker recycling: by memory and by age in the master, by request count in the worker.

The master decides on memory and age (`Recycler`, which `MicrosvcArbiter` runs once a
second):

- `--max-worker-memory`: each worker's own memory, its USS (the pages no other process
  maps, which the kernel gives back when the worker exits), read by the master from
  /proc/PID/smaps_rollup (`microsvc.observe.scoreboard.read_memory`). Pages a worker
  shares with the master and its siblings, such as the app imported once with
  `--preload`, do not count, so they never recycle it. USS and not PSS: a worker's PSS
  adds a share of every page it shares, and that share grows when a sibling exits
  (fewer processes split the page), so one recycle could push the others over the
  limit; USS depends on the worker alone and is what recycling it frees. Where the
  platform gives no USS the limit applies to RSS, and the log line says which. Above
  the limit on MEMORY_STRIKES consecutive reads, the worker is recycled: one transient
  spike is not enough.
- `--max-worker-lifetime` (+ `--max-worker-lifetime-jitter`): the master draws each
  worker's lifetime, the setting plus a uniform 0..jitter, when it starts the worker;
  once the worker has run that long, it is recycled.

A recycle is gunicorn's graceful stop of one worker, the one TTOU uses: SIGTERM to that
worker, which stops accepting, finishes the requests in flight and exits, and the
master starts a replacement. The master logs each recycle once, at info level, and
counts its reason as the worker's exit reason (metrics, scoreboard):

    Recycling worker (pid: 1234): memory (USS) 612.3MiB above --max-worker-memory 512MiB
    Recycling worker (pid: 1234): lifetime 3712s reached (--max-worker-lifetime 1h + jitter 112s)
    Recycling worker (pid: 1234): served 1037 requests (--max-requests 1000 + jitter 37)

The last one is the worker's own: gunicorn stops a worker itself after `--max-requests`.
`Recycling`, a mixin placed before a gunicorn worker class, logs that line and tells the
app (microsvc's Launcher writes the reason in the worker's scoreboard slot, where the
master reads it when it reaps the worker).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from microsvc.config.options import Settings
from microsvc.config.values import format_duration, format_size
from microsvc.observe.scoreboard import MemorySample

#: The master reads each worker's memory once per this many seconds.
MEMORY_READ_INTERVAL = 1.0
#: Consecutive reads above --max-worker-memory that recycle a worker.
MEMORY_STRIKES = 2
#: Kept for worker loops that ask `check_interval`: recycling no longer shortens it.
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
    settings: Settings | None, draw: Callable[[float, float], float] = random.uniform
) -> RecyclePolicy | None:
    """The policy for microsvc `Settings` (None when recycling by memory and by lifetime
    are both off, or there are no settings: `microsvc.serving.context.settings_of`).
    `draw(a, b)` picks the jitter."""
    if not isinstance(settings, Settings):
        return None
    max_memory = settings.max_worker_memory or None
    lifetime = settings.max_worker_lifetime or None
    if max_memory is None and lifetime is None:
        return None
    jitter_setting = float(settings.max_worker_lifetime_jitter or 0.0)
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


def memory_reason(own: int, limit: int, measure: str = "USS") -> str:
    """`measure`: what `own` is, USS (or RSS where the platform gives no USS)."""
    return f"memory ({measure}) {own / _MiB:.1f}MiB above --max-worker-memory {format_size(limit)}"


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


# the master's side


@dataclass(frozen=True)
class Decision:
    """Recycle worker `pid`: `kind` (memory, lifetime) and the reason to log."""

    pid: int
    kind: str
    reason: str


@dataclass
class _Tracked:
    policy: RecyclePolicy
    started: float
    strikes: int = 0


class Recycler:
    """In the master: which workers to recycle for memory and lifetime.

    `started(pid, settings)` when a worker is forked fixes its policy (and draws its
    lifetime); `check(memory)` once a second, with the workers' latest memory samples,
    returns the workers to recycle now, each once; `gone(pid)` when a worker is reaped.
    `clock` (monotonic seconds) and `draw(a, b)` are replaceable for tests."""

    def __init__(
        self,
        draw: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._draw = draw
        self._clock = clock
        self._workers: dict[int, _Tracked] = {}

    def started(self, pid: int, settings: Settings | None) -> None:
        policy = recycle_policy(settings, self._draw)
        if policy is not None:
            self._workers[pid] = _Tracked(policy, self._clock())

    def gone(self, pid: int) -> None:
        self._workers.pop(pid, None)

    def policy(self, pid: int) -> RecyclePolicy | None:
        tracked = self._workers.get(pid)
        return None if tracked is None else tracked.policy

    @property
    def reads_memory(self) -> bool:
        """Whether some worker has a memory limit (the master then reads memory)."""
        return any(t.policy.max_memory is not None for t in self._workers.values())

    def check(self, memory: Mapping[int, MemorySample | None]) -> list[Decision]:
        """The workers to recycle now; each worker is returned at most once. `memory`:
        each worker's latest sample (a missing or None sample counts as no reading)."""
        now = self._clock()
        decisions = []
        for pid, tracked in list(self._workers.items()):
            decision = self._decide(pid, tracked, now, memory.get(pid))
            if decision is not None:
                del self._workers[pid]
                decisions.append(decision)
        return decisions

    def _decide(
        self, pid: int, tracked: _Tracked, now: float, sample: MemorySample | None
    ) -> Decision | None:
        policy = tracked.policy
        lifetime = policy.lifetime
        if lifetime is not None and now - tracked.started >= lifetime:
            return Decision(pid, "lifetime", lifetime_reason(policy))
        if policy.max_memory is None or sample is None:
            return None
        if sample.own <= policy.max_memory:
            tracked.strikes = 0
            return None
        tracked.strikes += 1
        if tracked.strikes < MEMORY_STRIKES:
            return None
        return Decision(pid, "memory", memory_reason(sample.own, policy.max_memory, sample.measure))


# the worker's side


class Recycling:
    """Mixin for a gunicorn worker class: name the reason when gunicorn recycles the
    worker after --max-requests (logged once, told to the app). Put it first:
    `class W(Recycling, Base)`. Memory and lifetime are the master's (`Recycler`)."""

    # Provided by gunicorn's Worker.
    alive: bool
    nr: int
    max_requests: int
    pid: Any
    app: Any
    cfg: Any
    log: Any

    _recycle_reason: str | None = None
    _recycling_on: bool = False

    # gunicorn's hooks

    def init_process(self) -> None:
        """In the worker, after fork."""
        self.start_recycling()
        super().init_process()  # type: ignore[misc]

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

    def _wake(self) -> None:
        """Make the worker loop see `alive = False` soon (a worker class may override)."""

    # the logic

    def start_recycling(self) -> None:
        self._recycle_reason = None
        self._recycle_once = threading.Lock()
        self._recycling_on = True

    def check_recycling(self) -> None:
        """Nothing to check in the worker: the master recycles by memory and lifetime.
        Kept for worker loops that call it."""

    def after_request(self, was_alive: bool) -> None:
        """After each request: name gunicorn's --max-requests recycle."""
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

    def recycle(self, reason: str, kind: str) -> None:
        """Stop this worker gracefully, logging `reason` (once per worker). `kind`
        (max-requests) goes to the app's `worker_recycling(kind)` when it has one
        (microsvc's Launcher writes it in the worker's scoreboard slot)."""
        if not self._recycle_once.acquire(blocking=False):
            return
        self._recycle_reason = reason
        self.log.info(LOG_FORMAT, self.pid, reason)
        tell = getattr(self.app, "worker_recycling", None)
        if callable(tell):
            try:
                tell(kind)
            except Exception as exc:  # the recycle goes on whatever the app says
                self.log.warning("Worker (pid: %s) cannot record its recycle: %s", self.pid, exc)
        self.alive = False
        self._wake()

    def check_interval(self, timeout: float) -> float:
        """How long a worker loop may wait before its next check: `timeout` (the worker
        has nothing of its own to check; kept for worker loops that ask)."""
        return timeout
