"""`microsvc status`: what a running server is doing, read from its scoreboard.

The report is built from one snapshot of the scoreboard (see `microsvc.observe.scoreboard`); it
needs no network port and no `--metrics`, only the file in this user's runtime
directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from microsvc.errors import MicrosvcError, UsageError
from microsvc.observe.scoreboard import (
    Scoreboard,
    ScoreboardError,
    Snapshot,
    find_instances,
    runtime_dir,
)

#: A scoreboard whose master has not written it for this long is reported as stale.
STALE_AFTER = 5.0


class StatusError(MicrosvcError):
    """No instance to report on, or its scoreboard cannot be read."""


def locate(pid: int | None = None, directory: Path | None = None) -> Path:
    """The scoreboard of instance `pid`, or of this user's only running instance.
    Raises StatusError when there is none, UsageError when several run and none was
    chosen."""
    directory = directory or runtime_dir()
    instances = find_instances(directory)
    if pid is not None:
        if pid not in instances:
            raise StatusError(
                f"no running microsvc instance with master pid {pid} (looked in {directory})"
            )
        return instances[pid]
    if not instances:
        raise StatusError(
            f"no running microsvc instance of this user (looked in {directory}); "
            "start one with `microsvc run`"
        )
    if len(instances) > 1:
        pids = ", ".join(str(found) for found in instances)
        raise UsageError(
            f"several microsvc instances run (master pids {pids}); pick one: --pid PID"
        )
    return next(iter(instances.values()))


def open_board(path: Path) -> Scoreboard:
    try:
        return Scoreboard.open(path)
    except ScoreboardError as exc:
        raise StatusError(str(exc)) from None


def report(board: Scoreboard, now: float | None = None) -> dict[str, Any]:
    """The status of the server as one JSON-ready object."""
    try:
        snapshot = board.snapshot()
    except ScoreboardError as exc:
        raise StatusError(str(exc)) from None
    return build_report(snapshot, time.time() if now is None else now)


def build_report(snapshot: Snapshot, now: float) -> dict[str, Any]:
    workers = []
    for worker in sorted(snapshot.workers, key=lambda view: view.generation):
        request = None
        if worker.request is not None:
            request = dict(worker.request)
            request["seconds"] = round(max(0.0, now - request["started"]), 3)
        workers.append(
            {
                "pid": worker.pid,
                "slot": worker.slot,
                "generation": worker.generation,
                "state": worker.state,
                "age_seconds": round(now - worker.started, 3) if worker.started else None,
                "requests": worker.requests,
                "in_flight": worker.in_flight,
                "request": request,
                "stop_reason": worker.stop_reason or None,
                "memory": worker.memory,
                "previous_worker": worker.last_exit,
                "queue": worker.queue,
            }
        )
    serving = [worker for worker in workers if worker["state"] != "stopping"]
    busy = sum(1 for worker in serving if worker["in_flight"])
    return {
        "master_pid": snapshot.master_pid,
        "started": snapshot.started,
        "uptime_seconds": round(now - snapshot.started, 3),
        "updated": snapshot.updated,
        "stale": now - snapshot.updated > STALE_AFTER,
        "worker_class": snapshot.worker_class,
        "http_engine": snapshot.http_engine,
        "listeners": [
            {"address": item.address, "queue": item.queue, "queue_limit": item.queue_limit}
            for item in snapshot.listeners
        ],
        "workers_running": len(workers),
        "workers_busy": busy,
        "busy_ratio": round(busy / len(serving), 4) if serving else 0.0,
        "in_flight": sum(worker["in_flight"] for worker in workers),
        "requests_served": sum(worker["requests"] for worker in workers),
        "queue_time_seconds": _queue_time(workers, now),
        "requests_shed": sum(view.queue["shed"] for view in snapshot.workers if view.queue),
        "autoscale": snapshot.autoscale,
        "recycled": snapshot.recycled,
        "max_worker_memory": snapshot.max_worker_memory,
        "memory_measure": _measure(workers),
        "workers_without_slot": snapshot.unslotted,
        "workers": workers,
    }


def _measure(workers: list[dict[str, Any]]) -> str:
    """What "own" memory is: USS, or RSS where the platform gives no USS."""
    measures = {worker["memory"]["measure"] for worker in workers if worker["memory"]}
    return "RSS" if "RSS" in measures else "USS"


#: A worker's queue time noted longer ago than this is not shown as the current one.
QUEUE_TIME_FRESH = 10.0


def _queue_time(workers: list[dict[str, Any]], now: float) -> float | None:
    """The longest queue time of the workers' last requests, noted in the last
    QUEUE_TIME_FRESH seconds (None: none)."""
    recent = [
        worker["queue"]["seconds"]
        for worker in workers
        if worker["queue"] and now - worker["queue"]["at"] <= QUEUE_TIME_FRESH
    ]
    return round(max(recent), 4) if recent else None


def _scaling_line(data: dict[str, Any]) -> list[str]:
    auto = data.get("autoscale")
    if not auto:
        return []
    return [
        f"autoscale: {auto['target']} workers (between {auto['min_workers']} and "
        f"{auto['max_workers']}); last change: {auto['reason']}"
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"  # pragma: no cover


def render(data: dict[str, Any]) -> str:
    """The report as text, like `top`."""
    queues = ", ".join(
        f"{item['address']} (queue {item['queue']}/{item['queue_limit']})"
        if item["queue"] is not None
        else item["address"]
        for item in data["listeners"]
    )
    recycled = ", ".join(f"{name} {count}" for name, count in data["recycled"].items() if count)
    lines = [
        f"microsvc master {data['master_pid']}: {data['worker_class']} workers, "
        f"HTTP engine {data['http_engine']}, up {_duration(data['uptime_seconds'])}"
        + (" (STALE: the master has not updated the scoreboard)" if data["stale"] else ""),
        f"listening on {queues or '-'}",
        f"workers {data['workers_running']}, busy {data['workers_busy']} "
        f"({data['busy_ratio']:.0%}), requests in flight {data['in_flight']}, "
        f"served {data['requests_served']}",
        "queue time "
        + ("-" if data["queue_time_seconds"] is None else f"{data['queue_time_seconds']:.3f}s")
        + f" (the longest of the workers' last requests), shed {data['requests_shed']}",
        *_scaling_line(data),
        f"workers ended: {recycled or 'none'}"
        + (
            f"; {data['workers_without_slot']} without a scoreboard slot"
            if data["workers_without_slot"]
            else ""
        ),
        f"memory per worker: OWN = {data['memory_measure']} (its own pages), PSS = "
        "proportional share, SHARED = resident pages shared with others; "
        + (
            f"--max-worker-memory {_size(data['max_worker_memory'])} (of OWN)"
            if data["max_worker_memory"]
            else "no --max-worker-memory"
        ),
        "",
        f"{'PID':>7} {'GEN':>4} {'STATE':<9} {'AGE':>7} {'REQS':>7} {'OWN':>7} "
        f"{'PSS':>7} {'SHARED':>7} {'TIME':>7}  REQUEST",
    ]
    for worker in data["workers"]:
        memory = worker["memory"] or {}
        request = worker["request"]
        if request:
            shown = f"{request['method']} {request['path']}"
            if request["request_id"]:
                shown += f" [{request['request_id']}]"
            if worker["in_flight"] > 1:
                shown += f" (+{worker['in_flight'] - 1} more)"
            elapsed = f"{request['seconds']:.1f}s"
        else:
            shown, elapsed = "", "-"
        if worker["stop_reason"]:
            shown = f"{shown} (stopping: {worker['stop_reason']})".strip()
        lines.append(
            f"{worker['pid']:>7} {worker['generation']:>4} {worker['state']:<9} "
            f"{_duration(worker['age_seconds']):>7} {worker['requests']:>7} "
            f"{_size(memory.get('own')):>7} {_size(memory.get('pss')):>7} "
            f"{_size(memory.get('shared')):>7} "
            f"{elapsed:>7}  {shown}".rstrip()
        )
    return "\n".join(lines)
