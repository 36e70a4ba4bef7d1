"""The targets as data (`TARGETS`), and one routine that turns them into ratios from
this run's points: a throughput ratio of two points that ran in turn (one group, round
by round) is the median of each round's ratio, so that a slow drift of the machine
between rounds cancels out; any other ratio is that of the two medians."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from benchlib.options import CLASSES
from benchlib.plan import ASYNC, ASYNC_IO_CONNECTIONS, IO_WAIT_S, PATHS, SECTIONS, Point
from harness import overload

MB = 1_000_000


class Pick(NamedTuple):
    """The points of `section` (and `config`) for the class and endpoint at hand, or for
    those given (cls `*`: any class); of several, the one with the most rps."""

    section: str
    config: str | None = None
    endpoint: str | None = None
    cls: str | None = None


class Target(NamedTuple):
    """measure: rps (top / bottom, at least), p99 (top / bottom, at most), uss (top -
    bottom in MB, at most), errors (top's, at most), ideal (top's rps / what its
    configuration could serve at best, at least); target None: shown only."""

    kind: str
    top: Pick
    bottom: Pick | None
    target: float | None
    endpoints: tuple[str, ...]
    classes: tuple[str, ...] = CLASSES
    measure: str = "rps"


_AUTO, _SWEEP, _ENGINE = Pick("auto"), Pick("sweep"), Pick("engine", "microsvc engine")
_GUNICORN, _BEST = Pick("engine", "gunicorn engine"), Pick("engine", "microsvc engine", cls="*")
_GRANIAN, _BOTH = Pick("engine", "granian", cls="granian"), ("data", "io")
_SHED, _QUEUE = (Pick("overload", c.name) for c in SECTIONS["overload"].configs)
_OVERLOAD = ("overload",), ("sync",), "ideal"
# fmt: off
TARGETS = (
    Target("microsvc / plain gunicorn", _AUTO, Pick("plain"), 0.98, _BOTH),
    Target("auto / best of sweep", _AUTO, _SWEEP, 0.95, ("data",)),
    Target("auto / best of sweep", _AUTO, _SWEEP, None, ("io",)),  # /io: more workers, more load
    Target("gthread /io / ideal", _AUTO, None, 0.90, ("io",), ("gthread",), "ideal"),
    Target("errors at 1000 connections", _AUTO, None, 0, ("io",), ASYNC, "errors"),
    Target("async /io / /data", Pick("auto", endpoint="io"), Pick("auto", endpoint="data"), 0.90,
           ("io",), ASYNC),
    Target("auto / guide's command", _AUTO, Pick("guide"), None, _BOTH),
    Target("metrics on / off", Pick("metrics", "metrics on"), Pick("metrics", "metrics off"), 0.97,
           ("data",)),
    Target("engine / gunicorn engine, Flask", _ENGINE, _GUNICORN, 1.8, ("data",)),
    Target("engine / gunicorn engine, bare", _ENGINE, _GUNICORN, 4.0, ("bare",)),
    Target("gthread keep-alive / today's", _ENGINE, _GUNICORN, 1.3, ("data",), ("gthread",)),
    Target("best class / Granian", _BEST, _GRANIAN, 1.0, ("data",), ("*",)),
    Target("best class / Granian", _BEST, _GRANIAN, None, ("bare",), ("*",)),
    Target("engine /io / ideal", _ENGINE, None, 0.90, ("io",), ("gthread",), "ideal"),
    Target("engine /io / ideal", _ENGINE, None, 0.95, ("io",), ASYNC, "ideal"),
    Target("engine errors at 1000 connections", _ENGINE, None, 0, ("io",), ASYNC, "errors"),
    Target("p99 engine / gunicorn engine", _ENGINE, _GUNICORN, 1.0, ("data",), ASYNC, "p99"),
    Target("idle worker memory, engine - gunicorn engine (MB)", _ENGINE, _GUNICORN, 5.0, ("data",),
           measure="uss"),
    Target("overload: successes / capacity", _SHED, None, overload.TARGET_GOODPUT, *_OVERLOAD),
    Target("overload: successes / capacity", _QUEUE, None, None, *_OVERLOAD),
    Target("overload: success p99 (s)", _SHED, None, overload.TARGET_P99_S, *_OVERLOAD[:2], "p99"),
    Target("overload: success p99 (s)", _QUEUE, None, None, *_OVERLOAD[:2], "p99"),
)
# fmt: on


@dataclass
class Ratio:
    kind: str
    subject: str
    value: float | None
    target: str
    status: str  # PASS, MISS, info, n/a
    detail: str

    def shown(self) -> str:
        digits = 0 if "errors" in self.kind else 1 if "(MB)" in self.kind else 3
        return "-" if self.value is None else f"{self.value:.{digits}f}"


def show(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pick(points: Sequence[Point], pick: Pick, cls: str, endpoint: str) -> Point | None:
    where = (pick.section, pick.endpoint or endpoint)
    found = [
        p for p in points if (p.section, p.endpoint) == where and pick.config in (None, p.config)
    ]
    found = [p for p in found if (pick.cls or cls) in ("*", p.worker_class)]
    return max(found, key=lambda p: p.median("rps") or -1.0, default=None)


def _ideal(point: Point) -> tuple[float, str]:
    """Threads / 50 ms; for gevent and eventlet connections / 50 ms, or, where the
    server's CPU is the bound, what it serves with that CPU busy all the time."""
    if point.section == "overload":
        capacity, offered = point.median("capacity_rps") or 0.0, point.median("offered_rps")
        return capacity, f"{capacity:.1f} rps capacity (offered: {show(offered, 1)} rps)"
    if point.worker_class not in ASYNC:
        ideal = point.workers * point.threads / IO_WAIT_S
        return ideal, f"{ideal:,.0f} ({point.workers} x {point.threads} threads / 50 ms)"
    ideal, how = point.connections / IO_WAIT_S, f"{point.connections} connections / 50 ms"
    rps, busy, pinned = point.median("rps"), point.median("cpu_busy"), point.pinning.server_cpus
    cpus = len(pinned or os.sched_getaffinity(0))
    if rps and busy and rps * cpus / busy < ideal:
        ideal, how = rps * cpus / busy, f"at {busy:.0%} of {cpus} CPU: the CPU's bound"
    return ideal, f"{ideal:,.0f} ({how})"


#: Rounds two points must both have run for their ratio to be the median of the
#: rounds' ratios.
MIN_PAIRS = 3


def _paired(top: Point, bottom: Point) -> list[float]:
    """top's rps over bottom's, round by round, where they ran in turn (one group)."""
    if not top.group or top.group != bottom.group:
        return []
    theirs = bottom.by_round("rps")
    return [rps / theirs[n] for n, rps in top.by_round("rps").items() if theirs.get(n)]


def _ratio(target: Target, top: Point, bottom: Point | None, subject: str) -> Ratio:
    measure = target.measure
    key = {"uss": "idle_uss_bytes", "p99": "p99_ms"}.get(measure, "rps")
    a, b = top.median(key), bottom.median(key) if bottom else None
    failed = top.median("rps") is None or bool(bottom and bottom.median("rps") is None)
    if measure == "errors":
        value = None if failed else sum(top.each("errors")) + len(top.failures)
        at = "" if top.connections == ASYNC_IO_CONNECTIONS else " (the target is for 1000)"
        detail = f"socket errors {sum(top.each('socket_errors')):.0f}, non-2xx "
        detail += f"{sum(top.each('non2xx')):.0f} over {len(top.runs)} runs at "
        detail += f"{top.connections} connections{at}"
    elif measure == "ideal":
        ideal, how = _ideal(top)
        value, detail = None if failed or a is None else a / ideal, f"{show(a)} rps / {how}"
    elif measure == "p99" and not bottom:
        value, detail = a and a / 1000, f"p50 {show(top.median('p50_ms'), 0)} ms"
    elif measure == "uss":
        value = None if a is None or b is None else (a - b) / MB
        detail = f"USS {show(a and a / MB, 1)} MB / {show(b and b / MB, 1)} MB"
    else:
        value = None if failed or a is None or not b else a / b
        digits, unit = (2, "ms") if measure == "p99" else (0, "rps")
        left, right = top.config, bottom.config if bottom else "-"
        if bottom and bottom.endpoint != top.endpoint:
            left, right = top.path, bottom.path
        detail = f"{left}: {show(a, digits)} {unit} / {right}: {show(b, digits)} {unit}"
        paired = _paired(top, bottom) if measure == "rps" and bottom and not failed else []
        if len(paired) >= MIN_PAIRS:
            value = statistics.median(paired)
            detail += f" (medians); median of {len(paired)} rounds' ratios"
    least, limit, unit = measure in ("rps", "ideal"), target.target, " MB" * (measure == "uss")
    shown = "none (shown)" if limit is None else f"{'>=' if least else '<='} {limit:g}{unit}"
    if value is None:
        return Ratio(target.kind, subject, None, shown, "n/a", detail + " (a point failed)")
    passed = limit is None or (value >= limit if least else value <= limit)
    status = "info" if limit is None else "PASS" if passed else "MISS"
    return Ratio(target.kind, subject, value, shown, status, detail)


def compute_ratios(points: Sequence[Point]) -> list[Ratio]:
    """Every target this run's points give, in the order of TARGETS."""
    ratios = []
    for target in TARGETS:
        for endpoint, cls in ((e, c) for e in target.endpoints for c in target.classes):
            top = _pick(points, target.top, cls, endpoint)
            bottom = _pick(points, target.bottom, cls, endpoint) if target.bottom else None
            if top and (bottom or not target.bottom):
                shown = "bare callable" if endpoint == "bare" else PATHS[endpoint]
                subject = top.config if endpoint == "overload" else f"{top.worker_class} {shown}"
                ratios.append(_ratio(target, top, bottom, subject))
    return ratios
