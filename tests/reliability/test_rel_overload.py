"""Overload through `microsvc nginx`: load shedding on queue time against plain gunicorn.

One instance behind a real nginx (the conf.d output of `microsvc nginx`, which stamps
X-Request-Start), sync, 2 workers, the demo's /io?ms=100: capacity about 20 requests a
second. The capacity is measured first: wrk with two connections per worker for 5 s, so
that a worker always has the next request at hand and none waits long. Then wrk offers
about three times that for 20 s: many connections, each pausing between requests (wrk's
`delay()`), so the offered rate stays near the target while responses are fast, as an
open-loop load would. nginx's access log gives each response's end, status and time
(`$request_time`, what the client waited, milliseconds). Rates are counted in the steady
part of a run (its first and last two seconds left out: the queue fills at the start, and
wrk drops what is in flight at the end, which nginx logs as 499).

- microsvc with `--max-queue-time 1s`: successful responses at 0.9 x capacity or more,
  their p99 within 1.5 s, every other response a 503 that waited no longer than the
  limit (and a little), the app not run for it.
- plain gunicorn in the same setup and load: its success rate and p99 are recorded
  beside microsvc's (no assertion). wrk is closed-loop at heart: each connection waits
  for its response, so against gunicorn the offered rate falls to what it serves and the
  latency grows to connections / capacity.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from harness import render, upstream_args, wrapper_conf

pytestmark = [pytest.mark.reliability]

SERVICE_S = 0.1
WORKERS = 2
CAPACITY_RPS = WORKERS / SERVICE_S
OFFERED_RPS = 3 * CAPACITY_RPS
SECONDS = 20
MAX_QUEUE_TIME_S = 1.0
#: Each wrk connection waits this long after a response before its next request.
PAUSE_S = 1.0
#: Connections for OFFERED_RPS when a response takes about as long as the queue limit.
CONNECTIONS = int(OFFERED_RPS * (PAUSE_S + MAX_QUEUE_TIME_S))

PACING = f"""
function delay()
  return {int(PAUSE_S * 1000)}
end
"""


#: Seconds left out at each end of a run when rates are counted.
EDGE_S = 2.0
#: nginx's status for a request whose client went away first (wrk ending).
CLIENT_GONE = 499


@dataclass
class Outcome:
    """What nginx logged for one run: times of the responses by status, and rates in
    the steady part of the run."""

    name: str
    capacity_rps: float
    ok: list[float]
    shed: list[float]
    other: dict[int, int]
    socket_errors: int
    ok_rps: float
    offered_rps: float

    def line(self) -> str:
        return (
            f"{self.name}: offered {self.offered_rps:.1f} rps, 200 {len(self.ok)} "
            f"({self.ok_rps:.1f} rps = {self.ok_rps / self.capacity_rps:.2f} x the "
            f"{self.capacity_rps:.1f} rps capacity, p50 {percentile(self.ok, 50):.3f} s, "
            f"p99 {percentile(self.ok, 99):.3f} s), 503 {len(self.shed)} "
            f"(p99 {percentile(self.shed, 99):.3f} s), other {self.other or 0}, "
            f"socket errors {self.socket_errors}"
        )


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def read_log(path: Path) -> list[tuple[float, int, float]]:
    """(end, status, seconds) of each request nginx logged."""
    entries = []
    for line in path.read_text().splitlines():
        end, status, seconds = line.split()
        entries.append((float(end), int(status), float(seconds)))
    return entries


def steady_rate(
    entries: list[tuple[float, int, float]], statuses: set[int], *, by_start: bool = False
) -> float:
    """Requests with these statuses a second, counted by their end (or start), between
    EDGE_S after the first start and EDGE_S before the last end."""
    first = min(end - seconds for end, _, seconds in entries)
    last = max(end for end, _, _ in entries)
    low, high = first + EDGE_S, last - EDGE_S
    count = 0
    for end, status, seconds in entries:
        moment = end - seconds if by_start else end
        if status in statuses and low <= moment < high:
            count += 1
    return count / (high - low)


def overload(name, server, start_nginx, free_port, wrk, counting, tmp_path) -> Outcome:
    """The capacity through nginx, then OFFERED_RPS for SECONDS; what nginx logged."""
    port = free_port()
    prefix = tmp_path / f"nginx-{name}"
    prefix.mkdir()
    blocks = prefix / "microsvc.conf"
    blocks.write_text(
        render(*upstream_args([server.port]), "--listen", f"127.0.0.1:{port}", "--server-name", "_")
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
    nginx = start_nginx(conf, "127.0.0.1", port)
    url = f"{nginx.url}/io?ms={int(SERVICE_S * 1000)}"
    log = prefix / "access.log"
    wrk.script = counting
    calibration = wrk.run(url, seconds=5 + 2 * EDGE_S, connections=2 * WORKERS, threads=2)
    assert calibration.failed == 0, (calibration, log.read_text()[:300], server.describe())
    capacity = steady_rate(read_log(log), {200})
    log.write_text("")  # nginx appends (O_APPEND): the file starts again
    script = tmp_path / f"paced-{name}.lua"
    script.write_text(counting.read_text() + PACING)
    wrk.script = script
    result = wrk.run(
        url,
        seconds=SECONDS,
        connections=CONNECTIONS,
        threads=2,
        timeout=15,
    )
    entries = read_log(log)
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
        result.socket_errors,
        ok_rps=steady_rate(entries, {200}),
        offered_rps=steady_rate(entries, {status for _, status, _ in entries}, by_start=True),
    )


@pytest.mark.nginx
def test_shedding_keeps_goodput_and_latency_where_gunicorn_queues(
    serve, start_nginx, free_port, wrk, figures, tmp_path
):
    microsvc = serve(
        ["-k", "sync", "--workers", str(WORKERS), "--max-queue-time", f"{MAX_QUEUE_TIME_S:g}s"],
        name="microsvc",
    )
    counting = wrk.script
    shedding = overload("microsvc", microsvc, start_nginx, free_port, wrk, counting, tmp_path)
    figures(shedding.line())
    microsvc.stop()

    gunicorn = serve(
        command=[
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "sync",
            "-w",
            str(WORKERS),
            "-b",
            "127.0.0.1:{port}",
            "microsvc.demo:app",
        ],
        name="gunicorn",
    )
    queueing = overload("gunicorn", gunicorn, start_nginx, free_port, wrk, counting, tmp_path)
    figures(queueing.line())

    detail = f"{shedding.line()}\n{queueing.line()}\n{microsvc.log_text()[-3000:]}"
    capacity = shedding.capacity_rps
    assert capacity >= 0.5 * CAPACITY_RPS, detail  # the machine is not starved
    assert shedding.offered_rps >= 2.5 * capacity, detail
    assert shedding.ok_rps >= 0.9 * capacity, detail
    assert percentile(shedding.ok, 99) <= 1.5, detail
    assert shedding.shed, detail
    assert shedding.other == {} and shedding.socket_errors == 0, detail
    # a shed request waited for the limit at most, then was answered at once
    assert percentile(shedding.shed, 99) <= MAX_QUEUE_TIME_S + 0.5, detail
    assert "Shed " in microsvc.log_text(), detail


# --autoscale

#: The cool-down the autoscale test runs with (the default is 60 s).
COOLDOWN_S = 3.0
MOST = 4


def workers_now(server) -> int:
    return len(server.app_workers())


def wait_for_workers(server, wanted, deadline: float) -> float:
    """Seconds until the server runs exactly `wanted` workers (fails after `deadline`)."""
    started = time.monotonic()
    while workers_now(server) != wanted:
        assert time.monotonic() - started < deadline, (
            f"{workers_now(server)} workers, not {wanted}, after {deadline} s:\n"
            f"{server.log_tail(30)}"
        )
        time.sleep(0.05)
    return time.monotonic() - started


def status(server, runtime_dir) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "microsvc", "status", "--pid", str(server.pid), "--json"],
        env={"XDG_RUNTIME_DIR": str(runtime_dir), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data: dict = json.loads(done.stdout)
    return data


def test_autoscale_follows_a_step_of_load_and_fails_no_request(
    serve, wrk, figures, free_port, runtime_dir
):
    metrics_port = free_port()
    server = serve(
        [
            "-k",
            "sync",
            "--workers",
            str(MOST),
            "--autoscale",
            "--min-workers",
            "1",
            "--metrics",
            "--metrics-bind",
            f"127.0.0.1:{metrics_port}",
        ],
        env={"MICROSVC_AUTOSCALE_COOLDOWN": f"{COOLDOWN_S:g}"},
        name="autoscale",
    )
    server.wait_log(r"Ready: 4 workers booted")
    # idle: down to the minimum once the cool-down has passed
    idle_s = wait_for_workers(server, 1, deadline=COOLDOWN_S + 15)
    server.wait_log(r"Autoscale: \d -> 1 workers, at most 0 of \d workers busy for 3s")
    assert status(server, runtime_dir)["autoscale"]["target"] == 1

    # a step of load: 16 connections on 100 ms requests, four times what one worker serves
    url = f"{server.url}/io?ms=100"
    step = wrk.start(url, seconds=10, connections=16, threads=2, timeout=10)
    up_s = wait_for_workers(server, 2, deadline=10)
    full_s = wait_for_workers(server, MOST, deadline=15)
    loaded = status(server, runtime_dir)
    assert loaded["autoscale"]["target"] == MOST, loaded["autoscale"]
    peak = step.result()

    # light load while the count falls again: workers retire with requests in flight
    light = wrk.start(url, seconds=COOLDOWN_S + 6, connections=1, threads=1, timeout=10)
    down_s = wait_for_workers(server, 2, deadline=COOLDOWN_S + 10)
    trickle = light.result()

    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    figures(
        f"idle {idle_s:.1f} s to 1 worker (cool-down {COOLDOWN_S:g} s); step of load: 2 workers "
        f"after {up_s:.1f} s, {MOST} after {full_s:.1f} s; light load: 2 workers after "
        f"{down_s:.1f} s; {peak.summary()}; {trickle.summary()}"
    )
    assert up_s <= 5.0, server.log_tail(30)
    assert peak.failed == 0 and trickle.failed == 0, (peak, trickle, server.log_tail(30))
    assert peak.responses > 0 and trickle.responses > 0
    assert 'microsvc_autoscale_changes_total{direction="up"}' in text
    # 2 while the light load ran; 1 once a cool-down has passed after it
    assert re.search(r"^microsvc_workers_target [12]\.0$", text, re.MULTILINE), text
    assert re_count(text, "up") >= 2 and re_count(text, "down") >= 2, text


def re_count(text: str, direction: str) -> float:
    match = re.search(
        r'^microsvc_autoscale_changes_total\{direction="' + direction + r'"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return float(match.group(1)) if match else 0.0
