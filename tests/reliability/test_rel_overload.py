"""Overload through `microsvc nginx`: load shedding on queue time against plain gunicorn.

The measurement is `harness.overload` (shared with `scripts/bench --sections overload`):
one instance behind a real nginx, sync, 2 workers, the demo's /io?ms=100 (capacity about
20 requests a second, measured first through nginx), then about three times that offered
for 20 s by paced wrk connections; figures from nginx's access log, rates in the steady
part of the run.

- microsvc with `--max-queue-time 1s`: successful responses at 0.9 x capacity or more,
  their p99 within 1.5 s, every other response a 503 that waited no longer than the
  limit (and a little), the app not run for it.
- plain gunicorn in the same setup and load: its success rate and p99 are recorded
  beside microsvc's (no assertion), against the capacity measured through microsvc (the
  same 2 workers on the same endpoint). Against gunicorn, wrk's closed loop makes the
  offered rate fall to what it serves and the latency grow to connections / capacity.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from harness import Server, Wrk, overload

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = [pytest.mark.reliability]


@pytest.mark.nginx
def test_shedding_keeps_goodput_and_latency_where_gunicorn_queues(
    serve: ServeFactory, wrk: Wrk, figures: Figures, tmp_path: Path
) -> None:
    shedding = None
    for attempt in ("microsvc", "microsvc-again"):
        # Measured a second time, on a fresh server and nginx, capacity included, when
        # the first run misses a timing target: the suite's other tests share the CPUs,
        # and a burst of theirs during the 20 s delays the workers (alone, a run gives
        # about 0.97 x capacity, and sheds within 1.2 s). A stall of the workers shows
        # in the shed latency alone when it falls while requests wait: those are shed
        # once it ends, the successes stay within their target. The last run decides.
        microsvc = serve(
            [
                "-k",
                "sync",
                "--workers",
                str(overload.WORKERS),
                "--max-queue-time",
                f"{overload.MAX_QUEUE_TIME_S:g}s",
            ],
            name=attempt,
        )
        shedding = overload.measure(attempt, microsvc, wrk, tmp_path)
        figures(shedding.line())
        microsvc.stop()
        if meets_targets(shedding):
            break
    assert shedding is not None

    gunicorn = serve(
        command=[
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "sync",
            "-w",
            str(overload.WORKERS),
            "-b",
            "127.0.0.1:{port}",
            "microsvc.demo:app",
        ],
        name="gunicorn",
    )
    queueing = overload.measure(
        "gunicorn", gunicorn, wrk, tmp_path, capacity_rps=shedding.capacity_rps
    )
    figures(queueing.line())

    detail = f"{shedding.line()}\n{queueing.line()}\n{microsvc.log_text()[-3000:]}"
    capacity = shedding.capacity_rps
    assert capacity >= 0.5 * overload.IDEAL_RPS, detail  # the machine is not starved
    assert shedding.offered_rps >= 2.5 * capacity, detail
    assert shedding.goodput >= overload.TARGET_GOODPUT, detail
    assert shedding.ok_p99 <= overload.TARGET_P99_S, detail
    assert shedding.shed, detail
    assert shedding.other == {} and shedding.socket_errors == 0, detail
    assert shedding.shed_p99 <= SHED_P99_S, detail
    assert "Shed " in microsvc.log_text(), detail


#: A shed request waited for the limit, then was answered at once (gunicorn answers them
#: all after connections / capacity, about 6 s). The margin: the request before it in its
#: worker's line (nginx keeps connections to each sync worker alive, so each worker has a
#: line of its own), on a CPU shared with the suite's other tests.
SHED_P99_S = overload.MAX_QUEUE_TIME_S + 1.0


def meets_targets(outcome: overload.Outcome) -> bool:
    """Whether a run met the timing targets (those a busy machine can make it miss)."""
    return (
        outcome.goodput >= overload.TARGET_GOODPUT
        and outcome.ok_p99 <= overload.TARGET_P99_S
        and outcome.shed_p99 <= SHED_P99_S
    )


# --autoscale

#: The cool-down the autoscale test runs with (the default is 60 s).
COOLDOWN_S = 3.0
MOST = 4


def workers_now(server: Server) -> int:
    return len(server.app_workers())


def wait_for_workers(server: Server, wanted: int, deadline: float) -> float:
    """Seconds until the server runs exactly `wanted` workers (fails after `deadline`)."""
    started = time.monotonic()
    while workers_now(server) != wanted:
        assert time.monotonic() - started < deadline, (
            f"{workers_now(server)} workers, not {wanted}, after {deadline} s:\n"
            f"{server.log_tail(30)}"
        )
        time.sleep(0.05)
    return time.monotonic() - started


def status(server: Server, runtime_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "microsvc", "status", "--pid", str(server.pid), "--json"],
        env={"XDG_RUNTIME_DIR": str(runtime_dir), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_autoscale_follows_a_step_of_load_and_fails_no_request(
    serve: ServeFactory, wrk: Wrk, figures: Figures, free_port: Callable[[], int], runtime_dir: Path
) -> None:
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
    # Each step up waits for the worker started before it to boot: long enough for a slow
    # machine, and SIGINT ends the load (with its figures) once the count is at the top.
    step = wrk.start(url, seconds=40, connections=16, threads=2, timeout=10)
    up_s = wait_for_workers(server, 2, deadline=10)
    full_s = wait_for_workers(server, MOST, deadline=30)
    loaded = status(server, runtime_dir)
    step.proc.send_signal(signal.SIGINT)
    peak = step.result()
    assert loaded["autoscale"]["target"] == MOST, loaded["autoscale"]

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
