"""`--autoscale`: the master keeps as many workers as the load needs.

Once a second the master reads its scoreboard into a `Sample` (workers serving, booting
and busy, the freshest queue time the workers noted, the listen queues' length, their
memory) and `Autoscaler.decide` chooses the worker count, between `--min-workers` and the
planned count (which `--max-workers` and the memory planning already bound):

- Up, when capacity is missing: the queue time of a recent request is
  `QUEUE_TIME_UP` or more, or connections wait in the listen queue, or the busy ratio
  (workers with a request in flight, over workers serving) is `BUSY_UP` or more, the
  last two for `UP_SAMPLES` samples in a row. The count grows by half (at least one),
  and not again until the new workers have booted. Never past what the memory limit
  holds: with a limit (`WorkerPlan.memory`), the count stays where the workers' own
  memory, as measured, plus the largest shared part fits in `MEMORY_USE` of it.
- Down, after a cool-down (`DEFAULT_COOLDOWN` seconds, or `COOLDOWN_ENV` in the
  environment) without any sign of missing capacity and without a change: to the
  workers the busiest sample of that period needed at a busy ratio of `DOWN_TARGET`,
  and never below the minimum. Idle, that is the minimum.

The master applies a count the way TTIN and TTOU do (gunicorn's `num_workers`): it
starts workers, or stops the oldest gracefully (SIGTERM: a request in progress is
finished; connections in the listen queue are taken by the others), so no request fails.
Each change is logged with its reason, counted in the metrics and shown by
`microsvc status`. The count is not changed before the server is ready, while it drains,
or while a new master takes over (USR2).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from microsvc.serving.context import settings_of

if TYPE_CHECKING:
    from microsvc.serving.launcher import Launcher

__all__ = [
    "COOLDOWN_ENV",
    "DEFAULT_COOLDOWN",
    "Autoscaler",
    "Decision",
    "Sample",
    "cooldown_from_env",
]

#: Seconds without any sign of missing capacity before idle workers are retired.
DEFAULT_COOLDOWN = 60.0
#: An environment variable that sets another cool-down, in seconds (for tests and tuning).
COOLDOWN_ENV = "MICROSVC_AUTOSCALE_COOLDOWN"
#: A recent request that waited this long (seconds) says a worker is missing.
QUEUE_TIME_UP = 0.1
#: A queue time noted longer ago than this (seconds) is not recent.
QUEUE_TIME_FRESH = 2.0
#: A busy ratio this high says a worker is missing (for `UP_SAMPLES` samples in a row).
BUSY_UP = 0.9
UP_SAMPLES = 2
#: Scaling down keeps the busiest sample of the cool-down at this busy ratio.
DOWN_TARGET = 0.75
#: The share of the memory limit the workers may take.
MEMORY_USE = 0.9
#: Seconds between two samples.
INTERVAL = 1.0


def cooldown_from_env(environ: Any = None) -> float:
    """The cool-down: `COOLDOWN_ENV` when it is a number of seconds above 0, else the
    default."""
    text = (os.environ if environ is None else environ).get(COOLDOWN_ENV, "")
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_COOLDOWN
    return value if math.isfinite(value) and value > 0 else DEFAULT_COOLDOWN


@dataclass(frozen=True)
class Sample:
    """What the master saw at one moment."""

    at: float
    serving: int
    booting: int
    busy: int
    queue_time: float | None = None
    listen_queue: int = 0
    own_memory: int | None = None
    shared_memory: int | None = None

    @property
    def busy_ratio(self) -> float:
        return self.busy / self.serving if self.serving else 0.0


@dataclass(frozen=True)
class Decision:
    """A new worker count, why, and `direction`: up or down."""

    count: int
    reason: str
    direction: str


class Autoscaler:
    """The worker count for the next moment, from the samples so far.

    `minimum` and `maximum` bound it; `memory_limit` (bytes, None: none) caps it too.
    `decide(current, sample)` returns a `Decision` when the count should change.
    """

    def __init__(
        self,
        minimum: int,
        maximum: int,
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        memory_limit: int | None = None,
    ) -> None:
        if minimum < 1 or maximum < 1:
            raise ValueError("the worker bounds must be at least 1")
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.cooldown = cooldown
        self.memory_limit = memory_limit
        self.samples: deque[Sample] = deque()
        self.pressure_at = -math.inf
        self.changed_at = -math.inf
        self.last: Decision | None = None

    def decide(self, current: int, sample: Sample) -> Decision | None:
        if not self.samples:
            self.changed_at = max(self.changed_at, sample.at)  # the cool-down starts now
        self.samples.append(sample)
        horizon = sample.at - self.cooldown
        while self.samples and self.samples[0].at < horizon:
            self.samples.popleft()
        if current > self.maximum:
            return self._change(current, self.maximum, f"the most is {self.maximum}", sample)
        if current < self.minimum:
            return self._change(current, self.minimum, f"the fewest is {self.minimum}", sample)
        reason = self._missing_capacity(sample)
        if reason is not None:
            self.pressure_at = sample.at
            return self._up(current, sample, reason)
        quiet = sample.at - max(self.pressure_at, self.changed_at)
        if quiet < self.cooldown or current <= self.minimum:
            return None
        peak = max(item.busy for item in self.samples)
        needed = max(self.minimum, math.ceil(peak / DOWN_TARGET))
        if needed >= current:
            return None
        return self._change(
            current,
            needed,
            f"at most {peak} of {current} workers busy for {self.cooldown:g}s",
            sample,
        )

    def _missing_capacity(self, sample: Sample) -> str | None:
        if sample.queue_time is not None and sample.queue_time >= QUEUE_TIME_UP:
            return f"queue time {sample.queue_time:.3f}s"
        recent = list(self.samples)[-UP_SAMPLES:]
        if len(recent) < UP_SAMPLES:
            return None
        if all(item.listen_queue > 0 for item in recent):
            return f"{sample.listen_queue} connections waiting in the listen queue"
        if all(item.busy_ratio >= BUSY_UP for item in recent):
            return f"busy ratio {sample.busy_ratio:.2f}"
        return None

    def _up(self, current: int, sample: Sample, why: str) -> Decision | None:
        if current >= self.maximum or sample.booting:
            return None  # at the most already, or the last workers added still boot
        wanted = min(self.maximum, current + max(1, current // 2))
        fits = self._memory_fits(sample)
        if fits is not None and fits < wanted:
            wanted = fits
            why += f" (the memory limit holds {fits})"
        if wanted <= current:
            return None
        return self._change(current, wanted, why, sample)

    def _memory_fits(self, sample: Sample) -> int | None:
        """How many workers the memory limit holds, as measured; None when unknown."""
        if not self.memory_limit or not sample.own_memory:
            return None
        room = self.memory_limit * MEMORY_USE - (sample.shared_memory or 0)
        return max(0, int(room // sample.own_memory))

    def _change(self, current: int, count: int, reason: str, sample: Sample) -> Decision | None:
        if count == current:
            return None
        self.changed_at = sample.at
        self.last = Decision(count, reason, "up" if count > current else "down")
        return self.last


class ArbiterAutoscaler:
    """The master's side: samples the scoreboard once a second, applies the decisions to
    gunicorn's `num_workers`, logs them and shows them in the metrics and the scoreboard.
    `settings` is asked each time (a reload may change them): it returns
    (enabled, minimum, maximum, memory limit)."""

    def __init__(
        self,
        settings: Callable[[], tuple[bool, int, int, int | None]],
        *,
        cooldown: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cooldown = cooldown_from_env() if cooldown is None else cooldown
        self.clock = clock
        self.scaler: Autoscaler | None = None
        self._bounds: tuple[int, int, int | None] | None = None
        self._ticked_at = -math.inf

    @classmethod
    def for_app(cls, app: object) -> ArbiterAutoscaler | None:
        """For a microsvc `Launcher`, whose settings and plan are read again on each tick
        (a reload may change them); None for another gunicorn application."""
        if settings_of(app) is None:
            return None
        launcher = cast("Launcher", app)

        def bounds() -> tuple[bool, int, int, int | None]:
            settings, plan = launcher.settings, launcher.plan
            return settings.autoscale, settings.min_workers, plan.workers, plan.memory

        return cls(bounds)

    def tick(self, arbiter: Any) -> None:
        """On a turn of the master loop (see the module docstring)."""
        now = self.clock()
        if now - self._ticked_at < INTERVAL:
            return
        self._ticked_at = now
        enabled, minimum, maximum, memory = self.settings()
        board = getattr(arbiter, "scoreboard", None)
        if not enabled or board is None or arbiter.num_workers < 1 or arbiter.reexec_pid:
            self.scaler = None
            return
        bounds = (minimum, maximum, memory)
        if self.scaler is None or bounds != self._bounds:
            self.scaler = Autoscaler(minimum, maximum, cooldown=self.cooldown, memory_limit=memory)
            self._bounds = bounds
            self._publish(arbiter, arbiter.num_workers, None)
        try:
            sample = sample_scoreboard(board.snapshot(), now)
        except Exception as exc:  # a torn header: try again on the next tick
            arbiter.log.debug("Autoscale: no sample: %s", exc)
            return
        decision = self.scaler.decide(arbiter.num_workers, sample)
        if decision is None:
            return
        arbiter.log.info(
            "Autoscale: %d -> %d workers, %s", arbiter.num_workers, decision.count, decision.reason
        )
        arbiter.num_workers = decision.count
        self._publish(arbiter, decision.count, decision)

    def _publish(self, arbiter: Any, count: int, decision: Decision | None) -> None:
        assert self.scaler is not None
        metrics = getattr(arbiter, "metrics", None)
        server = getattr(metrics, "server", None)
        if server is not None:
            server.worker_count_set(count, decision.direction if decision else None)
        board = getattr(arbiter, "scoreboard", None)
        publish = getattr(board, "publish_autoscale", None)
        if publish is not None:
            publish(
                self.scaler.minimum,
                self.scaler.maximum,
                count,
                decision.reason if decision else "started",
            )


def sample_scoreboard(snapshot: Any, now: float) -> Sample:
    """A `Sample` from a scoreboard `Snapshot`."""
    serving = booting = busy = 0
    queue_time: float | None = None
    own: list[int] = []
    shared = 0
    wall = time.time()
    for worker in snapshot.workers:
        if worker.state == "stopping":
            continue
        if worker.state == "booting":
            booting += 1
            continue
        serving += 1
        if worker.in_flight:
            busy += 1
        queue = getattr(worker, "queue", None)
        if queue and wall - queue["at"] <= QUEUE_TIME_FRESH:
            queue_time = max(queue_time or 0.0, queue["seconds"])
        memory = worker.memory
        if memory:
            own.append(int(memory.get("own") or 0))
            shared = max(shared, int(memory.get("shared") or 0))
    listen_queue = sum(item.queue or 0 for item in snapshot.listeners)
    return Sample(
        at=now,
        serving=serving,
        booting=booting,
        busy=busy,
        queue_time=queue_time,
        listen_queue=listen_queue,
        own_memory=max(own) if own else None,
        shared_memory=shared or None,
    )
