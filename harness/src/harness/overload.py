"""Overload through a real nginx: how a server answers three times the requests it can
serve, from nginx's access log.

One instance behind nginx (the conf.d output of `microsvc nginx`, which stamps
X-Request-Start), sync, WORKERS workers, the demo's /io?ms=100: capacity about 20
requests a second. `measure` first measures the capacity through nginx (unless given):
wrk with two connections per worker, so that a worker always has the next request at
hand and none waits long. Then wrk offers about OVERLOAD times that: many connections,
each pausing between requests (wrk's `delay()`), so the offered rate stays near the
target while responses are fast, as an open-loop load would. nginx's access log gives
each response's end, status and time (`$request_time`, what the client waited). Rates
are counted in the steady part of a run (EDGE_S left out at each end: the queue fills at
the start, and wrk drops what is in flight at the end, which nginx logs as 499).

wrk is closed-loop at heart: each connection waits for its response, so against a server
that queues everything the offered rate falls to what it serves and the latency grows to
connections / capacity.

    server = ...  # microsvc run -k sync --workers 2 --max-queue-time 1s, on server.port
    outcome = measure("microsvc", server, wrk, workdir)
    outcome.goodput >= TARGET_GOODPUT and outcome.ok_p99 <= TARGET_P99_S
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.nginx import Nginx, render, upstream_args, wrapper_conf
from harness.servers import Server, free_port
from harness.wrk import LUA_SCRIPT, Wrk

#: What one request of the endpoint takes, and the workers that serve it.
SERVICE_S = 0.1
WORKERS = 2
#: The endpoint, and what WORKERS workers could serve of it at best.
PATH = f"/io?ms={int(SERVICE_S * 1000)}"
IDEAL_RPS = WORKERS / SERVICE_S
#: The load offered, as a multiple of the capacity, and for how long.
OVERLOAD = 3
OFFERED_RPS = OVERLOAD * IDEAL_RPS
SECONDS = 20.0
#: microsvc's `--max-queue-time`.
MAX_QUEUE_TIME_S = 1.0
#: Each wrk connection waits this long after a response before its next request.
PAUSE_S = 1.0
#: Connections for OFFERED_RPS when a response takes about as long as the queue limit.
CONNECTIONS = int(OFFERED_RPS * (PAUSE_S + MAX_QUEUE_TIME_S))
#: Seconds of the capacity run counted (EDGE_S more at each end are left out).
CALIBRATION_S = 5.0
#: Seconds left out at each end of a run when rates are counted.
EDGE_S = 2.0
#: nginx's status for a request whose client went away first (wrk ending).
CLIENT_GONE = 499
#: Successes a second at least this share of the capacity, their p99 at most this long.
TARGET_GOODPUT = 0.9
TARGET_P99_S = 1.5

PACING = f"""
function delay()
  return {int(PAUSE_S * 1000)}
end
"""

#: (end, status, seconds) of one request in nginx's access log.
Entry = tuple[float, int, float]


def percentile(values: list[float], pct: float) -> float:
    """The value below which `pct` percent of `values` lie (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def read_log(path: Path) -> list[Entry]:
    """(end, status, seconds) of each request nginx logged."""
    entries = []
    for line in path.read_text().splitlines():
        end, status, seconds = line.split()
        entries.append((float(end), int(status), float(seconds)))
    return entries


def steady_rate(entries: list[Entry], statuses: set[int], *, by_start: bool = False) -> float:
    """Requests with these statuses a second, counted by their end (or start), between
    EDGE_S after the first start and EDGE_S before the last end."""
    if not entries:
        return 0.0
    first = min(end - seconds for end, _, seconds in entries)
    last = max(end for end, _, _ in entries)
    low, high = first + EDGE_S, last - EDGE_S
    if high <= low:
        return 0.0
    count = 0
    for end, status, seconds in entries:
        moment = end - seconds if by_start else end
        if status in statuses and low <= moment < high:
            count += 1
    return count / (high - low)


@dataclass
class Outcome:
    """What nginx logged for one run: the times of the responses by status (seconds the
    client waited), and the rates in the steady part of the run."""

    name: str
    capacity_rps: float
    ok: list[float]
    shed: list[float]
    #: Other statuses (499, wrk going away at the end, left out) and their counts.
    other: dict[int, int]
    socket_errors: int
    ok_rps: float
    offered_rps: float

    @property
    def goodput(self) -> float:
        """Successes a second as a share of the capacity."""
        return self.ok_rps / self.capacity_rps if self.capacity_rps else 0.0

    @property
    def ok_p50(self) -> float:
        return percentile(self.ok, 50)

    @property
    def ok_p99(self) -> float:
        return percentile(self.ok, 99)

    @property
    def shed_p99(self) -> float:
        return percentile(self.shed, 99)

    @property
    def other_errors(self) -> int:
        """Responses neither 200 nor 503, and socket errors."""
        return sum(self.other.values()) + self.socket_errors

    def line(self) -> str:
        return (
            f"{self.name}: offered {self.offered_rps:.1f} rps, 200 {len(self.ok)} "
            f"({self.ok_rps:.1f} rps = {self.goodput:.2f} x the "
            f"{self.capacity_rps:.1f} rps capacity, p50 {self.ok_p50:.3f} s, "
            f"p99 {self.ok_p99:.3f} s), 503 {len(self.shed)} "
            f"(p99 {self.shed_p99:.3f} s), other {self.other or 0}, "
            f"socket errors {self.socket_errors}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The figures, without the time of each response."""
        return {
            "capacity_rps": round(self.capacity_rps, 3),
            "offered_rps": round(self.offered_rps, 3),
            "ok": len(self.ok),
            "ok_rps": round(self.ok_rps, 3),
            "goodput": round(self.goodput, 3),
            "ok_p50_s": self.ok_p50,
            "ok_p99_s": self.ok_p99,
            "shed": len(self.shed),
            "shed_p99_s": self.shed_p99,
            "other": {str(status): count for status, count in sorted(self.other.items())},
            "socket_errors": self.socket_errors,
        }


def _start_nginx(prefix: Path, upstream_port: int) -> Nginx:
    """nginx on a free port with the output of `microsvc nginx` for one upstream, its
    access log (`$msec $status $request_time`) in PREFIX/access.log."""
    port = free_port()
    prefix.mkdir(parents=True, exist_ok=True)
    blocks = prefix / "microsvc.conf"
    blocks.write_text(
        render(
            *upstream_args([upstream_port]),
            "--listen",
            f"127.0.0.1:{port}",
            "--server-name",
            "_",
        )
    )
    conf = wrapper_conf(
        prefix,
        blocks,
        worker_connections=2048,
        http_lines=(
            "log_format timing '$msec $status $request_time';",
            f"access_log {prefix}/access.log timing;",
        ),
    )
    nginx = Nginx.start(prefix, conf, "127.0.0.1", port)
    try:
        nginx.wait_listening()
    except HarnessError:
        nginx.kill()
        raise
    return nginx


def _outcome(name: str, capacity: float, entries: list[Entry], socket_errors: int) -> Outcome:
    ok: list[float] = []
    shed: list[float] = []
    other: dict[int, int] = {}
    for _, status, seconds in entries:
        if status == 200:
            ok.append(seconds)
        elif status == 503:
            shed.append(seconds)
        elif status != CLIENT_GONE:
            other[status] = other.get(status, 0) + 1
    return Outcome(
        name,
        capacity,
        ok,
        shed,
        other,
        socket_errors,
        ok_rps=steady_rate(entries, {200}),
        offered_rps=steady_rate(entries, {status for _, status, _ in entries}, by_start=True),
    )


def measure(
    name: str,
    server: Server,
    wrk: Wrk,
    workdir: Path,
    *,
    seconds: float = SECONDS,
    capacity_rps: float | None = None,
    cpus: tuple[int, ...] | None = None,
) -> Outcome:
    """Put nginx in front of `server` (under WORKDIR/nginx-NAME), measure the capacity
    through it unless `capacity_rps` is given, then offer OFFERED_RPS for `seconds`; what
    nginx logged. wrk runs on `cpus` (taskset) when given, with a paced copy of its
    counting script for the load (`wrk.script` is restored after). HarnessError (with
    nginx's log and the server's) if the capacity run fails; nginx is stopped on the way
    out."""
    prefix = workdir / f"nginx-{name}"
    nginx = _start_nginx(prefix, server.port)
    log = prefix / "access.log"
    url = nginx.url + PATH
    counting = wrk.script
    try:
        if capacity_rps is None:
            calibration = wrk.run(
                url,
                seconds=CALIBRATION_S + 2 * EDGE_S,
                connections=2 * WORKERS,
                threads=2,
                cpus=cpus,
            )
            if calibration.failed:
                raise HarnessError(
                    f"the capacity run failed: {calibration}; nginx's log: "
                    f"{log.read_text()[:300]}; {server.describe()}"
                )
            capacity_rps = steady_rate(read_log(log), {200})
            log.write_text("")  # nginx appends (O_APPEND): the file starts again
        paced = workdir / f"paced-{name}.lua"
        paced.write_text(LUA_SCRIPT + PACING)
        wrk.script = paced
        result = wrk.run(
            url, seconds=seconds, connections=CONNECTIONS, threads=2, timeout=15, cpus=cpus
        )
        return _outcome(name, capacity_rps, read_log(log), result.socket_errors)
    finally:
        wrk.script = counting
        nginx.kill()
